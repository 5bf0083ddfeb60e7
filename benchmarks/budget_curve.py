#!/usr/bin/env python
"""Perplexity and PIQA at the end of complete training schedules, against the budget (SmolLM2-135M, all ternary).

fit_curve.py and piqa_curve.py fit the points along one run. Along a run the learning rate is still decaying,
and the last points fall faster as it reaches its floor, so those fits put the asymptote below the teacher,
which no distilled student reaches. Here every point is the end of a run whose cosine schedule ran its whole
course: ablation rows of 300 and 1,200 steps and the finished 10-minute runs. A budget's end point is what that
budget buys, which is the question a larger budget asks.

For each quantizer fit (TWN, absmean) with WikiText continuations as teacher text, and for TWN with half of that text
the teacher's conversations (the recipe since ablation round 11), by least squares in logs, with 95% intervals from
the t distribution (few points, so they are wide):

    ln(ppl / teacher) = A * T^-alpha        the student's limit taken to be its teacher
    original - acc    = B * T^-k            PIQA's gap to the original
    acc               = a + b * ln T        PIQA as a straight line in log tokens

The ablation rows sampled 4.2M teacher tokens, the 10-minute runs 21M; none sees its teacher text more than ~3.5
times, but the points do not share one data plan exactly.

    python benchmarks/budget_curve.py [--results benchmarks/results] [--out benchmarks/results]

Writes OUT/budget_curve.{json,md,png}.
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
from piqa_curve import piqa_row, short  # noqa: E402  (this folder is on sys.path when a script runs)

PIQA_ITEMS = 1838
PIQA_TARGET_GAP = 0.02
PPL_GOAL = 1.01  # a ratio to the teacher past the 1.10, to show what the slope costs
FLOORS = (1.0, 1.01, 1.02)  # limits of the student's perplexity, as ratios to the teacher's
PREDICT_AT = (7.5e8, 7.5e9)  # ~10x and ~100x the tokens of 10 H200-minutes
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}
MIX = "twn + conversations"  # half the teacher text the teacher's own conversations (rounds 9-12, the recipe now)
# (fit, label, source): a source is ("row", round json, row name) or ("run", lm-eval report, metrics.jsonl)
END_POINTS = (
    ("twn", "round 5, 300 steps", ("row", "qat_round5.json", "twn_fit")),
    ("twn", "round 6, 300 steps", ("row", "qat_round6.json", "twn_fit")),
    ("twn", "round 6 again, 300 steps", ("row", "qat_round6_repeat.json", "twn_fit")),
    ("twn", "round 7, 300 steps", ("row", "qat_round7.json", "reference")),
    ("twn", "round 7, 300 steps, seed 1", ("row", "qat_round7.json", "reference_seed_1")),
    ("twn", "round 5, 1,200 steps", ("row", "qat_round5.json", "twn_fit_4x_tracked")),
    ("twn", "10 minutes, seed 1", ("run", "eval_smollm2_h200_10min_twn_seed1.json",
                                   "smollm2_distill_h200_10min_twn_seed1_metrics.jsonl")),
    ("twn", "10 minutes, seed 0", ("run", "eval_smollm2_h200_10min_twn.json", "smollm2_distill_h200_10min_twn_metrics.jsonl")),
    ("absmean", "round 4, 300 steps", ("row", "qat_round4.json", "reference")),
    ("absmean", "round 5, 300 steps", ("row", "qat_round5.json", "reference")),
    ("absmean", "round 6, 300 steps", ("row", "qat_round6.json", "reference")),
    ("absmean", "round 6 again, 300 steps", ("row", "qat_round6_repeat.json", "reference")),
    ("absmean", "round 4, 1,200 steps", ("row", "qat_round4.json", "reference_4x_tracked")),
    ("absmean", "10 minutes", ("run", "eval_smollm2_h200_10min_compiled.json",
                               "smollm2_distill_h200_10min_compiled_metrics.jsonl")),
    (MIX, "round 9, 300 steps", ("row", "qat_round9.json", "chat_and_wiki_teacher_text")),
    (MIX, "round 9, 300 steps, seed 1", ("row", "qat_round9.json", "chat_and_wiki_teacher_text_seed_1")),
    (MIX, "round 9, 300 steps, seed 2", ("row", "qat_round9.json", "chat_and_wiki_teacher_text_seed_2")),
    (MIX, "round 11, 300 steps, seed 3", ("row", "qat_round11.json", "chat_and_wiki_teacher_text_seed_3")),
    (MIX, "round 12, 300 steps, seed 4", ("row", "qat_round12.json", "chat_and_wiki_teacher_text_seed_4")),
    (MIX, "round 10, 1,200 steps", ("row", "qat_round10.json", "chat_and_wiki_teacher_text_4x_tracked")),
    (MIX, "10 minutes (H100)", ("run", "eval_smollm2_h100_10min_chat.json",
                                "smollm2_distill_h100_10min_chat_metrics.jsonl")),
)


def read_end_point(results: Path, source: tuple) -> dict:
    kind, first, second = source
    if kind == "row":
        rows = json.loads((results / first).read_text())["configs"]
        row = next(r for r in rows if r["name"] == second)
        acc = row["piqa_acc"]
        return {"tokens": row["tokens"], "ppl": row["final_ppl"], "acc": acc,
                "stderr": math.sqrt(acc * (1 - acc) / PIQA_ITEMS)}
    piqa = piqa_row(results / first)
    evals = [r for r in read_metrics(results / second) if "eval_ppl" in r]
    return {"tokens": evals[-1]["tokens"], "ppl": evals[-1]["eval_ppl"], "acc": piqa["ternary"],
            "stderr": piqa["ternary_stderr"]}


def line_fit(x: np.ndarray, y: np.ndarray) -> dict:
    """Least-squares line y = intercept + slope * x, with the slope's 95% interval (t distribution)."""
    slope, intercept = np.polyfit(x, y, 1)
    dof = len(x) - 2
    residual = y - (intercept + slope * x)
    spread = math.sqrt(float(residual @ residual) / dof) if dof > 0 else float("nan")
    slope_se = spread / math.sqrt(float(((x - x.mean()) ** 2).sum()))
    half = T_975.get(dof, 1.96) * slope_se
    return {"intercept": float(intercept), "slope": float(slope), "slope_95": [float(slope - half), float(slope + half)],
            "rms": float(math.sqrt(float(residual @ residual) / len(x)))}


def tokens_where(intercept: float, slope: float, y: float) -> float | None:
    """T at which intercept + slope * ln T reaches y, when the line heads there."""
    if slope == 0:
        return None
    t = math.exp((y - intercept) / slope)
    return t if math.isfinite(t) else None


def ppl_line(points: list[dict], teacher: float, floor: float = 1.0) -> dict:
    """ln(ppl / (floor * teacher)) = A * T^-alpha as a line in logs: floor 1 takes the teacher as the limit."""
    log_t = np.log([p["tokens"] for p in points])
    return line_fit(log_t, np.log([math.log(p["ppl"] / (floor * teacher)) for p in points]))


def crossing(first: dict, second: dict) -> float | None:
    """Tokens at which two perplexity lines meet."""
    return tokens_where(first["intercept"] - second["intercept"], first["slope"] - second["slope"], 0.0)


def through_centre(fit: dict, x: np.ndarray, slope: float) -> dict:
    """The line through the fitted points' centre with another slope (one end of the slope's interval)."""
    centre = float(x.mean())
    return {"intercept": fit["intercept"] + (fit["slope"] - slope) * centre, "slope": slope}


def reach(fit: dict, y: float, rising: bool) -> float | None:
    """Tokens at which a line in ln T reaches y, or None when it heads the other way."""
    heads_there = fit["slope"] > 0 if rising else fit["slope"] < 0
    return tokens_where(fit["intercept"], fit["slope"], y) if heads_there else None


def fit_one(points: list[dict], teacher: float, original: float) -> dict:
    log_t = np.log([p["tokens"] for p in points])
    acc = np.array([p["acc"] for p in points])
    ppl, gap, line = ppl_line(points, teacher), line_fit(log_t, np.log(original - acc)), line_fit(log_t, acc)
    # "at best": the most hopeful slopes the points allow, the gap's steepest fall and PIQA's steepest rise
    hopeful_gap, hopeful_line = through_centre(gap, log_t, gap["slope_95"][0]), through_centre(line, log_t,
                                                                                                line["slope_95"][1])
    target_gap, target = math.log(PIQA_TARGET_GAP), original - PIQA_TARGET_GAP

    def ppl_at(tokens: float) -> float:
        return teacher * math.exp(math.exp(ppl["intercept"] + ppl["slope"] * math.log(tokens)))

    return {
        "ppl": {**ppl, "alpha": -ppl["slope"], "alpha_95": [-ppl["slope_95"][1], -ppl["slope_95"][0]],
                "predicted": {str(int(t)): ppl_at(t) for t in PREDICT_AT},
                "tokens_to_goal": reach(ppl, math.log(math.log(PPL_GOAL)), rising=False)},
        "piqa_gap": {**gap, "k": -gap["slope"], "k_95": [-gap["slope_95"][1], -gap["slope_95"][0]],
                     "tokens_to_target": reach(gap, target_gap, rising=False),
                     "tokens_to_target_at_best": reach(hopeful_gap, target_gap, rising=False)},
        "piqa_line": {**line, "points_per_4x": 100 * line["slope"] * math.log(4),
                      "points_per_4x_95": [100 * s * math.log(4) for s in line["slope_95"]],
                      "tokens_to_target": reach(line, target, rising=True),
                      "tokens_to_target_at_best": reach(hopeful_line, target, rising=True)},
    }


def interval(values: list[float], digits: int = 2) -> str:
    return f"{values[0]:.{digits}f} to {values[1]:.{digits}f}"


def markdown(result: dict) -> str:
    teacher, original = result["teacher_ppl"], result["original_acc"]
    md = ["# The end of each complete schedule against its budget (SmolLM2-135M, all ternary)", "",
          f"Teacher perplexity {teacher:.2f} (WikiText-2 test, 512-token blocks); original PIQA {original:.3f}, target "
          f"{original - PIQA_TARGET_GAP:.3f}. Every point is the end of a full cosine schedule.", "",
          "| fit | run | tokens | ppl | × teacher | PIQA acc |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, points in result["points"].items():
        md += [f"| {name} | {p['run']} | {short(p['tokens'])} | {p['ppl']:.2f} | {p['ppl'] / teacher:.3f} | "
               f"{p['acc']:.3f} ± {p['stderr']:.3f} |" for p in points]
    md += ["", "| fit | ln(ppl/teacher) ∝ T^-alpha: alpha (95%) | "
           + "".join(f"ppl at {short(t)} tokens | " for t in PREDICT_AT)
           + f"{PPL_GOAL:.2f}× the teacher at |", "| --- | --- |" + " ---: |" * (len(PREDICT_AT) + 1)]
    for name, fit in result["fits"].items():
        ppl = fit["ppl"]
        md.append(f"| {name} | {ppl['alpha']:.2f} ({interval(ppl['alpha_95'])}) | "
                  + "".join(f"{v:.2f} | " for v in ppl["predicted"].values()) + f"{short(ppl['tokens_to_goal'])} |")
    md += ["", f"The two perplexity fits cross at {short(result['ppl_fits_cross_at'])} tokens. How that point moves "
           "if the students' limit lies above the teacher:", "", "| limit (× teacher) | alpha, TWN | alpha, absmean | fits cross at |",
           "| ---: | ---: | ---: | ---: |",
           *(f"| {f['floor']:.2f} | {f['alpha']['twn']:.2f} | {f['alpha']['absmean']:.2f} | {short(f['cross_at'])} |"
             for f in result["floors"]),
           "", "| fit | PIQA points per 4× tokens (95%) | target at (fit / at best) | PIQA gap ∝ T^-k: k (95%) | "
           "target at (fit / at best) |", "| --- | --- | ---: | --- | ---: |"]
    for name, fit in result["fits"].items():
        gap, line = fit["piqa_gap"], fit["piqa_line"]
        md.append(f"| {name} | {line['points_per_4x']:+.1f} ({interval(line['points_per_4x_95'], 1)}) | "
                  f"{short(line['tokens_to_target'])} / {short(line['tokens_to_target_at_best'])} | "
                  f"{gap['k']:.3f} ({interval(gap['k_95'], 3)}) | {short(gap['tokens_to_target'])} / "
                  f"{short(gap['tokens_to_target_at_best'])} |")
    md += ["", "At best: the line through the points' centre with the steepest slope the 95% interval allows. "
           "The ablation rows sampled 4.2M teacher tokens and the 10-minute runs 21M, so the points do not share one "
           "data plan exactly."]
    return "\n".join(md) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher, original = result["teacher_ppl"], result["original_acc"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    grid = np.geomspace(2e6, 1e11, 200)
    for index, (name, points) in enumerate(result["points"].items()):
        color = f"C{index}"  # matplotlib's colour cycle: every series gets one, however many there are
        fit = result["fits"][name]
        tokens = [p["tokens"] for p in points]
        left.plot(tokens, [p["ppl"] / teacher for p in points], "o", color=color, label=name)
        left.plot(grid, np.exp(np.exp(fit["ppl"]["intercept"] + fit["ppl"]["slope"] * np.log(grid))), "-",
                  color=color, alpha=0.5)
        right.errorbar(tokens, [p["acc"] for p in points], yerr=[p["stderr"] for p in points], fmt="o",
                       color=color, label=name)
        right.plot(grid, original - np.exp(fit["piqa_gap"]["intercept"] + fit["piqa_gap"]["slope"] * np.log(grid)),
                   "-", color=color, alpha=0.5)
    left.axhline(1.10, color="k", ls=":", lw=1, label="target 1.10×")
    left.set(xscale="log", xlabel="training tokens (whole schedule)", ylabel="ppl / teacher",
             title="held-out perplexity at the end of each schedule")
    right.axhline(original, color="k", lw=1, label=f"original {original:.3f}")
    right.axhline(original - PIQA_TARGET_GAP, color="k", ls=":", lw=1, label="target")
    right.set(xscale="log", xlabel="training tokens (whole schedule)", ylabel="PIQA acc",
              title="PIQA at the end of each schedule")
    for ax in (left, right):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--out", type=Path, default=None, help="default: --results")
    args = parser.parse_args()
    out = args.out or args.results

    reference = json.loads((args.results / "qat_round5.json").read_text())
    teacher, original = reference["original_ppl"], reference["original_piqa"]
    points: dict[str, list[dict]] = {}
    for fit_name, label, source in END_POINTS:
        points.setdefault(fit_name, []).append({"run": label, **read_end_point(args.results, source)})
    fits = {name: fit_one(p, teacher, original) for name, p in points.items()}
    # Where absmean's steeper line meets TWN's (past it, the fits say absmean ends lower), and how far that point
    # moves if the students' limit lies above the teacher.
    floors = [{"floor": floor, "alpha": {name: -ppl_line(p, teacher, floor)["slope"] for name, p in points.items()},
               "cross_at": crossing(ppl_line(points["twn"], teacher, floor), ppl_line(points["absmean"], teacher, floor))}
              for floor in FLOORS]
    result = {"teacher_ppl": teacher, "original_acc": original, "points": points, "fits": fits,
              "ppl_fits_cross_at": floors[0]["cross_at"], "floors": floors}
    (out / "budget_curve.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "budget_curve.md").write_text(text)
    plot(result, out / "budget_curve.png")
    print(text)


if __name__ == "__main__":
    main()
