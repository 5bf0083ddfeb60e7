"""LoRA instruction tuning on top of a frozen packed export (small data, in the spirit of LIMA).

The packed weights stay packed and frozen; peft adds low-rank adapters beside every packed linear
(see :mod:`bitconvert.layers.lora`) and only those train. The loss covers response tokens only.
Adapters are saved in peft's own format, so ``PeftModel.from_pretrained`` reads them back (with
the packed-layer mapping registered: :func:`load_adapter` does that).

Data: one JSON object per line, in one of three shapes:
  {"prompt": ..., "response": ...}   a single turn; loss on the response
  {"messages": [{"role", "content"}, ...]}   a chat; loss on every assistant message
  {"text": ...}                      plain text; loss on all of it
With ``template: auto`` prompt/response pairs go through the tokenizer's chat template when it has
one, and are concatenated as they are otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bitconvert.utils.io import atomic_directory, atomic_write_json, atomic_write_text
from bitconvert.utils.progress import Progress

log = logging.getLogger(__name__)

IGNORE = -100
SUMMARY = "finetune.json"


class FinetuneDataError(ValueError):
    """A fine-tuning data file is missing or has rows of an unknown shape."""


class FinetuneConfig(BaseModel):
    """LoRA hyper-parameters and the training budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(default=16, gt=0, description="LoRA rank r")
    alpha: float = Field(default=32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | None = Field(default=None, description="leaf module names; default: every packed linear")
    epochs: float = Field(default=3.0, gt=0, description="passes over the data (ignored when steps is set)")
    steps: int | None = Field(default=None, gt=0, description="optimizer steps (overrides epochs)")
    batch_size: int = Field(default=4, gt=0, description="examples per micro-batch")
    grad_accum: int = Field(default=1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(default=2e-4, gt=0, description="peak learning rate (AdamW), cosine decay to 10%")
    warmup_steps: int = Field(default=10, ge=0, description="linear warmup")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay on the adapters")
    max_length: int = Field(default=1024, gt=8, description="tokens per example; longer ones are cut at the end")
    template: Literal["auto", "chat", "plain"] = Field(default="auto", description="how prompt/response rows are rendered")
    seed: int = Field(default=0, description="adapter init and data order")
    log_every: int = Field(default=10, gt=0, description="steps between log lines")

    @model_validator(mode="after")
    def _targets(self) -> "FinetuneConfig":
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is empty; leave it out to adapt every packed linear")
        return self


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class FinetuneResult:
    output: Path
    steps: int
    examples: int
    response_tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- data

def _render_chat(tokenizer, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    Each assistant span runs from the end of the rendered history plus generation prompt to the end
    of the rendered history including that turn, so it covers the end-of-turn marker too (the model
    must learn to stop). That needs a template whose renders of a prefix are prefixes of the full
    render, which holds for the usual chat templates; anything else is an error that says so.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise FinetuneDataError(f"{where}: 'messages' rows need a tokenizer with a chat template")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise FinetuneDataError(f"{where}: message {i} needs 'role' and 'content'")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        end = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (full.startswith(start) and full.startswith(end) and len(end) > len(start)):
            raise FinetuneDataError(f"{where}: the chat template does not render conversations prefix by prefix; "
                                    "use prompt/response rows with template 'plain'")
        spans.append((len(start), len(end)))
    if not spans:
        raise FinetuneDataError(f"{where}: no assistant message to learn from")
    return full, spans


def _encode(tokenizer, text: str, spans: list[tuple[int, int]], plain: bool, max_length: int) -> Example:
    """Tokenize ``text``; a token is a label when it starts inside one of the character ``spans``.

    Chat renders already hold their special tokens; plain text gets the tokenizer's own (BOS) and
    an end-of-sequence token that is part of the response, so that the model learns to stop.
    """
    encoded = tokenizer(text, add_special_tokens=plain, return_offsets_mapping=True)
    ids, labels = [], []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        ids.append(token)
        labels.append(token if end > start and any(a <= start < b for a, b in spans) else IGNORE)
    eos = tokenizer.eos_token_id
    if plain and eos is not None:
        if ids and ids[-1] == eos:
            labels[-1] = eos
        else:
            ids.append(eos)
            labels.append(eos)
    return Example(ids[:max_length], labels[:max_length])


def encode_row(row: dict[str, Any], tokenizer, template: str = "auto", max_length: int = 1024,
               where: str = "row") -> Example:
    """One data row as token ids and labels (``-100`` outside the response)."""
    if not isinstance(row, dict):
        raise FinetuneDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if "messages" in row:
        text, spans = _render_chat(tokenizer, row["messages"], where)
        return _encode(tokenizer, text, spans, plain=False, max_length=max_length)
    if "prompt" in row and "response" in row:
        prompt, response = str(row["prompt"]), str(row["response"])
        if template == "chat" or (template == "auto" and has_chat):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            text, spans = _render_chat(tokenizer, messages, where)
            return _encode(tokenizer, text, spans, plain=False, max_length=max_length)
        return _encode(tokenizer, prompt + response, [(len(prompt), len(prompt) + len(response))], plain=True,
                       max_length=max_length)
    if "text" in row:
        text = str(row["text"])
        return _encode(tokenizer, text, [(0, len(text))], plain=True, max_length=max_length)
    raise FinetuneDataError(f"{where}: a row needs 'prompt' and 'response', 'messages', or 'text' (has {sorted(row)})")


def load_examples(path: str | os.PathLike, tokenizer, template: str = "auto", max_length: int = 1024) -> list[Example]:
    """Read a .jsonl (or .json list) file into examples; rows left with no response tokens are dropped."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneDataError(f"fine-tuning data {path} does not exist")
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        numbered = [(f"{path} item {i}", row) for i, row in enumerate(rows if isinstance(rows, list) else [])]
    else:
        numbered = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise FinetuneDataError(f"{path}:{number} is not valid JSON: {err}") from None
    examples = [encode_row(row, tokenizer, template, max_length, where) for where, row in numbered]
    kept = [e for e in examples if any(label != IGNORE for label in e.labels)]
    if len(kept) < len(examples):
        log.warning("%d of %d examples have no response tokens left within max_length=%d and were dropped",
                    len(examples) - len(kept), len(examples), max_length)
    if not kept:
        raise FinetuneDataError(f"{path} holds no usable examples")
    return kept


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and of the loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------- adapters

def lora_config(model, config: FinetuneConfig):
    """peft ``LoraConfig`` for ``model`` (a loaded packed export), with packed layers registered."""
    from peft import LoraConfig

    from bitconvert.layers.lora import packed_target_modules, register_packed_lora

    targets = config.target_modules or packed_target_modules(model)
    if not targets:
        raise FinetuneDataError("the model has no packed linear layers; fine-tune a bitconvert export folder")
    return register_packed_lora(LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                           target_modules=targets, task_type="CAUSAL_LM", bias="none"))


def load_adapter(model, adapter_dir: str | os.PathLike, *, is_trainable: bool = False):
    """``PeftModel.from_pretrained`` for a bitconvert export: registers the packed-layer LoRA class
    on the saved config first (peft does not store that mapping)."""
    from peft import PeftConfig, PeftModel

    from bitconvert.layers.lora import register_packed_lora

    config = register_packed_lora(PeftConfig.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=is_trainable)


# --------------------------------------------------------------------------- training

def _learning_rate(config: FinetuneConfig, step: int, total: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    floor = 0.1 * config.lr
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _card(model_dir: str, data: str, config: FinetuneConfig, result: FinetuneResult, trainable: int) -> str:
    loss = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    return "\n".join([
        "---", "library_name: peft", "tags: [lora, bitconvert]", "---", "",
        f"# LoRA adapter for {model_dir}", "",
        f"Trained by `bitconvert finetune` on **{data}** ({result.examples} examples, {result.response_tokens:,} "
        f"response tokens): {result.steps} steps in {result.seconds:.0f} s, final training loss {loss}. The base "
        "model's packed weights are frozen and unchanged; the adapter adds "
        f"{trainable:,} parameters (rank {config.rank}, alpha {config.alpha:g}, dropout {config.dropout:g}).", "",
        "## Loading", "",
        "```python", "import bitconvert", "from bitconvert.train.finetune import load_adapter", "",
        f"base, tokenizer = bitconvert.load_model('{model_dir}')",
        "model = load_adapter(base, '<this folder>')  # PeftModel.from_pretrained with packed layers registered",
        "```", "",
        f"or `bitconvert generate {model_dir} \"...\" --adapter <this folder>`.", ""])


def finetune(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
             config: FinetuneConfig | None = None, *, device: str | None = None):
    """Train LoRA adapters on ``data`` over the frozen packed model in ``model_dir``; save them to ``out``.

    Returns ``(result, peft_model)``: the model is the trained adapter on its base, in eval mode.
    """
    from peft import get_peft_model

    from bitconvert.sources import load_model

    config = config or FinetuneConfig()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, tokenizer = load_model(model_dir, dtype=dtype, device=device)
    examples = load_examples(data, tokenizer, config.template, config.max_length)

    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, lora_config(model, config))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    for p in trainable:  # adapters train in float32 whatever the base dtype
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    per_step = config.batch_size * config.grad_accum
    total = config.steps or max(1, math.ceil(config.epochs * len(examples) / per_step))
    log.info("fine-tuning %s: %d examples, %d steps, %s trainable parameters", model_dir, len(examples), total,
             f"{sum(p.numel() for p in trainable):,}")

    order_rng = random.Random(config.seed)
    order: list[int] = []
    result = FinetuneResult(Path(out), 0, len(examples), sum(sum(l != IGNORE for l in e.labels) for e in examples), 0.0)
    progress = Progress(total_steps=total, desc="finetune")
    peft_model.train()
    # A Mixture-of-Depths export keeps deciding per token as it will at inference (not by training
    # top-k): the adapters should learn on the routing they will see.
    from bitconvert.mod import routed_blocks

    for block in routed_blocks(peft_model).values():
        block.mod_router.eval()
    start = time.perf_counter()
    tokens = 0
    for step in range(total):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step, total)
        step_loss = 0.0
        for _ in range(config.grad_accum):
            batch_ids = []
            while len(batch_ids) < config.batch_size:
                if not order:
                    order = list(range(len(examples)))
                    order_rng.shuffle(order)
                batch_ids.append(order.pop())
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in batch_ids],
                                                         tokenizer.pad_token_id).items()}
            loss = peft_model(**batch).loss / config.grad_accum
            loss.backward()
            step_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(step_loss)
        progress.update(step + 1, tokens, time.perf_counter() - start, loss=step_loss)
        if (step + 1) % config.log_every == 0 or step + 1 == total:
            log.info("step %d/%d loss %.4f", step + 1, total, step_loss)
    progress.close()
    result.steps, result.seconds = total, time.perf_counter() - start
    peft_model.eval()

    with atomic_directory(out) as tmp:
        peft_model.save_pretrained(tmp)
        atomic_write_text(Path(tmp) / "README.md", _card(str(model_dir), str(data), config, result,
                                                         sum(p.numel() for p in trainable)))
        atomic_write_json(Path(tmp) / SUMMARY, {
            "base_model": str(model_dir), "data": str(data), "config": config.model_dump(),
            "steps": result.steps, "examples": result.examples, "response_tokens": result.response_tokens,
            "seconds": round(result.seconds, 3), "losses": result.losses})
    log.info("saved adapter to %s", out)
    return result, peft_model
