"""The library functions behind every CLI command."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bitconvert.convert import ConversionReport, convert_to_bitnet
from bitconvert.export.card import render_card, write_card
from bitconvert.export.packed import export_ternary, read_manifest
from bitconvert.recipes.loading import dump_recipe, save_recipe
from bitconvert.recipes.schema import Recipe
from bitconvert.sources import load_model, resolve
from bitconvert.train.loop import TrainResult
from bitconvert.train.processes import release_other_settings, wait_for_everyone

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class QuantizeResult:
    output: Path
    report: ConversionReport
    train: TrainResult | None = None
    exports: dict[str, Path] = field(default_factory=dict)
    evaluation: Any = None
    is_main_process: bool = True  # under accelerate launch, only the first process reports

    @property
    def interrupted(self) -> bool:
        return bool(self.train and self.train.interrupted)


def default_device(requested: str | None = None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator

    device = default_device(recipe.device)
    on_gpu = device.startswith("cuda")
    if on_gpu and ":" in device:
        torch.cuda.set_device(torch.device(device))
    # bf16 autocast only pays off on GPUs; on CPU it is slower and no more accurate.
    mixed_precision = recipe.train.mixed_precision if on_gpu else "no"
    release_other_settings(cpu=not on_gpu, mixed_precision=mixed_precision)
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed_precision)


def quantize(recipe: Recipe, *, resume: bool = False, accelerator=None) -> QuantizeResult:
    """Convert ``recipe.model`` to BitNet b1.58, train it as the recipe says, and export it.

    Training state (checkpoints, metrics, curves) lives in ``<output>/training``; with
    ``resume=True`` a stopped run continues from its newest checkpoint.
    """
    from bitconvert.train.data import build_training_data
    from bitconvert.train.loop import freeze_parameters, train

    out = Path(recipe.output)
    run_dir = out / "training"
    resolve(recipe.model)  # fail on a bad model spec before anything else
    accelerator = accelerator or make_accelerator(recipe)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out / "recipe.yaml")
    start = time.perf_counter()

    student, tokenizer = load_model(recipe.model, dtype=torch.float32, device="cpu")
    mode = recipe.train.mode
    tracker = None
    if recipe.eval.track_every:  # loads the tasks now: a bad name or a missing file fails before training
        from bitconvert.eval import TaskTracker

        tracker = TaskTracker(recipe.eval.tasks, tokenizer, limit=recipe.eval.track_limit or recipe.eval.limit,
                              batch_size=recipe.eval.batch_size, data_dir=recipe.eval.data_dir)
    teacher = None
    if mode == "distill":
        # A second load rather than a copy: the teacher needs no float32 master weights, and an 8B
        # model's two float32 copies per process would not fit in host memory on 8 GPUs.
        on_gpu = accelerator.device.type == "cuda"
        teacher, _ = load_model(recipe.model, dtype=torch.bfloat16 if on_gpu else torch.float32, device="cpu")
    report = convert_to_bitnet(student, recipe.convert.quant_spec(), recipe.convert.skip,
                               mixture_of_depths=recipe.convert.mixture_of_depths)
    freeze_parameters(student, recipe.train.freeze)  # a pattern that names nothing fails before data and sampling
    result = QuantizeResult(output=out, report=report, is_main_process=main)

    if mode != "none":
        device = accelerator.device
        if teacher is not None and main and any(s.generate for s in recipe.data.train):
            teacher.to(device)  # only the main process samples teacher text
        data = build_training_data(recipe.data, tokenizer, seed=recipe.train.seed, cache_dir=run_dir / "data",
                                   teacher=teacher, device=device, is_main=main,
                                   wait=partial(wait_for_everyone, accelerator))
        result.train = train(student, teacher, data, recipe.train, run_dir, accelerator=accelerator, resume=resume,
                             eval_batch_size=recipe.eval.batch_size, tracker=tracker,
                             track_every=recipe.eval.track_every)
        teacher = None  # FSDP wraps the blocks in place: neither original may outlive the process group
        if result.train.interrupted:
            student = None
            _end_processes(accelerator, result)
            return result
        student = _gather_student(result.train.model, recipe, accelerator)
    if main:
        result.exports = export_all(student, tokenizer, recipe, result, seconds=time.perf_counter() - start)
    wait_for_everyone(accelerator)
    if recipe.eval.tasks or recipe.eval.perplexity:
        from bitconvert.eval import evaluate

        if main:
            result.evaluation = evaluate(out, baseline=recipe.model, tasks=recipe.eval.tasks,
                                         perplexity_files=recipe.eval.perplexity, limit=recipe.eval.limit,
                                         batch_size=recipe.eval.batch_size, device=str(accelerator.device),
                                         data_dir=recipe.eval.data_dir)
    _end_processes(accelerator, result)
    return result


def _end_processes(accelerator, result: QuantizeResult) -> None:
    """Tear down the process group of a multi-process run, the wrapper first.

    DDP's reducer holds the process group. Were it the last holder, freeing it would destroy a gloo
    group while holding the GIL, and join worker threads that still need the GIL to free the last
    collective's tensors: a hang at exit, seen about once in 20 CPU runs. Freed here, while the group
    is still registered, it is not the last; destroy_process_group then frees the group without the GIL.
    """
    if accelerator.num_processes == 1:
        return
    if result.train is not None:
        result.train.model = None
    accelerator.free_memory()  # accelerate's own references to the prepared model and optimizer
    gc.collect()  # modules sit in reference cycles: free the wrapper now, not at some later collection
    accelerator.end_training()


def _gather_student(student, recipe: Recipe, accelerator):
    """The trained student (as ``train`` prepared it) as one plain module on the main process
    (None elsewhere).

    Under FSDP the weights are sharded across processes: gather a full state dict from the
    wrapper (the root unit's parameters, embeddings and head, exist only there) and load it into
    a freshly converted copy of the source model.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.unwrap_model(student)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Full (unsharded) tensors, gathered to the CPU of the first process only.
    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    fresh, _ = load_model(recipe.model, dtype=torch.float32, device="cpu")
    convert_to_bitnet(fresh, recipe.convert.quant_spec(), recipe.convert.skip,
                      mixture_of_depths=recipe.convert.mixture_of_depths)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(fresh.config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"gathered FSDP state does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    return fresh


def export_all(student, tokenizer, recipe: Recipe, result: QuantizeResult, seconds: float) -> dict[str, Path]:
    """Write every export format the recipe asks for, plus curves and the model card."""
    from bitconvert.export import EXPORTERS
    from bitconvert.utils.plots import plot_training_curves

    out = Path(recipe.output)
    spec = recipe.convert.quant_spec()
    student = student.to("cpu").float()
    summary = None
    if result.train is not None:
        # Before the packed export: its manifest hashes the folder's files, the curves of an earlier
        # run in this folder (continued with a larger budget) included, so they must be final by then.
        curves = plot_training_curves(out / "training" / "metrics.jsonl", out / "training_curves.png",
                                      title=f"{recipe.model} -> BitNet b1.58")
        summary = {"mode": recipe.train.mode, "steps": result.train.steps, "tokens": result.train.tokens,
                   "seconds": result.train.seconds, "curves": curves.name if curves else None}
    provenance = {"source": recipe.model, "export_dir": str(out), "conversion": result.report.summary()}
    exports = {"packed": export_ternary(student, tokenizer, out, spec, dtype=DTYPES[recipe.export.dtype],
                                        provenance=provenance)}
    for name in recipe.export.formats:
        if name != "packed":
            exports[name] = EXPORTERS[name](student, tokenizer, out, spec)
    manifest = read_manifest(out, verify=False)
    write_card(out, render_card(manifest, dump_recipe(recipe), summary))
    log.info("done in %.0f s: %s", seconds, out)
    return exports


def generate(model: str | Path, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             chat: bool = False, device: str | None = None, on_text=None, adapter: str | Path | None = None) -> str:
    """Continue ``prompt`` with a ternary export (or any model ``load_model`` accepts).

    ``on_text`` receives the new text piece by piece as it is generated. ``adapter`` is a LoRA
    folder written by ``bitconvert finetune`` (applied on top of the packed model).
    """
    from transformers import TextStreamer

    device = default_device(device)
    loaded, tokenizer = load_model(model, dtype=torch.float32 if device == "cpu" else torch.bfloat16, device=device)
    if adapter is not None:
        from bitconvert.train.finetune import load_adapter

        loaded = load_adapter(loaded, adapter).eval()
    else:  # adapters sit on the separate q/k/v layers; without them, one product per group decodes faster
        from bitconvert.layers.decoder import fuse_decoder_layers
        from bitconvert.layers.fused import fuse_projections

        fuse_projections(loaded)
        if loaded.device.type == "cuda":  # on CPU the products keep their unpacked-weight cache instead
            fuse_decoder_layers(loaded)
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    streamer = None
    if on_text is not None:
        class _Callback(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                on_text(text)

        streamer = _Callback(tokenizer, skip_prompt=True, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    with torch.no_grad():
        output = loaded.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 streamer=streamer, **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)
