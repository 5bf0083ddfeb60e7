#!/usr/bin/env python
"""Fit a power law to a training run's held-out loss and predict larger token budgets.

Reads the metrics.jsonl that bitconvert's training loop writes (rows with "eval_ppl" carry "tokens";
the first row may carry "teacher_ppl") and fits the held-out loss L = ln(eval_ppl) as

    L(T) = E + A * T^(-alpha)        T = training tokens, E >= 0, A >= 0, alpha > 0

by least squares: a grid over alpha, and for each alpha the constrained linear least squares for E
and A. Then it reports exp(E) (the asymptotic perplexity), predicted perplexity at 2x, 4x, 10x and
100x the run's tokens, the tokens at which the fit reaches 1.10x the teacher's perplexity, and the
same fit on the first half of the tokens alone, to show how much the prediction moves.

    python benchmarks/fit_curve.py METRICS.jsonl --out benchmarks/results [--name NAME] \
        [--min-tokens N] [--max-tokens N]

Writes OUT/NAME_fit.json, OUT/NAME_fit.md and OUT/NAME_fit.png. A run that repeats a small training
text flattens once it has seen the text many times: the fit then describes more steps on that same
text, not a larger budget of fresh data.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

MULTIPLES = (2, 4, 10, 100)
TEACHER_MARGIN = 1.10
PROFILE_CHI2_95 = 3.84  # chi-square quantile, 1 degree of freedom
REPEATED_DATA_NOTE = (
    "A run that repeats a small training text flattens once the text has been seen many times, so the "
    "fit describes more steps on this data budget, not what fresh data would reach."
)


def fit_power_law(tokens, losses, alphas=None) -> dict:
    """Least-squares fit of L = E + A * T^-alpha with E >= 0, A >= 0, alpha > 0.

    For a fixed alpha the model is linear in (E, A), so each alpha on a log grid gets an exact
    constrained solve; the best alpha is then refined on a finer grid around it. A grid is slow in
    theory but has no starting point to get wrong, and 3 parameters on ~20 points cost nothing.
    """
    t = np.asarray(tokens, dtype=float)
    y = np.asarray(losses, dtype=float)
    if len(t) < 3:
        raise ValueError(f"need at least 3 points to fit 3 parameters, got {len(t)}")
    # Powers of T / T_ref stay near 1, so the 2x2 solves are well conditioned at any alpha.
    t_ref = float(t.max())
    u = t / t_ref
    if alphas is None:
        alphas = np.logspace(-3, math.log10(5.0), 400)
    profile = [_solve_linear(u, y, a) for a in alphas]
    best = min(profile, key=lambda fit: fit["sse"])
    step = math.log(alphas[1] / alphas[0]) if len(alphas) > 1 else 0.0
    if step:
        fine = best["alpha"] * np.exp(np.linspace(-step, step, 201))
        best = min((_solve_linear(u, y, a) for a in fine), key=lambda fit: fit["sse"])
    alpha = best["alpha"]
    # Profile likelihood (Gaussian residuals): alphas whose best SSE stays within
    # n * ln(SSE / SSE_min) <= 3.84 are not rejected at ~95%. A flat profile means the
    # asymptote E is not pinned down by the data, whatever the best fit says.
    floor = max(best["sse"], 1e-300)
    kept = [p for p in profile if len(y) * math.log(max(p["sse"], floor) / floor) <= PROFILE_CHI2_95] + [best]
    return {
        "E": best["E"],
        # Back to raw token units: A' * (T/T_ref)^-alpha = (A' * T_ref^alpha) * T^-alpha.
        "A": best["A"] * t_ref**alpha,
        "alpha": alpha,
        "rms": math.sqrt(best["sse"] / len(y)),
        "points": len(y),
        "alpha_range": [min(p["alpha"] for p in kept), max(p["alpha"] for p in kept)],
        "E_range": [min(p["E"] for p in kept), max(p["E"] for p in kept)],
        "alpha_at_grid_edge": bool(alpha <= alphas[0] * 1.0001 or alpha >= alphas[-1] * 0.9999),
    }


def _solve_linear(u: np.ndarray, y: np.ndarray, alpha: float) -> dict:
    """min ||E + A*x - y||^2 over E >= 0, A >= 0, with x = u^-alpha."""
    x = u ** -alpha
    design = np.stack([np.ones_like(x), x], axis=1)
    (e, a), *_ = np.linalg.lstsq(design, y, rcond=None)
    if e >= 0 and a >= 0:
        candidates = [(e, a)]
    else:
        # The problem is convex: if the free optimum breaks a bound, the constrained one lies on a bound.
        candidates = [(0.0, max(0.0, float(x @ y / (x @ x)))), (max(0.0, float(y.mean())), 0.0)]
    fits = [(float(e), float(a), float(((e + a * x - y) ** 2).sum())) for e, a in candidates]
    e, a, sse = min(fits, key=lambda f: f[2])
    return {"E": e, "A": a, "alpha": float(alpha), "sse": sse}


def predict_loss(fit: dict, tokens) -> np.ndarray:
    return fit["E"] + fit["A"] * np.asarray(tokens, dtype=float) ** -fit["alpha"]


def tokens_to_reach(fit: dict, loss: float) -> float | None:
    """Tokens at which the fit reaches `loss`; None if it never does (the asymptote is above it)."""
    if fit["E"] >= loss:
        return None
    if fit["A"] == 0:
        return 0.0
    return (fit["A"] / (loss - fit["E"])) ** (1 / fit["alpha"])


def read_metrics(path: Path) -> tuple[list[dict], float | None]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = sorted((r for r in rows if "eval_ppl" in r), key=lambda r: r["tokens"])
    teacher = next((r["teacher_ppl"] for r in rows if r.get("teacher_ppl") is not None), None)
    return evals, teacher


def describe(fit: dict, run_tokens: int, teacher_ppl: float | None) -> dict:
    """The fit plus what it predicts, in perplexity."""
    out = dict(fit)
    out["asymptotic_ppl"] = math.exp(fit["E"])
    out["asymptotic_ppl_range"] = [math.exp(e) for e in fit["E_range"]]
    out["predictions"] = []
    for m in MULTIPLES:
        ppl = math.exp(float(predict_loss(fit, m * run_tokens)))
        out["predictions"].append({"multiple": m, "tokens": m * run_tokens, "ppl": ppl,
                                   "x_teacher": ppl / teacher_ppl if teacher_ppl else None})
    if teacher_ppl:
        out["tokens_to_1.10x_teacher"] = tokens_to_reach(fit, math.log(TEACHER_MARGIN * teacher_ppl))
    return out


def fit_run(evals: list[dict], teacher_ppl: float | None, min_tokens: int | None, max_tokens: int | None) -> dict:
    if min_tokens is None:
        # The first evaluation falls inside the quantization warmup, before the ternary model is whole.
        min_tokens = evals[1]["tokens"] if len(evals) > 1 else 0
    used = [r for r in evals if r["tokens"] >= min_tokens and (max_tokens is None or r["tokens"] <= max_tokens)]
    tokens = [r["tokens"] for r in used]
    losses = [math.log(r["eval_ppl"]) for r in used]
    run_tokens = evals[-1]["tokens"]
    full = describe(fit_power_law(tokens, losses), run_tokens, teacher_ppl)
    full["tokens_range"] = [min(tokens), max(tokens)]

    # The same fit on the first half of the fitted tokens, scored on the second half it never saw.
    half_limit = max(tokens) / 2
    first = [(t, y) for t, y in zip(tokens, losses) if t <= half_limit]
    rest = [(t, y) for t, y in zip(tokens, losses) if t > half_limit]
    half = None
    if len(first) >= 3:
        half = describe(fit_power_law(*zip(*first)), run_tokens, teacher_ppl)
        half["tokens_range"] = [first[0][0], first[-1][0]]
        if rest:
            t_rest, y_rest = map(np.array, zip(*rest))
            half["holdout_rms"] = float(np.sqrt(np.mean((predict_loss(half, t_rest) - y_rest) ** 2)))
    return {"teacher_ppl": teacher_ppl, "run_tokens": run_tokens, "min_tokens": min_tokens,
            "max_tokens": max_tokens, "note": REPEATED_DATA_NOTE, "full": full, "first_half": half}


def markdown(report: dict, name: str) -> str:
    teacher = report["teacher_ppl"]
    head = ["fit", "points", "tokens fitted", "E", "A", "alpha", "exp(E)", "RMS (nats)"]
    head += [f"ppl @ {m}x" for m in MULTIPLES] + [f"tokens to {TEACHER_MARGIN:.2f}x teacher"]
    lines = [f"### Power-law fit of held-out loss: {name}", "",
             "L(T) = E + A * T^-alpha, L = ln(eval_ppl), T = training tokens. "
             f"Run: {report['run_tokens']:,} tokens" + (f"; teacher ppl {teacher:.2f}." if teacher else "."), "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, fit in (("all", report["full"]), ("first half", report["first_half"])):
        if fit is None:
            continue
        lo, hi = fit["tokens_range"]
        (a_lo, a_hi), (p_lo, p_hi) = fit["alpha_range"], fit["asymptotic_ppl_range"]
        rms = f"{fit['rms']:.4f}" + (f" (holdout {fit['holdout_rms']:.4f})" if "holdout_rms" in fit else "")
        preds = [f"{p['ppl']:.2f}" + (f" ({p['x_teacher']:.2f}x)" if p["x_teacher"] else "") for p in fit["predictions"]]
        reach = fit.get("tokens_to_1.10x_teacher", "n/a")
        reach = "never" if reach is None else reach if isinstance(reach, str) else short_tokens(reach)
        cells = [label, fit["points"], f"{short_tokens(lo)}–{short_tokens(hi)}", f"{fit['E']:.4f}", f"{fit['A']:.4g}",
                 f"{fit['alpha']:.3f} ({a_lo:.2g}–{a_hi:.2g})", f"{fit['asymptotic_ppl']:.2f} ({p_lo:.1f}–{p_hi:.1f})",
                 rms, *preds, reach]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", f"Note: {report['note']}",
              "Brackets: the alphas that the profile likelihood does not reject at ~95% "
              "(n * ln(SSE / SSE_min) <= 3.84), and exp(E) over them. "
              "Holdout: the first-half fit's RMS on the points after the half."]
    if any(fit and fit["alpha_at_grid_edge"] for fit in (report["full"], report["first_half"])):
        lines.append("Warning: alpha hit the edge of its search grid (1e-3..5); E and A are poorly determined.")
    return "\n".join(lines) + "\n"


def short_tokens(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def plot(report: dict, evals: list[dict], name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    used = [r for r in evals if r["tokens"] >= report["min_tokens"]
            and (report["max_tokens"] is None or r["tokens"] <= report["max_tokens"])]
    skipped = [r for r in evals if r not in used]
    ax.plot([r["tokens"] for r in used], [r["eval_ppl"] for r in used], "o", color="C0", label="measured (fitted)")
    if skipped:
        ax.plot([r["tokens"] for r in skipped], [r["eval_ppl"] for r in skipped], "o", mfc="none", color="C0",
                label="measured (not fitted)")
    grid = np.logspace(math.log10(report["full"]["tokens_range"][0]), math.log10(10 * report["run_tokens"]), 200)
    for label, fit, style in (("fit, all", report["full"], "-"), ("fit, first half", report["first_half"], "--")):
        if fit:
            ax.plot(grid, np.exp(predict_loss(fit, grid)), style, label=f"{label}: exp(E)={fit['asymptotic_ppl']:.1f}, "
                    f"alpha={fit['alpha']:.2f}")
    teacher = report["teacher_ppl"]
    if teacher:
        ax.axhline(teacher, color="k", lw=1, label=f"teacher {teacher:.2f}")
        ax.axhline(TEACHER_MARGIN * teacher, color="k", lw=1, ls=":", label=f"{TEACHER_MARGIN:.2f}x teacher")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{name}\n(repeated training text: the fit describes this data budget, not fresh data)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="metrics.jsonl of a training run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", help="output file prefix (default: the metrics file's stem)")
    parser.add_argument("--min-tokens", type=int, help="fit rows with at least this many tokens (default: all "
                        "but the first evaluation, which falls inside the quantization warmup)")
    parser.add_argument("--max-tokens", type=int, help="fit rows with at most this many tokens")
    args = parser.parse_args()
    name = args.name or args.metrics.stem
    evals, teacher = read_metrics(args.metrics)
    if len(evals) < 3:
        parser.error(f"{args.metrics} has {len(evals)} rows with eval_ppl; the fit needs at least 3")
    report = fit_run(evals, teacher, args.min_tokens, args.max_tokens)
    report["metrics"] = str(args.metrics)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(report, name)
    print(table)
    (args.out / f"{name}_fit.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}_fit.md").write_text(table)
    plot(report, evals, name, args.out / f"{name}_fit.png")


if __name__ == "__main__":
    main()
