"""Mixture-of-Depths under QAT: quality cost and compute saved on SmolLM2-135M.

Trains the same BitNet conversion twice with the same budget, once dense and once with every
other block routed (Mixture-of-Depths, ``bitconvert.mod``), reloads both exports, and reports
WikiText-2 test perplexity with causal routing (each token decided by its router alone, as in
decoding), the share of tokens that routed blocks processed, the forward FLOPs that saves, and the
measured forward time. The original (unquantized) model's perplexity is scored for reference.

GPU (the real measurement; one arm per command keeps each under ten minutes, the second call
merges its arm into the first one's results)::

    python benchmarks/mod_smollm2.py --out benchmarks/results/mod_smollm2 --steps 400 --batch-size 16 --arm dense
    python benchmarks/mod_smollm2.py --out benchmarks/results/mod_smollm2 --steps 400 --batch-size 16 --arm mod

CPU smoke test (seconds; tiny model and text)::

    python benchmarks/mod_smollm2.py --model tests-tiny-dir --train-data corpus.txt --eval-data corpus.txt \\
        --steps 2 --seq-len 32 --batch-size 2 --device cpu --out /tmp/mod-smoke

Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# Run from a checkout: the repository's bitconvert, whatever is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(os.environ.get("BITCONVERT_DATA", "/work/shared/data"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for the exports, results.json and results.md")
    p.add_argument("--model", default="smollm2-135m", help="model to convert (embedded name, folder, .gguf, hub id)")
    p.add_argument("--train-data", default=str(DATA / "wikitext-2" / "valid.txt"), help="training text")
    p.add_argument("--eval-data", default=str(DATA / "wikitext-2" / "test.txt"), help="text scored by perplexity")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per arm (the fixed budget)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--variant", default="b1.58", choices=["b1.58", "bitnet1", "onebit"])
    p.add_argument("--weight-scale", default="channel", choices=["tensor", "channel", "group"])
    p.add_argument("--capacity", type=float, default=0.125, help="MoD training capacity")
    p.add_argument("--every", type=int, default=2, help="route every N-th block")
    p.add_argument("--aux-weight", type=float, default=0.01, help="weight of the causal-decision loss")
    p.add_argument("--decision", default="router", choices=["router", "predictor"])
    p.add_argument("--capacity-warmup", type=float, default=0.5,
                   help="share of the budget over which the capacity falls from 1 to --capacity (0 = from step 0)")
    p.add_argument("--eval-windows", type=int, default=0, help="score only the first N windows (0 = all)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--timing-batch", type=int, default=8, help="sequences per timed forward pass")
    p.add_argument("--timing-reps", type=int, default=10)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--skip-original", action="store_true", help="do not score the unquantized model")
    p.add_argument("--arm", default="both", choices=["both", "dense", "mod"],
                   help="run one arm only; results.json in --out keeps the other arm from an earlier run")
    return p.parse_args(argv)


def _windows(tokenizer, path: str, seq_len: int, limit: int) -> torch.Tensor:
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise SystemExit(f"{path} has fewer than {seq_len} tokens")
    blocks = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return blocks[:limit] if limit else blocks


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int, device: str) -> tuple[float, dict[str, float]]:
    """Token-level perplexity over non-overlapping windows, and the mean share of tokens each routed
    block processed (eval mode: the causal per-token decision)."""
    from bitconvert.mod import routed_blocks

    model.eval()
    routed = routed_blocks(model)
    nll, count = 0.0, 0
    processed = {name: 0.0 for name in routed}
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        nll += loss.item()
        count += ids[:, 1:].numel()
        for name, block in routed.items():
            processed[name] += block.mod_last_fraction * ids.numel()
    total = blocks[: len(blocks)].numel()
    return math.exp(nll / count), {name: value / total for name, value in processed.items()}


@torch.no_grad()
def forward_seconds(model, seq_len: int, batch: int, reps: int, device: str) -> float:
    """Median wall time of one forward pass over ``batch`` random sequences (eval mode, no cache)."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for rep in range(reps + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        tick = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if rep >= 2:  # the first passes warm caches and kernels
            times.append(time.perf_counter() - tick)
    return statistics.median(times)


def run_arm(args, name: str, routing: dict | None, device: str) -> dict:
    import bitconvert
    from bitconvert.mod import forward_flops

    recipe = bitconvert.Recipe(
        model=args.model, output=str(args.out / name), device=device,
        convert={"variant": args.variant, "weight_scale": args.weight_scale, "mixture_of_depths": routing},
        data={"train": [{"path": args.train_data}], "sequence_length": args.seq_len},
        train={"mode": "distill", "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "quant_warmup_steps": max(1, args.steps // 6), "warmup_steps": max(1, args.steps // 30),
               "save_every": 0, "save_every_minutes": 0, "log_every": max(1, args.steps // 20)},
        export={"dtype": "bfloat16"})
    result = bitconvert.quantize(recipe)
    speeds = [row["tokens_per_second"] for row in result.train.metrics if "tokens_per_second" in row][1:]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, tokenizer = bitconvert.load_model(args.out / name, dtype=dtype, device=device)
    blocks = _windows(tokenizer, args.eval_data, args.seq_len, args.eval_windows)
    ppl, fractions = perplexity(model, blocks, args.eval_batch_size, device)
    flops = forward_flops(model, args.seq_len, fractions)
    capacity_flops = forward_flops(model, args.seq_len)
    seconds = forward_seconds(model, args.seq_len, args.timing_batch, args.timing_reps, device)
    return {
        "arm": name, "perplexity": ppl, "train_seconds": result.train.seconds, "train_steps": result.train.steps,
        "train_tokens": result.train.tokens,
        "train_tokens_per_second": statistics.median(speeds) if speeds else None,
        "final_train_loss": next((r["loss"] for r in reversed(result.train.metrics) if "loss" in r), None),
        "routed_fraction_per_block": fractions,
        "routed_fraction_mean": statistics.mean(fractions.values()) if fractions else 1.0,
        "forward_flops_per_sequence": flops["routed_flops"], "dense_forward_flops_per_sequence": flops["dense_flops"],
        "flops_saved_at_measured_routing": flops["saved_fraction"],
        "flops_saved_at_training_capacity": capacity_flops["saved_fraction"],
        "forward_seconds": seconds, "forward_tokens_per_second": args.timing_batch * args.seq_len / seconds,
    }


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        "# Mixture-of-Depths under QAT", "",
        f"{cfg['model']} -> {cfg['variant']} ({cfg['weight_scale']} scales), {cfg['steps']} steps x "
        f"{cfg['batch_size']} x {cfg['seq_len']} tokens of distillation per arm on {report['device']}. MoD: every "
        f"{cfg['every']} blocks, capacity {cfg['capacity']} (from 1 over the first "
        f"{cfg.get('capacity_warmup', 0):.0%} of the budget), decision '{cfg['decision']}', aux weight "
        f"{cfg['aux_weight']}. Perplexity on {Path(cfg['eval_data']).name} with causal routing "
        "(each token decided by its own router logit, as in decoding).", "",
        "| arm | perplexity | routed blocks process | forward FLOPs saved | forward tokens/s | train tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["arms"]:
        routed = f"{row['routed_fraction_mean']:.1%}" if row["routed_fraction_per_block"] else "all"
        speed = f"{row['train_tokens_per_second']:,.0f}" if row.get("train_tokens_per_second") else "-"
        lines.append(f"| {row['arm']} | {row['perplexity']:.2f} | {routed} | "
                     f"{row['flops_saved_at_measured_routing']:.1%} | {row['forward_tokens_per_second']:,.0f} | {speed} |")
    if report.get("original_perplexity") is not None:
        lines.append(f"| original (unquantized) | {report['original_perplexity']:.2f} | all | - | - | - |")
    s = report["summary"]
    if not s:
        return "\n".join(lines + ["", "Run both arms (dense and mod) for the comparison.", ""])
    lines += ["", f"Quality cost of MoD: perplexity x{s['perplexity_ratio']:.3f} ({s['perplexity_ratio'] - 1:+.1%}). "
              f"Compute saved: {s['flops_saved']:.1%} of forward FLOPs at the measured routing "
              f"({s['flops_saved_at_capacity']:.1%} at the training capacity); measured forward time "
              f"x{s['forward_time_ratio']:.3f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    routing = {"every": args.every, "capacity": args.capacity, "aux_weight": args.aux_weight, "decision": args.decision,
               "capacity_warmup": args.capacity_warmup}
    # Arms can run in separate processes (e.g. under a per-command time limit); same settings only.
    results_path = args.out / "results.json"
    earlier = json.loads(results_path.read_text()) if results_path.is_file() else {}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "arm"}
    if earlier and {k: v for k, v in earlier.get("config", {}).items() if k != "arm"} != config:
        raise SystemExit(f"{results_path} was made with other settings; use another --out or delete it")
    by_name = {row["arm"]: row for row in earlier.get("arms", [])}
    for name in (["dense", "mod"] if args.arm == "both" else [args.arm]):
        by_name[name] = run_arm(args, name, routing if name == "mod" else None, device)
    arms = [by_name[name] for name in ("dense", "mod") if name in by_name]
    original = earlier.get("original_perplexity")
    if not args.skip_original and original is None:
        import bitconvert

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model, tokenizer = bitconvert.load_model(args.model, dtype=dtype, device=device)
        original, _ = perplexity(model, _windows(tokenizer, args.eval_data, args.seq_len, args.eval_windows),
                                 args.eval_batch_size, device)
    summary = {}
    if "dense" in by_name and "mod" in by_name:
        dense, mod = by_name["dense"], by_name["mod"]
        summary = {"perplexity_ratio": mod["perplexity"] / dense["perplexity"],
                   "flops_saved": mod["flops_saved_at_measured_routing"],
                   "flops_saved_at_capacity": mod["flops_saved_at_training_capacity"],
                   "forward_time_ratio": mod["forward_seconds"] / dense["forward_seconds"]}
    report = {
        "config": config,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "arms": arms, "original_perplexity": original, "summary": summary,
    }
    results_path.write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
