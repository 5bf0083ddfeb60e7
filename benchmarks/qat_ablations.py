"""QAT ablations on SmolLM2-135M: one fixed wall-clock budget per configuration, one GPU, one call.

Every configuration starts from the same original model, trains by distillation on WikiText-2
valid.txt for the same number of seconds, and is scored by perplexity on WikiText-2 test.txt
(non-overlapping 512-token blocks, the same blocks for the original). Prints a table and writes
``qat_ablations.json`` (with per-configuration curves) under --out.

    python benchmarks/qat_ablations.py --model /root/m/smollm2.gguf --data .data/wikitext-2 \
        --seconds 40 --configs reference,tensor_scale,no_quant_warmup --out $OUT
    python benchmarks/qat_ablations.py ... --throughput   # eager vs fused quantizers vs compiled model
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitconvert.convert import convert_to_bitnet  # noqa: E402
from bitconvert.recipes.loading import recipe_from_dict  # noqa: E402
from bitconvert.sources import load_model  # noqa: E402
from bitconvert.train.data import build_training_data  # noqa: E402
from bitconvert.train.loop import held_out_loss, train  # noqa: E402

# The reference: the best recipe known before these ablations (calibration notes), one change per row below.
REFERENCE = {
    "convert": {"weight_scale": "channel"},
    "train": {"mode": "distill", "batch_size": 32, "lr": 1e-3, "schedule": "cosine", "warmup_steps": 20,
              "quant_warmup_steps": 100, "loss": {"kl": 1.0, "ce": 0.5}, "log_every": 5, "save_every": 0,
              "save_every_minutes": 0},
}

ABLATIONS: dict[str, dict] = {
    "reference": {},
    "tensor_scale": {"convert": {"weight_scale": "tensor"}},
    "group64_scale": {"convert": {"weight_scale": "group", "group_size": 64}},
    "no_quant_warmup": {"train": {"quant_warmup_steps": 0}},
    "kl_only": {"train": {"loss": {"ce": 0.0}}},
    "plus_hidden": {"train": {"loss": {"hidden": 1.0}}},
    "temperature_2": {"train": {"loss": {"temperature": 2.0}}},
    "subln_output": {"convert": {"subln": "output"}},
    "lr_2e-3": {"train": {"lr": 2e-3}},
    "lr_3e-3": {"train": {"lr": 3e-3}},
    "lr_2e-3+temperature_2": {"train": {"lr": 2e-3, "loss": {"temperature": 2.0}}},
    "lr_5e-4": {"train": {"lr": 5e-4}},
    "batch_16": {"train": {"batch_size": 16}},
    "keep_edge_blocks": {"convert": {"skip": [r"model\.layers\.(0|29)\..*"]}},
    "teacher_text_mix": {"data": {"generate_mix": 0.3}},
}


FULL_PRECISION_ABLATIONS = {"keep_edge_blocks"}


def merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def recipe_for(name: str, args) -> "Recipe":  # noqa: F821
    spec = merge(REFERENCE, ABLATIONS[name])
    mix = spec.get("data", {}).pop("generate_mix", None)
    sources = [{"path": str(args.data / "valid.txt")}]
    if mix:
        # The teacher continues the first 32 tokens of WikiText lines: fresh in-domain text. One large
        # batch, since sampling a 135M model is launch-bound (batch 64 ran at ~1.8K tokens/s on an H100).
        sources.append({"generate": {"tokens": args.generate_tokens, "sequence_length": args.sequence_length,
                                     "batch_size": 512, "prompts_from": str(args.data / "valid.txt")},
                        "weight": mix / (1 - mix)})
    spec["data"] = {"train": sources, "eval": {"path": str(args.data / "test.txt")},
                    "sequence_length": args.sequence_length}
    spec["model"] = str(args.model)
    spec["train"]["minutes"] = args.seconds / 60
    spec["train"]["eval_every"] = args.eval_every
    return recipe_from_dict(spec, source=f"ablation {name}")


def warm_up(student, data, device) -> None:
    """One forward/backward outside the clock: the fused quantizers compile for this layer layout
    here, so that no configuration pays compile time out of its training budget."""
    student.to(device).train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        student(input_ids=data.batch(0, 2).to(device)).logits.float().mean().backward()
    student.zero_grad(set_to_none=True)
    student.to("cpu")


def piqa_accuracy(model, tokenizer, args) -> float | None:
    """lm-eval's PIQA prompt (bitconvert's piqa_local on ../shared/data/piqa) on an in-memory model."""
    if not args.piqa_limit:
        return None
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from bitconvert.eval.runner import _quiet_harness, _task_manager

    was_training = model.training
    model.eval()
    with _quiet_harness():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64)
        results = simple_evaluate(model=lm, tasks=["piqa_local"], limit=args.piqa_limit if args.piqa_limit > 0 else None,
                                  log_samples=False, bootstrap_iters=0,
                                  task_manager=_task_manager(["piqa_local"], args.data.parent, {}))
    model.train(was_training)
    return results["results"]["piqa_local"]["acc,none"]


def run_config(name, args, original, teacher, tokenizer, accelerator_factory) -> dict:
    recipe = recipe_for(name, args)
    accelerator = accelerator_factory()
    student = copy.deepcopy(original)
    report = convert_to_bitnet(student, recipe.convert.quant_spec(), recipe.convert.skip)
    started = time.perf_counter()
    data = build_training_data(recipe.data, tokenizer, seed=0, cache_dir=args.work / "data", teacher=teacher,
                               device=accelerator.device)
    data_seconds = time.perf_counter() - started
    warm_up(student, data, accelerator.device)
    result = train(student, teacher, data, recipe.train, args.work / name, accelerator=accelerator, eval_batch_size=32)
    rows = result.metrics
    speeds = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r][2:]
    curve = [(r["tokens"], r["eval_ppl"]) for r in rows if "eval_ppl" in r]
    started = time.perf_counter()
    piqa = piqa_accuracy(accelerator.unwrap_model(result.model), tokenizer, args)
    piqa_seconds = time.perf_counter() - started
    out = {"name": name, "change": ABLATIONS[name], "steps": result.steps, "tokens": result.tokens,
           "seconds": result.seconds, "data_seconds": round(data_seconds, 1),
           "tokens_per_second": statistics.median(speeds) if speeds else None,
           "converted_layers": len(report.converted), "piqa_acc": piqa, "piqa_seconds": round(piqa_seconds, 1),
           "final_ppl": curve[-1][1] if curve else None, "curve": curve}
    del student, accelerator, result
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def throughput(args, original, teacher, tokenizer, accelerator_factory) -> list[dict]:
    """Tokens/s of one distillation step with eager quantizers and with both quantizers compiled."""
    import bitconvert.layers.bitlinear as bl

    recipe = recipe_for("reference", args)
    data = build_training_data(recipe.data, tokenizer, seed=0, cache_dir=args.work / "data")
    results = []
    eager = (bl.activation_ste, bl.weight_ste)
    compiled = (torch.compile(bl.activation_ste, dynamic=True), torch.compile(bl.weight_ste, dynamic=True))
    for label, (act, weight) in (("eager quantizers", eager), ("compiled quantizers", compiled)):
        bl.activation_ste, bl.weight_ste = act, weight  # BitLinear looks these up at call time
        cfg = recipe.train.model_copy(update={"minutes": None, "steps": args.throughput_steps, "eval_every": 0,
                                              "log_every": 1})
        accelerator = accelerator_factory()
        student = copy.deepcopy(original)
        convert_to_bitnet(student, recipe.convert.quant_spec())
        warm_up(student, data, accelerator.device)
        nodata = copy.copy(data)
        nodata.eval_blocks = None
        result = train(student, teacher, nodata, cfg, args.work / f"tp-{len(results)}", accelerator=accelerator)
        speeds = [r["tokens_per_second"] for r in result.metrics if "tokens_per_second" in r][3:]
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        results.append({"setting": label, "tokens_per_second": statistics.median(speeds), "peak_gib": round(peak, 2)})
        print(f"  {label:26s} {results[-1]['tokens_per_second']:>10,.0f} tok/s  peak {peak:.1f} GiB", flush=True)
        del student, accelerator, result
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    bl.activation_ste, bl.weight_ste = eager
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("BITCONVERT_DATA", ".data")) / "wikitext-2")
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--configs", default=",".join(ABLATIONS))
    parser.add_argument("--generate-tokens", type=int, default=262_144)
    parser.add_argument("--piqa-limit", type=int, default=-1,
                        help="PIQA items scored per configuration (lm-eval piqa_local; -1 = all 1838, 0 = skip)")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--throughput-steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/qat-ablations"))
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test with a tiny model")
    parser.add_argument("--previous", type=Path, help="qat_ablations.json of an earlier call (same model and data): "
                        "its rows join this call's table and the choice of the winner")
    parser.add_argument("--winner-sets", type=Path, help="write the best configuration as `--set key=value` lines")
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--render", type=Path, help="only rewrite the markdown table of this qat_ablations.json")
    args = parser.parse_args()
    if args.render:
        report = json.loads(args.render.read_text())
        (args.render.parent / "qat_ablations.md").write_text("# QAT ablations\n\n" + table(report))
        print(table(report))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    from accelerate import Accelerator

    on_gpu = args.device == "cuda"

    def accelerator_factory():
        return Accelerator(mixed_precision="bf16" if on_gpu else "no", cpu=not on_gpu)

    original, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    teacher = copy.deepcopy(original).to(device=args.device, dtype=torch.bfloat16 if on_gpu else torch.float32).eval()
    eval_blocks = build_training_data(recipe_for("reference", args).data, tokenizer, seed=0,
                                      cache_dir=args.work / "data").eval_blocks
    teacher_ppl = math.exp(held_out_loss(teacher, eval_blocks, 32, accelerator_factory()))
    print(f"original perplexity on WikiText-2 test ({len(eval_blocks)} blocks of 512): {teacher_ppl:.2f}", flush=True)
    teacher_piqa = piqa_accuracy(teacher, tokenizer, args)
    if teacher_piqa is not None:
        print(f"original PIQA acc ({args.piqa_limit if args.piqa_limit > 0 else 'all'} items): {teacher_piqa:.4f}", flush=True)
    report = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
              "seconds_per_config": args.seconds, "original_piqa": teacher_piqa, "piqa_limit": args.piqa_limit,
              "reference": REFERENCE, "original_ppl": teacher_ppl, "eval_blocks": len(eval_blocks), "configs": []}
    if args.previous:
        earlier = json.loads(args.previous.read_text())
        if abs(earlier["original_ppl"] - teacher_ppl) > 1e-3 * teacher_ppl:
            sys.exit(f"--previous {args.previous} scored the original at {earlier['original_ppl']:.3f}, this call at "
                     f"{teacher_ppl:.3f}: not the same model or data")
        report["configs"] = earlier["configs"]
        report["throughput"] = earlier.get("throughput")
        report["original_piqa"] = report["original_piqa"] if teacher_piqa is not None else earlier.get("original_piqa")
    if args.throughput:
        report["throughput"] = throughput(args, original, teacher, tokenizer, accelerator_factory)
    for name in [c for c in args.configs.split(",") if c]:
        row = run_config(name, args, original, teacher, tokenizer, accelerator_factory)
        report["configs"].append(row)
        print(f"  {name:18s} steps {row['steps']:>5d}  tokens {row['tokens']:>10,d}  "
              f"{row['tokens_per_second'] or 0:>9,.0f} tok/s  ppl {row['final_ppl']:.2f} "
              f"({row['final_ppl'] / teacher_ppl:.2f}x)  piqa {fmt(row.get('piqa_acc'))}", flush=True)
        save(report, args.out)
    print("\n" + table(report))
    save(report, args.out)
    if args.winner_sets and report["configs"]:
        best = winner(report)
        lines = [f"--set {key}={value}" for key, value in flatten(best["change"]).items()]
        args.winner_sets.write_text(" ".join(lines) + "\n")
        print(f"winner: {best['name']} -> {' '.join(lines) or '(the reference)'}")


def winner(report: dict) -> dict:
    """Only configurations that keep every linear ternary and that `--set` can express may become
    the default (a teacher-text mix changes the data list; it is reported, not applied)."""
    eligible = [row for row in report["configs"] if row["name"] not in FULL_PRECISION_ABLATIONS | {"teacher_text_mix"}]
    return min(eligible or report["configs"], key=lambda row: row["final_ppl"])


def table(report: dict) -> str:
    """The markdown table of a report, ordered by perplexity, the original first."""
    original = report["original_ppl"]
    lines = [f"SmolLM2-135M, {report['seconds_per_config']:g} s of distillation per configuration on {report['device']}; "
             f"WikiText-2 test perplexity over {report['eval_blocks']} blocks of 512 tokens; PIQA: lm-eval piqa_local, "
             f"{'all' if report['piqa_limit'] < 0 else 'first ' + str(report['piqa_limit'])} items.",
             "", "| config | change | steps | tokens | tok/s | ppl | x original | PIQA acc |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| original | | | | | {original:.2f} | 1.000 | {fmt(report.get('original_piqa'))} |"]
    for row in sorted(report["configs"], key=lambda row: row["final_ppl"]):
        lines.append(f"| {row['name']} | `{json.dumps(row['change'])}` | {row['steps']} | {row['tokens']:,} | "
                     f"{row['tokens_per_second'] or 0:,.0f} | {row['final_ppl']:.2f} | {row['final_ppl'] / original:.3f} | "
                     f"{fmt(row.get('piqa_acc'))} |")
    if report["configs"]:
        lines += ["", f"Winner (all-ternary, expressible with `--set`): **{winner(report)['name']}**."]
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path) -> None:
    (out / "qat_ablations.json").write_text(json.dumps(report, indent=2))
    (out / "qat_ablations.md").write_text("# QAT ablations\n\n" + table(report))


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def flatten(change: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"loss": {"ce": 0}}} -> {"train.loss.ce": "0"} with values as YAML (lists as flow)."""
    out = {}
    for key, value in change.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value)
    return out


if __name__ == "__main__":
    main()
