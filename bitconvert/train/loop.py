"""The quantization-aware training loop, on one device or many through accelerate.

The student is a converted model (BitLinear layers holding full-precision latent weights); the
teacher, when distilling, is the frozen original. Budgets are optimizer steps, tokens or minutes.
Every optimizer step is a pure function of the step number and the checkpointed state (data order,
learning rate, quantization strength), except under a minutes budget, whose schedule follows the
clock.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from bitconvert.convert import name_matches, set_quant_strength
from bitconvert.layers.bitlinear import LOG_STEP_SUFFIX
from bitconvert.mod import calibrate_decisions, capacity_schedule, mod_config, set_mod_capacity
from bitconvert.recipes.loading import RecipeError
from bitconvert.recipes.schema import TrainConfig
from bitconvert.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from bitconvert.train.compiling import compile_student
from bitconvert.train.data import TrainingData
from bitconvert.train.head_loss import ChunkedHead, head_loss_support, head_losses, no_logits
from bitconvert.train.losses import AttentionInputs, attention_relation_kl, hidden_mse, logit_kl, next_token_ce
from bitconvert.utils.io import atomic_write_text
from bitconvert.utils.progress import Progress

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    interrupted: bool
    checkpoint: Path | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None  # the student as accelerate prepared it (DDP/FSDP wrapper); FSDP's root unit lives only here


class ResumeError(ValueError):
    """A checkpoint does not belong to this run (other data, other batch layout)."""


# --------------------------------------------------------------------------- schedules

STAGE1_END = 0.5  # two_stage: stage 1 decays from lr to half of it (2B4T: 1.5e-3 to 8e-4)


def _cosine(start: float, end: float, p: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over ``warmup_steps``, then decay to ``lr * min_lr_ratio`` as progress goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1 - p)
    if cfg.schedule == "two_stage":
        if p < cfg.cooldown_at:
            return _cosine(cfg.lr, cfg.lr * STAGE1_END, p / cfg.cooldown_at)
        return _cosine(cfg.lr * cfg.cooldown_lr_ratio, floor, (p - cfg.cooldown_at) / (1 - cfg.cooldown_at))
    return _cosine(cfg.lr, floor, p)


def weight_decay_on(cfg: TrainConfig, progress: float) -> bool:
    """The two-stage schedule trains its cooldown without weight decay (as 2B4T does); others throughout."""
    return cfg.schedule != "two_stage" or progress < cfg.cooldown_at


def batch_size_at(cfg: TrainConfig, progress: float) -> int:
    """Sequences per micro-batch: ``batch_ramp.start``, doubling in equal parts of the ramp's share of the
    budget, then ``batch_size``."""
    ramp = cfg.batch_ramp
    if ramp is None or progress >= ramp.share:
        return cfg.batch_size
    doublings = (cfg.batch_size // ramp.start).bit_length() - 1
    return ramp.start * 2 ** int(progress / ramp.share * doublings)


def planned_steps(cfg: TrainConfig, sequence_length: int, world: int) -> int | None:
    """Optimizer steps of a steps or tokens budget (None for minutes), replaying the batch ramp if any."""
    if cfg.steps or not cfg.tokens:
        return cfg.steps
    per_sequence = sequence_length * cfg.grad_accum * world
    steps, tokens = 0, 0
    while cfg.batch_ramp is not None and tokens / cfg.tokens < cfg.batch_ramp.share:  # share < 1: inside the budget
        tokens += batch_size_at(cfg, tokens / cfg.tokens) * per_sequence
        steps += 1
    return steps + max(0, math.ceil((cfg.tokens - tokens) / (cfg.batch_size * per_sequence)))


def quant_strength(cfg: TrainConfig, step: int, progress: float) -> float:
    """Gradual quantization: 0 -> 1 over ``quant_warmup_steps``, and fully ternary by half the budget
    at the latest, so that the model always trains in its final form for a while."""
    if cfg.quant_warmup_steps == 0:
        return 1.0
    return min(1.0, max(step / cfg.quant_warmup_steps, 2.0 * progress))


# --------------------------------------------------------------------------- Ctrl-C

class StopOnInterrupt:
    """First Ctrl-C asks the loop to checkpoint and stop after the current step; a second one aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# --------------------------------------------------------------------------- losses

def compute_losses(student, teacher, input_ids: torch.Tensor, cfg: TrainConfig,
                   head: ChunkedHead | None = None) -> dict[str, torch.Tensor]:
    """The weighted training loss and its terms for one micro-batch.

    With ``head`` (see :func:`chunked_head`), KL and CE come from the final hidden states chunk by chunk
    (:func:`head_losses`) and the student never computes its full logits; the terms are the same.
    """
    weights = cfg.loss
    distill = teacher is not None and cfg.mode == "distill"
    need_hidden = distill and weights.hidden > 0
    need_attention = distill and weights.attention > 0
    need_ce = weights.ce > 0 or not distill
    need_kl = distill and weights.kl > 0
    logits_kwargs = {"logits_to_keep": no_logits(input_ids)} if head is not None else {}

    def keep(model):  # the q/k/v projections' outputs of one layer, when the attention-relation loss wants them
        return AttentionInputs(model, weights.attention_layer) if need_attention else nullcontext()

    with keep(student) as student_attention:
        out = student(input_ids=input_ids, output_hidden_states=need_hidden, use_cache=False, **logits_kwargs)
    terms: dict[str, torch.Tensor] = {}
    if need_ce and head is None:
        terms["ce"] = next_token_ce(out.logits, input_ids)
    reference = None
    if distill and (need_kl or need_hidden or need_attention):
        teacher_kwargs = logits_kwargs if head is not None and head.teacher is not None else {}
        with torch.no_grad(), keep(teacher) as teacher_attention:
            reference = teacher(input_ids=input_ids, output_hidden_states=need_hidden, use_cache=False, **teacher_kwargs)
        if need_kl and head is None:
            terms["kl"] = logit_kl(out.logits, reference.logits, weights.temperature)
        if need_hidden:
            terms["hidden"] = hidden_mse(out.hidden_states, reference.hidden_states)
        if need_attention:
            terms["attention"] = attention_relation_kl(student_attention.states, teacher_attention.states,
                                                       teacher_attention.head_dim)
    fused = None
    if head is not None:
        hidden, dtype = head.student.take()
        teacher_inputs = {}
        if need_kl and head.teacher is not None:
            teacher_hidden, teacher_dtype = head.teacher.take()
            teacher_inputs = {"teacher_hidden": teacher_hidden, "teacher_weight": head.teacher.head.weight,
                              "teacher_dtype": teacher_dtype}
        elif need_kl:
            teacher_inputs = {"teacher_logits": reference.logits}
        elif head.teacher is not None and reference is not None:
            head.teacher.take()
        if need_kl or need_ce:
            ce_weight = weights.ce if distill else 1.0
            fused, kl, ce = head_losses(hidden, head.student.head.weight, input_ids, temperature=weights.temperature,
                                        kl_weight=weights.kl if need_kl else 0.0, ce_weight=ce_weight if need_ce else 0.0,
                                        dtype=dtype, compiled=head.compiled, **teacher_inputs)
            # logged terms, as the plain path gives them; the gradient flows through ``fused``
            terms.update({**({"ce": ce} if need_ce else {}), **({"kl": kl} if need_kl else {})})
    if not distill:  # continued pretraining: cross-entropy is the whole objective
        terms["loss"] = fused if fused is not None else terms["ce"]
    else:
        rest = {k: v for k, v in terms.items() if fused is None or k not in ("kl", "ce")}
        terms["loss"] = sum(getattr(weights, k) * v for k, v in rest.items()) + (fused if fused is not None else 0)
    aux = auxiliary_loss(student)
    if aux is not None:
        terms["aux"] = aux
        terms["loss"] = terms["loss"] + aux
    return terms


def chunked_head(student, teacher, cfg: TrainConfig, accelerator, probe_ids: torch.Tensor) -> ChunkedHead | None:
    """The chunked head loss for this run, or None (the plain path: full logits) with the reason logged.

    ``student`` and ``teacher`` are the unwrapped modules; ``probe_ids`` (1, tokens) on their device feed
    one small forward pass that checks the logits really are ``final_hidden @ lm_head.weight.T``.
    """
    from accelerate.utils import DistributedType

    def off(reason: str) -> None:
        log.debug("chunked head loss off, full logits instead: %s", reason)

    if not cfg.fused_loss:
        return off("train.fused_loss is false")
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        # the head weight is gathered only inside the wrapped forward pass
        return off(f"{accelerator.distributed_type.value} shards the head weight")
    reason = head_loss_support(student, probe_ids)
    if reason is not None:
        return off(f"student: {reason}")
    if teacher is not None:
        reason = head_loss_support(teacher, probe_ids)
        if reason is not None:
            log.debug("chunked head loss takes the teacher's full logits: %s", reason)
            teacher = None
    log.debug("chunked head loss on (teacher: %s)", "final hidden states" if teacher is not None else "full logits")
    return ChunkedHead(student, teacher, compiled=cfg.compile is not False)


def auxiliary_loss(model) -> torch.Tensor | None:
    """Sum of the ``aux_loss`` tensors that modules set during the last forward pass (already weighted
    by the module; routers such as Mixture-of-Depths use this), or None when there are none."""
    found = [m.aux_loss for m in model.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)]
    return torch.stack([a.float() for a in found]).sum() if found else None


def prepare_teacher(teacher, accelerator):
    """Put the frozen teacher where the student is. Under FSDP it is sharded like the student;
    otherwise every process holds a copy (DDP would only add gradient hooks it never uses)."""
    teacher.requires_grad_(False).eval()
    if accelerator.distributed_type != DistributedType.FSDP:
        return teacher.to(accelerator.device)
    wrapped = accelerator.prepare_model(teacher)
    # accelerate checkpoints every prepared model; the teacher never changes, so keep it out.
    accelerator._models.remove(wrapped)
    return wrapped.eval()


@torch.no_grad()
def held_out_loss(model, blocks: torch.Tensor, batch_size: int, accelerator, desc: str | None = None) -> float:
    """Mean next-token loss over ``blocks``, split across processes.

    Every process runs the same number of forward passes (sharded models need all of them in
    each collective); padding batches repeat block 0 and count for nothing. ``desc``: show a bar that
    goes away when done (on a CPU the whole of WikiText-2's test set takes minutes).
    """
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = -(-len(blocks) // world)
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    starts = range(0, per_rank, batch_size)
    progress = Progress(total_steps=len(starts), desc=desc or "", leave=False,
                        enabled=desc is not None and accelerator.is_main_process)
    for batch, start in enumerate(starts):
        index = torch.arange(start, min(start + batch_size, per_rank)) * world + rank
        real = index < len(blocks)
        ids = blocks[torch.where(real, index, torch.zeros_like(index))].to(accelerator.device)
        logits = model(input_ids=ids, use_cache=False).logits
        per_row = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                                    reduction="none").sum(dim=1)
        total[0] += per_row[real.to(per_row.device)].double().sum()
        total[1] += real.sum().item() * (ids.shape[1] - 1)
        progress.update(batch + 1, (batch + 1) * ids.numel() * world, 0.0)
    progress.close()
    total = accelerator.reduce(total, "sum") if accelerator.num_processes > 1 else total
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


# --------------------------------------------------------------------------- the loop

def _metrics_upto(path: Path, step: int) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                rows.append(row)
    return rows


def freeze_parameters(model, patterns: Sequence[str]) -> list[str]:
    """Stop training the parameters that ``patterns`` name (see ``train.freeze``); returns their names.
    A pattern that names nothing is a typo, and an error before any training is spent."""
    frozen, used, newly = [], set(), 0
    # remove_duplicate=False: a tied head is listed under its own name too, so `lm_head` finds it
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = name.rpartition(".")[0]
        hits = {p for p in patterns if name_matches(name, [p]) or (owner and name_matches(owner, [p]))}
        if hits:
            newly += param.requires_grad
            param.requires_grad_(False)
            frozen.append(name)
            used |= hits
    unused = [pattern for pattern in patterns if pattern not in used]
    if unused:
        example = next(name for name, _ in model.named_parameters())
        raise RecipeError(f"train.freeze: {unused} match no parameter of {type(model).__name__} "
                         f"(names look like {example!r})")
    if newly:  # said once, however often it is called
        log.info("train.freeze: %d parameter tensors left as they are (%s%s)", len(frozen), ", ".join(frozen[:3]),
                 ", ..." if len(frozen) > 3 else "")
    return frozen


def scores_on_main(score: Callable[[Any], dict[str, float]], model, accelerator) -> dict[str, float]:
    """``score(model)`` run by the main process alone (the others wait and receive its result), eager
    (compiled blocks would recompile for every new batch shape), under the run's autocast."""
    scores = None
    if accelerator.is_main_process:
        with torch.no_grad(), accelerator.autocast(), torch.compiler.set_stance("force_eager"):
            scores = score(model)
    if accelerator.num_processes > 1:  # every rank logs the same rows, so that they stay in step
        from accelerate.utils import broadcast_object_list

        scores = broadcast_object_list([scores], from_process=0)[0]
    return scores


def train(student, teacher, data: TrainingData, cfg: TrainConfig, run_dir: str | Path, *, accelerator,
          resume: bool = False, eval_batch_size: int = 8, tracker: Callable[[Any], dict[str, float]] | None = None,
          track_every: int = 0) -> TrainResult:
    """Train ``student`` (already converted) in place. Returns when the budget is spent or on Ctrl-C.

    ``tracker``: scores a model on downstream tasks (:class:`bitconvert.eval.TaskTracker`); the teacher is
    scored once, the student every ``track_every`` steps and at the end, into the metrics.
    """
    run_dir = Path(run_dir)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    seq = data.sequence_length
    total_steps = planned_steps(cfg, seq, world)
    budget_seconds = cfg.minutes * 60 if cfg.minutes else None

    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    freeze_parameters(student, cfg.freeze)
    trained = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2 and not n.endswith(LOG_STEP_SUFFIX)]
    no_decay = [p for n, p in trained if p.ndim < 2 or n.endswith(LOG_STEP_SUFFIX)]
    # group 0 decays, group 1 (norms, biases, learned steps: decay would pull a log step to 0) never: the
    # loop sets each group's weight decay by its index
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                  fused=accelerator.device.type == "cuda")
    student, optimizer = accelerator.prepare(student, optimizer)
    if teacher is not None:
        teacher = prepare_teacher(teacher, accelerator)
    head = None
    if cfg.mode != "none":
        probe = data.batch(0, 1)[:, :16].to(accelerator.device)
        head = chunked_head(accelerator.unwrap_model(student), teacher if cfg.mode == "distill" else None, cfg,
                            accelerator, probe)
    student = compile_student(student, cfg.compile, accelerator.unwrap_model(student))
    if tracker is not None and accelerator.distributed_type == DistributedType.FSDP:
        log.warning("eval.track_every: the student is sharded across processes (FSDP), so its tasks are scored "
                    "after the export only")
        tracker = None

    run_signature = {"fingerprint": data.fingerprint, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                     "world": world, "sequence_length": seq}
    if cfg.freeze:  # the optimizer holds state for the trained parameters only
        run_signature["freeze"] = list(cfg.freeze)
    if cfg.batch_ramp is not None:  # the data order depends on it
        run_signature["batch_ramp"] = cfg.batch_ramp.model_dump()
    step, tokens, elapsed = 0, 0, 0.0
    metrics_path = run_dir / METRICS_FILE
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", run_dir)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        # both ways: a setting only one of the two runs has (freeze, batch_ramp) is a mismatch too
        mismatch = {k: (state["signature"].get(k), run_signature.get(k)) for k in {**state["signature"], **run_signature}
                    if state["signature"].get(k) != run_signature.get(k)}
        if mismatch:
            raise ResumeError(f"checkpoint {checkpoint} was made with other settings: " +
                              ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in mismatch.items()))
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed_seconds"]
    metrics = _metrics_upto(metrics_path, step)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in metrics))

    def progress_fraction() -> float:
        if cfg.tokens and not cfg.steps:
            return tokens / cfg.tokens
        if total_steps:
            return step / total_steps
        return elapsed / budget_seconds

    def log_row(row: dict[str, Any]) -> None:
        metrics.append(row)
        if main:
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    def logged(key: str) -> bool:
        return any(r.get("step") == step and key in r for r in metrics)

    def track() -> None:
        log_row({"step": step, "tokens": tokens, "tasks": scores_on_main(tracker, accelerator.unwrap_model(student),
                                                                           accelerator)})
        student.train()

    def snapshot() -> Path:
        state = {"step": step, "tokens": tokens, "elapsed_seconds": elapsed, "signature": run_signature}
        return save_checkpoint(accelerator, run_dir, step, state, cfg.keep_checkpoints)

    if data.eval_blocks is not None and teacher is not None and step == 0 and not any("teacher_ppl" in r for r in metrics):
        teacher_loss = held_out_loss(teacher, data.eval_blocks, eval_batch_size, accelerator, desc="held-out loss, teacher")
        log_row({"step": 0, "tokens": 0, "teacher_ppl": math.exp(teacher_loss)})
    if tracker is not None and teacher is not None and step == 0 and not any("teacher_tasks" in r for r in metrics):
        log_row({"step": 0, "tokens": 0, "teacher_tasks": scores_on_main(tracker, teacher, accelerator)})

    progress = Progress(total_steps=total_steps, total_seconds=budget_seconds, initial_step=step,
                        initial_seconds=elapsed, enabled=main)
    last_save_time = time.monotonic()
    interrupted = False
    last_checkpoint = checkpoint
    last_logged = (step, tokens, elapsed)
    last_strength = None
    routing = mod_config(accelerator.unwrap_model(student))  # Mixture-of-Depths: capacity warmup, decision calibration
    with StopOnInterrupt() as stop, (head if head is not None else nullcontext()):
        while True:
            done = ((cfg.tokens is not None and tokens >= cfg.tokens) or (cfg.steps is not None and step >= cfg.steps)
                    or (budget_seconds is not None and elapsed >= budget_seconds))
            stop_now, done_now = stop.requested, done
            if world > 1:  # one rank's Ctrl-C or clock stops everyone at the same step
                flags = accelerator.reduce(torch.tensor([float(stop_now), float(done)], device=accelerator.device), "max")
                stop_now, done_now = bool(flags[0] > 0), bool(flags[1] > 0)
            if stop_now:
                interrupted = True
                break
            if done_now:
                break
            tick = time.perf_counter()
            p = progress_fraction()
            lr = learning_rate(cfg, step, p)
            decay_now = weight_decay_on(cfg, p)
            for index, group in enumerate(optimizer.param_groups):
                group["lr"] = lr
                group["weight_decay"] = cfg.weight_decay if index == 0 and decay_now else 0.0
            batch_size = batch_size_at(cfg, p)
            strength = quant_strength(cfg, step, p)
            if strength != last_strength:  # a fill per quantized layer; after the warmup it stays at 1
                set_quant_strength(accelerator.unwrap_model(student), strength)
                last_strength = strength
            capacity = capacity_schedule(routing, p) if routing is not None else None
            if capacity is not None:
                set_mod_capacity(accelerator.unwrap_model(student), capacity)
            # Loss terms stay on the device between log rows: a .item() per step would make the host
            # wait for the GPU every step, and a small model is then bound by kernel launches.
            sums: dict[str, torch.Tensor] = {}
            consumed = tokens // seq  # blocks all ranks took so far: the data order survives a batch ramp and --resume
            for micro in range(cfg.grad_accum):
                ids = data.blocks(consumed + (micro * world + rank) * batch_size, batch_size)
                if accelerator.device.type == "cuda":
                    ids = ids.pin_memory().to(accelerator.device, non_blocking=True)
                else:
                    ids = ids.to(accelerator.device)
                sync = accelerator.no_sync(student) if micro < cfg.grad_accum - 1 and world > 1 else nullcontext()
                with sync:
                    terms = compute_losses(student, teacher, ids, cfg, head)
                    accelerator.backward(terms["loss"] / cfg.grad_accum)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float() / cfg.grad_accum
            if cfg.grad_clip > 0:
                sums["grad_norm"] = accelerator.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if routing is not None:
                calibrate_decisions(accelerator.unwrap_model(student),
                                    reduce=(lambda t: accelerator.reduce(t.to(accelerator.device), "mean")) if world > 1 else None)
            step += 1
            tokens += batch_size * seq * cfg.grad_accum * world
            eval_due = data.eval_blocks is not None and cfg.eval_every and step % cfg.eval_every == 0
            log_due = step % cfg.log_every == 0 or step == 1 or step == total_steps or eval_due
            if log_due:
                keys = sorted(sums)
                values = torch.stack([torch.as_tensor(sums[k], device=accelerator.device).float() for k in keys])
                if world > 1:  # log the global mean, as one process with grad_accum would see it
                    values = accelerator.reduce(values, "mean")
                stats = dict(zip(keys, values.tolist()))  # the one wait for the GPU between log rows
            elapsed += time.perf_counter() - tick
            if world > 1:  # the clock of rank 0 decides for everyone
                elapsed = float(accelerator.reduce(torch.tensor(elapsed, device=accelerator.device), "max"))
            if log_due:
                window_tokens, window_seconds = tokens - last_logged[1], elapsed - last_logged[2]
                last_logged = (step, tokens, elapsed)
                log_row({"step": step, "tokens": tokens, "elapsed": round(elapsed, 3), "lr": lr,
                         "quant_strength": strength, **({"mod_capacity": capacity} if capacity is not None else {}),
                         **({"batch_size": batch_size} if cfg.batch_ramp is not None else {}),
                         "tokens_per_second": window_tokens / max(window_seconds, 1e-9), **stats})
                progress.update(step, tokens, elapsed, loss=stats["loss"], lr=lr)
            else:
                progress.update(step, tokens, elapsed, lr=lr)
            if eval_due:
                loss = held_out_loss(student, data.eval_blocks, eval_batch_size, accelerator, desc="held-out loss")
                log_row({"step": step, "tokens": tokens, "eval_loss": loss, "eval_ppl": math.exp(loss)})
            if tracker is not None and track_every and step % track_every == 0:
                track()
            due_by_time = cfg.save_every_minutes and time.monotonic() - last_save_time > cfg.save_every_minutes * 60
            due = (cfg.save_every and step % cfg.save_every == 0) or due_by_time
            if world > 1:
                due = bool(accelerator.reduce(torch.tensor(float(bool(due)), device=accelerator.device), "max"))
            if due:
                last_checkpoint = snapshot()
                last_save_time = time.monotonic()
        if interrupted or last_checkpoint is None or not last_checkpoint.name.endswith(f"{step:07d}"):
            last_checkpoint = snapshot()
    progress.close()
    if interrupted:
        log.warning("stopped at step %d; checkpoint %s. Continue with --resume.", step, last_checkpoint)
    else:
        if data.eval_blocks is not None and not logged("eval_ppl"):
            loss = held_out_loss(student, data.eval_blocks, eval_batch_size, accelerator, desc="held-out loss")
            log_row({"step": step, "tokens": tokens, "eval_loss": loss, "eval_ppl": math.exp(loss)})
        if tracker is not None and not logged("tasks"):
            track()
    return TrainResult(steps=step, tokens=tokens, seconds=elapsed, interrupted=interrupted,
                       checkpoint=last_checkpoint, metrics=metrics, model=student)
