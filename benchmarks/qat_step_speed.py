"""QAT distillation step speed (issue 6): the plain loss path against the chunked head loss and
regional compilation, on one GPU, in one call of a few minutes.

Every variant starts from the same converted student (the convert and train sections of
recipes/smollm2-gpu.yaml: group-64 scales, KL + 0.5 CE, batch 32 x 512), runs the training loop's
own step (``compute_losses``, backward, gradient clipping, fused AdamW) on the same batches, and
reports tokens/s and peak memory over ``--steps`` steps after ``--warmup`` steps. Its first step,
before any update, must give the plain path's loss (relative difference printed): every variant
computes the same objective. The first step of a compiled variant includes the compilation, reported
apart (compiled code is reused by a later variant with the same blocks, which then says so).

Variants: ``plain`` (full logits, eager: the loop before this change), ``fused`` (train.fused_loss),
``fused+layers`` (and each decoder block compiled: train.compile: layers), ``plain+layers``,
``fused+model`` (the whole student compiled, only with --with-model-compile, under --compile-timeout),
``fused+layers+absmean`` and ``fused+layers+twn`` (fused+layers with BitNet's absmean fit and with the TWN fit,
whatever the recipe says: what the TWN fit costs a step). The other variants take the recipe's fit.
``--random-smollm2`` builds SmolLM2-135M's architecture with random weights instead of loading it (a step's
speed does not depend on the weights' values, and no model file has to travel).

    python benchmarks/qat_step_speed.py --model /root/m/smol-hf --data-dir .data --out $OUT
    python benchmarks/qat_step_speed.py --tiny --device cpu --out /tmp/speed     # CPU smoke test, ~1 minute

Writes ``qat_step_speed.json`` (rewritten after every variant, so that a call cut short keeps what it
measured) and ``qat_step_speed.md`` under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitconvert.convert import convert_to_bitnet, set_quant_strength  # noqa: E402
from bitconvert.recipes.schema import ConvertConfig, TrainConfig  # noqa: E402
from bitconvert.train.compiling import compile_student  # noqa: E402
from bitconvert.train.loop import (  # noqa: E402
    chunked_head,
    compute_losses,
    learning_rate,
    prepare_teacher,
)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-gpu.yaml"
VARIANTS = {  # name: (train.fused_loss, train.compile[, convert.ternary_fit])
    "plain": (False, False),
    "fused": (True, False),
    "fused+layers": (True, "layers"),
    "plain+layers": (False, "layers"),
    "fused+model": (True, "model"),
    "fused+layers+absmean": (True, "layers", "absmean"),
    "fused+layers+twn": (True, "layers", "twn"),
}
DEFAULT_VARIANTS = ("plain", "fused", "fused+layers", "plain+layers")
# Where WikiText-2 may lie under --data-dir: the project's layout first (shared/data), then the original names.
TEXT_NAMES = ("valid.txt", "wikitext-2/valid.txt", "wiki.valid.tokens", "wikitext-2/wiki.valid.tokens",
              "wiki.valid.raw", "wikitext-2-raw/wiki.valid.raw", "train.txt", "wiki.train.tokens")


class Timeout(Exception):
    pass


def recipe_sections(path: Path = RECIPE) -> tuple[ConvertConfig, dict]:
    """The convert section and the train settings that shape a step (batch, loss, optimizer)."""
    import yaml

    recipe = yaml.safe_load(path.read_text())
    train = {k: v for k, v in recipe.get("train", {}).items()
             if k in ("batch_size", "lr", "loss", "weight_decay", "grad_clip", "warmup_steps", "quant_warmup_steps",
                      "schedule", "min_lr_ratio")}
    return ConvertConfig(**recipe.get("convert", {})), train


def tiny_model(vocab: int = 512):
    """A random-init Llama shaped like a very small SmolLM2 (tied embeddings), for CPU smoke runs."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def random_smollm2():
    """SmolLM2-135M's architecture (Llama, hidden 576, 30 layers, 9 heads / 3 KV heads, vocab 49152, tied
    embeddings) with random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def find_text(data_dir: Path | None) -> Path | None:
    if data_dir is None:
        return None
    for name in TEXT_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def token_blocks(args, tokenizer, vocab: int) -> tuple[torch.Tensor, str]:
    """Training blocks (n, sequence_length): WikiText-2 tokenized as the loop's data does, or random
    tokens when no text is found (a step's speed does not depend on what the tokens say)."""
    text = find_text(args.data_dir)
    if text is not None and tokenizer is not None:
        from bitconvert.recipes.schema import DataConfig, DataSource
        from bitconvert.train.data import build_training_data

        data = build_training_data(DataConfig(train=[DataSource(path=str(text))], sequence_length=args.sequence_length),
                                   tokenizer, seed=0, cache_dir=args.work)
        return data.pool, str(text)
    if args.data_dir is not None and text is None:
        print(f"WARNING: no WikiText-2 file under {args.data_dir} (looked for {', '.join(TEXT_NAMES)}); "
              "random tokens instead", flush=True)
    blocks = torch.randint(0, vocab, (max(64, args.batch_size * 4), args.sequence_length),
                           generator=torch.Generator().manual_seed(0))
    return blocks, "random tokens"


def batches(blocks: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
    index = (torch.arange(batch_size) + step * batch_size) % len(blocks)
    return blocks[index]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_variant(name: str, args, original, teacher, blocks, convert: ConvertConfig, train_settings: dict,
                compiled_before: set, seconds_left: float) -> dict:
    """One variant: a fresh student, the loop's step ``1 + warmup + steps`` times."""
    from accelerate import Accelerator

    fused, compile_mode, *fit = VARIANTS[name]
    if fit:
        convert = convert.model_copy(update={"ternary_fit": fit[0]})
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    cfg = TrainConfig(mode="distill", steps=1, compile=compile_mode, fused_loss=fused,
                      batch_size=args.batch_size, **{k: v for k, v in train_settings.items() if k != "batch_size"},
                      mixed_precision="bf16" if on_gpu else "no")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision if on_gpu else "no", cpu=not on_gpu)
    student = copy.deepcopy(original)
    convert_to_bitnet(student, convert.quant_spec(), convert.skip)
    student.train()
    decay = [p for p in student.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=on_gpu)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher = prepare_teacher(teacher, accelerator)
    probe = blocks[:1, :16].to(device)
    head = chunked_head(accelerator.unwrap_model(student), teacher, cfg, accelerator, probe) if fused else None
    if fused and head is None:
        raise RuntimeError("the chunked head loss does not apply to this model (run with --debug for the reason)")
    student = compile_student(student, compile_mode, accelerator.unwrap_model(student))
    blocks_key = (compile_mode, type(accelerator.unwrap_model(student)).__name__, convert.ternary_fit)
    reused = compile_mode is not False and blocks_key in compiled_before

    def step(index: int) -> dict[str, torch.Tensor]:
        progress = index / (1 + args.warmup + args.steps)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, index, progress)
        # the warmup's blend, as the loop's first steps have it (the kernels are the same at any strength)
        set_quant_strength(accelerator.unwrap_model(student), min(1.0, index / max(cfg.quant_warmup_steps, 1)))
        ids = batches(blocks, index, cfg.batch_size)
        ids = ids.pin_memory().to(device, non_blocking=True) if on_gpu else ids.to(device)
        terms = compute_losses(student, teacher, ids, cfg, head)
        accelerator.backward(terms["loss"])
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return terms

    out = {"variant": name, "fused_loss": fused, "compile": compile_mode, "batch": cfg.batch_size,
           "sequence_length": blocks.shape[1]}
    with head if head is not None else contextlib.nullcontext():
        free_memory(device)
        started = time.perf_counter()
        if compile_mode is not False and args.compile_timeout and hasattr(signal, "SIGALRM"):
            # a compilation that runs past the call's budget is cut (the variant records the timeout)
            signal.signal(signal.SIGALRM, _raise_timeout)
            signal.alarm(max(1, int(min(args.compile_timeout, seconds_left))))
        try:
            first = step(0)
            first_loss = {k: float(v.detach()) for k, v in first.items()}  # the one sync: step 0's loss, before any update
            synchronize(device)
        finally:
            if compile_mode is not False and hasattr(signal, "SIGALRM"):
                signal.alarm(0)
        out["first_step_seconds"] = round(time.perf_counter() - started, 2)
        out["compiled_code_reused"] = reused
        out["step0"] = first_loss
        for index in range(1, 1 + args.warmup):
            step(index)
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for index in range(1 + args.warmup, 1 + args.warmup + args.steps):
            last = step(index)
        synchronize(device)
        seconds = time.perf_counter() - started
    out.update({"steps": args.steps, "seconds": round(seconds, 3),
                "tokens_per_second": args.steps * cfg.batch_size * blocks.shape[1] / seconds,
                "step_ms": round(1000 * seconds / args.steps, 2), "peak_gib": peak_gib(device),
                "last_loss": float(last["loss"].detach())})
    if compile_mode is not False:
        compiled_before.add(blocks_key)
    return out


def _raise_timeout(signum, frame):
    raise Timeout("compilation did not finish within --compile-timeout")


def error_text(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)[-3:]
    return f"{type(err).__name__}: {err} (at " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(where)) + ")"


def table(report: dict) -> str:
    rows = ["| variant | tokens/s | vs plain | step ms | peak GiB | first step s | step-0 loss rel. diff | loss after |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = next((r for r in report["variants"] if r["variant"] == "plain" and "tokens_per_second" in r), None)
    for row in report["variants"]:
        if "tokens_per_second" not in row:
            rows.append(f"| {row['variant']} | {row.get('error') or row.get('skipped', '')} | | | | | | |")
            continue
        ratio = f"{row['tokens_per_second'] / base['tokens_per_second']:.2f}x" if base else ""
        first = f"{row['first_step_seconds']:.1f}" + (" (reused)" if row.get("compiled_code_reused") else "")
        diff = f"{row['step0_rel_diff']:.1e}" if row.get("step0_rel_diff") is not None else ""
        peak = f"{row['peak_gib']:.1f}" if row.get("peak_gib") is not None else ""
        rows.append(f"| {row['variant']} | {row['tokens_per_second']:,.0f} | {ratio} | {row['step_ms']:.1f} | {peak} | "
                    f"{first} | {diff} | {row['last_loss']:.4f} |")
    return "\n".join(rows) + "\n"


def save(report: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qat_step_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    header = (f"# QAT step speed: {report['model']} on {report['device']}\n\n"
              f"Distillation (KL + {report['train']['loss'].get('ce', 0.5)} CE), batch {report['batch']} x "
              f"{report['sequence_length']} tokens, {report['steps']} steps after {report['warmup']} warm-up steps, "
              f"data: {report['data']}; torch {report['torch']}, transformers {report['transformers']}.\n\n")
    (args.out / "qat_step_speed.md").write_text(header + table(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf file or embedded name")
    parser.add_argument("--tiny", action="store_true", help="a random-init tiny Llama instead of --model (smoke test)")
    parser.add_argument("--random-smollm2", action="store_true", help="SmolLM2-135M's architecture, random weights, "
                        "random tokens, instead of --model")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with WikiText-2 (valid.txt, wikitext-2/valid.txt or wiki.valid.tokens); "
                             "default $BITCONVERT_DATA or ./.data; random tokens when none is found")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/qat-step-speed"), help="tokenized-data cache")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--with-model-compile", action="store_true", help="also fused+model (whole student compiled)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (32); --tiny: 4")
    parser.add_argument("--sequence-length", type=int, default=None, help="default 512; --tiny: 64")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 30; --tiny: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="steps after the first one before the clock starts")
    parser.add_argument("--compile-timeout", type=float, default=150, help="most seconds for a compiled variant's "
                        "first step (0: no limit)")
    parser.add_argument("--deadline-seconds", type=float, default=230, help="skip variants that would start later")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="recipe whose convert and train settings are used")
    parser.add_argument("--debug", action="store_true", help="debug logs (why the chunked loss is off, compile notes)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s")
    if args.debug:
        for noisy in ("torch", "filelock", "urllib3", "fsspec"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.data_dir is None:
        args.data_dir = Path(os.environ.get("BITCONVERT_DATA", ".data"))
    args.batch_size = args.batch_size or (4 if args.tiny else None)
    args.sequence_length = args.sequence_length or (64 if args.tiny else 512)
    args.steps = args.steps or (3 if args.tiny else 30)
    args.work.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.variants.split(",") if n]
    if args.with_model_compile and "fused+model" not in names:
        names.append("fused+model")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if "plain" in names:  # the reference of the loss check: measured first
        names.remove("plain")
        names.insert(0, "plain")

    began = time.time()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    convert, train_settings = recipe_sections(args.recipe)
    args.batch_size = args.batch_size or train_settings.get("batch_size", 32)
    if args.random_smollm2:
        original, tokenizer = random_smollm2(), None
    elif args.tiny:
        original, tokenizer = tiny_model(), None
        convert = convert.model_copy(update={"group_size": 32}) if convert.weight_scale == "group" else convert
    else:
        from bitconvert.sources import load_model

        original, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    teacher = copy.deepcopy(original).to(device=device, dtype=torch.bfloat16 if on_gpu else torch.float32).eval()
    blocks, data_name = token_blocks(args, tokenizer, original.config.vocab_size)
    import transformers

    model_name = "SmolLM2-135M shape, random weights" if args.random_smollm2 else str(args.model)
    report = {"model": "tiny random Llama" if args.tiny else model_name,
              "device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "batch": args.batch_size,
              "sequence_length": args.sequence_length, "steps": args.steps, "warmup": args.warmup, "data": data_name,
              "convert": convert.model_dump(), "train": train_settings, "variants": [],
              "load_seconds": round(time.time() - began, 1)}
    print(f"{report['model']} on {report['device']}: batch {args.batch_size} x {args.sequence_length}, "
          f"{args.steps} measured steps per variant, data {data_name}", flush=True)
    compiled_before: set = set()
    durations: list[float] = []
    for name in names:
        elapsed = time.time() - began
        expected = durations[0] if durations else 0.0  # an eager variant's time; a compilation is cut by its alarm
        if elapsed + expected > args.deadline_seconds:
            report["variants"].append({"variant": name, "skipped": f"deadline: {elapsed:.0f} s gone, ~{expected:.0f} s needed"})
            print(f"  {name:14s} skipped ({report['variants'][-1]['skipped']})", flush=True)
            save(report, args)
            continue
        clock = time.time()
        try:
            row = run_variant(name, args, original, teacher, blocks, convert, train_settings, compiled_before,
                              args.deadline_seconds - (time.time() - began))
            base = next((r for r in report["variants"] if r["variant"] == "plain" and "step0" in r), None)
            if base is not None:
                ref, mine = base["step0"]["loss"], row["step0"]["loss"]
                row["step0_rel_diff"] = abs(mine - ref) / max(abs(ref), 1e-12)
                row["step0_terms_rel_diff"] = {k: abs(row["step0"][k] - v) / max(abs(v), 1e-12)
                                               for k, v in base["step0"].items() if k in row["step0"]}
            print(f"  {name:14s} {row['tokens_per_second']:>10,.0f} tok/s  {row['step_ms']:7.1f} ms/step  "
                  f"peak {row['peak_gib'] if row['peak_gib'] is not None else '-'} GiB  first step "
                  f"{row['first_step_seconds']:.1f} s{' (compiled code reused)' if row['compiled_code_reused'] else ''}  "
                  f"step-0 loss {row['step0']['loss']:.5f}"
                  + (f" (rel. diff vs plain {row['step0_rel_diff']:.1e})" if "step0_rel_diff" in row else ""), flush=True)
        except Exception as err:  # one failing variant (a compile error, a timeout) must not cost the others
            row = {"variant": name, "error": error_text(err)}
            print(f"  {name:14s} failed: {row['error'][:400]}", flush=True)
            free_memory(device)
        free_memory(device)  # the variant's student and optimizer went with run_variant's frame
        row["wall_seconds"] = round(time.time() - clock, 1)
        durations.append(row["wall_seconds"])
        report["variants"].append(row)
        save(report, args)
    report["total_seconds"] = round(time.time() - began, 1)
    save(report, args)
    print("\n" + table(report), flush=True)
    bad = [r["variant"] for r in report["variants"] if r.get("step0_rel_diff") is not None and not r["step0_rel_diff"] < args_tolerance(on_gpu)]
    if bad:
        print(f"WARNING: step-0 loss of {bad} differs from plain by more than {args_tolerance(on_gpu):.0e}", flush=True)
    if any(math.isnan(r.get("last_loss", 0.0)) for r in report["variants"]):
        print("WARNING: a variant's loss became NaN", flush=True)


def args_tolerance(on_gpu: bool) -> float:
    """How far step 0's loss may differ from the plain path's: bf16 products summed in another order."""
    return 1e-2 if on_gpu else 1e-4


if __name__ == "__main__":
    main()
