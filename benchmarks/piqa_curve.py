#!/usr/bin/env python
"""PIQA against training tokens for SmolLM2-135M's all-ternary runs, and what its fits predict.

Reads the committed results: the round-4 row whose PIQA was scored along the run (``piqa_curve`` in
qat_round4.json), round 5's tracked row with the TWN fit (qat_round5.json, fitted and plotted beside it) and
every finished 10-minute all-ternary run (its eval_smollm2*.json for PIQA, its
metrics.jsonl for the tokens it trained). Fits two curves to the tracked row, the only one run with
several points:

    acc(T) = a + b * ln T                   (a straight line in log tokens)
    gap(T) = original - acc(T) = A * T^-k   (a power law for what is still missing)

and reports where each puts the target, 2 points below the original, beside what each predicts for
the finished runs' token counts (those runs used other schedules, so they check the fits, not train them).

    python benchmarks/piqa_curve.py [--results benchmarks/results] [--out benchmarks/results]

Writes OUT/piqa_curve.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitconvert.utils.plots import read_metrics  # noqa: E402

TARGET_POINTS = 0.02
# finished all-ternary 10-minute runs: (label, lm-eval report, training metrics)
FINISHED = (
    ("WikiText only (H100)", "eval_smollm2.json", "smollm2_distill_h100_10min_metrics.jsonl"),
    ("+ 2M teacher tokens (H100)", "eval_smollm2_teacher_mix.json", "smollm2_distill_teacher_mix_h100_10min_metrics.jsonl"),
    ("10M teacher tokens, eager (H200)", "eval_smollm2_h200_10min.json", "smollm2_distill_h200_10min_metrics.jsonl"),
    ("21M teacher tokens, compiled (H200)", "eval_smollm2_h200_10min_compiled.json",
     "smollm2_distill_h200_10min_compiled_metrics.jsonl"),
    ("broad teacher text (H200)", "eval_smollm2_h200_10min_broad.json", "smollm2_distill_h200_10min_broad_metrics.jsonl"),
    ("21M teacher tokens, compiled, TWN fit (H200; the recipe)", "eval_smollm2_h200_10min_twn.json",
     "smollm2_distill_h200_10min_twn_metrics.jsonl"),
    ("the recipe again, seed 1 (H200)", "eval_smollm2_h200_10min_twn_seed1.json",
     "smollm2_distill_h200_10min_twn_seed1_metrics.jsonl"),
)


def piqa_row(report_path: Path) -> dict:
    rows = json.loads(report_path.read_text())["report"]["rows"]
    return next(r for r in rows if r["task"] == "piqa_local" and r["metric"] == "acc")


def trained_tokens(metrics_path: Path) -> int:
    return max(row.get("tokens", 0) for row in read_metrics(metrics_path))


def fit(tokens: np.ndarray, acc: np.ndarray, original: float) -> dict:
    slope, intercept = np.polyfit(np.log(tokens), acc, 1)
    target = original - TARGET_POINTS
    exponent, log_scale = np.polyfit(np.log(tokens), np.log(original - acc), 1)
    return {"log_linear": {"a": intercept, "b": slope, "points_per_4x": 100 * slope * math.log(4),
                           "tokens_to_target": math.exp((target - intercept) / slope) if slope > 0 else None},
            "gap_power_law": {"A": math.exp(log_scale), "k": -exponent,
                              "tokens_to_target": math.exp((math.log(TARGET_POINTS) - log_scale) / exponent)
                              if exponent < 0 else None}}


def predict(fits: dict, original: float, tokens: float) -> tuple[float, float]:
    line, power = fits["log_linear"], fits["gap_power_law"]
    return line["a"] + line["b"] * math.log(tokens), original - power["A"] * tokens ** -power["k"]


def short(n: float | None) -> str:
    if n is None:
        return "never"
    if n >= 1e15:  # far past any corpus: the exponent says enough
        return f"{n:.0e}"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--out", type=Path, default=None, help="default: --results")
    args = parser.parse_args()
    out = args.out or args.results

    round4 = json.loads((args.results / "qat_round4.json").read_text())
    tracked = next(row for row in round4["configs"] if row.get("piqa_curve"))
    original = round4["original_piqa"]
    tokens, acc = (np.array(column, dtype=float) for column in zip(*tracked["piqa_curve"]))
    fits = fit(tokens, acc, original)
    finished = []
    for label, report, metrics in FINISHED:
        row, n = piqa_row(args.results / report), trained_tokens(args.results / metrics)
        line, power = predict(fits, original, n)
        finished.append({"run": label, "tokens": n, "acc": row["ternary"], "stderr": row["ternary_stderr"],
                         "log_linear_prediction": line, "gap_power_law_prediction": power})
    others = []  # later tracked rows (round 5: the TWN fit), fitted on their own
    round5_path = args.results / "qat_round5.json"
    if round5_path.is_file():
        for row in json.loads(round5_path.read_text())["configs"]:
            if row.get("piqa_curve"):
                t, a = (np.array(column, dtype=float) for column in zip(*row["piqa_curve"]))
                others.append({"name": row["name"], "tracked": [{"tokens": int(x), "acc": y} for x, y in zip(t, a)],
                               "fits": fit(t, a, original)})
    result = {"original_acc": original, "target_acc": original - TARGET_POINTS, "tracked_row": tracked["name"],
              "tracked": [{"tokens": int(t), "acc": a} for t, a in zip(tokens, acc)], "fits": fits, "finished": finished,
              "other_tracked": others}
    (out / "piqa_curve.json").write_text(json.dumps(result, indent=2) + "\n")

    line, power = fits["log_linear"], fits["gap_power_law"]
    md = ["# PIQA against training tokens (SmolLM2-135M, all ternary)", "",
          f"Original: {original:.3f}; target: {original - TARGET_POINTS:.3f}. Tracked: round 4's `{tracked['name']}` "
          "(PIQA scored along one run, 1,838 items, ±1.1 points each)"
          + "".join(f" and round 5's `{o['name']}`" for o in others) + "; the finished runs check round 4's fits.", "",
          "| tokens | " + " | ".join(short(t) for t in tokens) + " |", "| --- |" + " ---: |" * len(tokens),
          f"| PIQA acc, {tracked['name']} | " + " | ".join(f"{a:.3f}" for a in acc) + " |",
          *(f"| PIQA acc, {o['name']} | " + " | ".join(f"{p['acc']:.3f}" for p in o["tracked"]) + " |" for o in others),
          "",
          "| fit to the tracked run | parameters | target reached at |", "| --- | --- | ---: |",
          f"| acc = a + b ln T | {line['points_per_4x']:+.1f} points per 4x tokens | {short(line['tokens_to_target'])} |",
          f"| gap = A T^-k | k = {power['k']:.3f} | {short(power['tokens_to_target'])} |",
          *(f"| {o['name']}: acc = a + b ln T | {o['fits']['log_linear']['points_per_4x']:+.1f} points per 4x tokens | "
            f"{short(o['fits']['log_linear']['tokens_to_target'])} |" for o in others),
          *(f"| {o['name']}: gap = A T^-k | k = {o['fits']['gap_power_law']['k']:.3f} | "
            f"{short(o['fits']['gap_power_law']['tokens_to_target'])} |" for o in others), "",
          "| finished 10-minute run | tokens | PIQA acc | line predicts | power law predicts |",
          "| --- | ---: | ---: | ---: | ---: |"]
    md += [f"| {r['run']} | {short(r['tokens'])} | {r['acc']:.3f} ± {r['stderr']:.3f} | {r['log_linear_prediction']:.3f} | "
           f"{r['gap_power_law_prediction']:.3f} |" for r in finished]
    (out / "piqa_curve.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    grid = np.geomspace(tokens.min() / 2, 2e10, 200)
    ax.plot(tokens, acc, "o", color="C0", label=f"tracked run ({tracked['name']})")
    ax.plot(grid, line["a"] + line["b"] * np.log(grid), "-", color="C0", alpha=0.6, label="a + b ln T")
    ax.plot(grid, original - power["A"] * grid ** -power["k"], "--", color="C2", alpha=0.7, label="original - A T^-k")
    for color, other in zip(("C3", "C4"), others):
        t = np.array([p["tokens"] for p in other["tracked"]], dtype=float)
        ax.plot(t, [p["acc"] for p in other["tracked"]], "^", color=color, label=f"tracked run ({other['name']})")
        ax.plot(grid, other["fits"]["log_linear"]["a"] + other["fits"]["log_linear"]["b"] * np.log(grid), "-",
                color=color, alpha=0.4)
    ax.errorbar([r["tokens"] for r in finished], [r["acc"] for r in finished], yerr=[r["stderr"] for r in finished],
                fmt="s", color="C1", label="finished 10-minute runs")
    ax.axhline(original, color="k", lw=1, label=f"original {original:.3f}")
    ax.axhline(original - TARGET_POINTS, color="k", lw=1, ls=":", label="target (original - 2 points)")
    ax.set_ylim(min(acc.min(), min(r["acc"] for r in finished)) - 0.02, original + 0.01)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("PIQA acc")
    ax.set_title("SmolLM2-135M ternary: PIQA against tokens")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "piqa_curve.png", dpi=120)


if __name__ == "__main__":
    main()
