#!/usr/bin/env python
"""BitNet's absmean fit, the TWN fit and a learned step on the CPU quickstart's budget (recipes/cpu-quickstart.yaml).

Both runs take the recipe as it is, with one ``convert.ternary_fit`` each and a fixed number of steps instead of
its minutes, so that a busy CPU does not change what each one trains. The teacher samples the same text for both
(the same seed), and the loop's held-out perplexity on a tenth of that text scores them.

    python benchmarks/quickstart_fit.py [--steps 80] [--work /tmp/quickstart_fit] [--out benchmarks/results]

A run whose export under --work is finished is read, not repeated. Writes OUT/quickstart_fit.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitconvert.api import quantize  # noqa: E402
from bitconvert.recipes.loading import load_recipe  # noqa: E402
from bitconvert.utils.io import atomic_write_text  # noqa: E402
from bitconvert.utils.plots import read_metrics  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cpu-quickstart.yaml"
FITS = ("absmean", "twn", "learned")


def run_fit(fit: str, steps: int, work: Path) -> dict:
    out = work / fit
    recipe = load_recipe(RECIPE, [f"train.steps={steps}", "train.minutes=null", f"convert.ternary_fit={fit}",
                                  f"output={out}"])
    if not (out / "bitconvert.json").is_file():
        quantize(recipe)
    rows = read_metrics(out / "training" / "metrics.jsonl")
    evals = [(r["step"], r["eval_ppl"]) for r in rows if "eval_ppl" in r]
    teacher = next(r["teacher_ppl"] for r in rows if "teacher_ppl" in r)
    trained = [r for r in rows if "loss" in r][-1]
    sample = next((out / "training" / "data").glob("generated-*.jsonl"))
    return {"fit": fit, "steps": trained["step"], "tokens": trained["tokens"], "train_seconds": trained["elapsed"],
            "held_out_ppl": dict(evals), "final_ppl": evals[-1][1], "teacher_ppl": teacher,
            "teacher_text": sample.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80, help="about the recipe's 6 minutes on 2 cores")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quickstart_fit"), help="run folders")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--fits", default=",".join(FITS), help="comma list; the first is the table's yardstick")
    args = parser.parse_args()

    rows = [run_fit(fit, args.steps, args.work) for fit in args.fits.split(",")]
    if len({r["teacher_text"] for r in rows}) != 1:
        sys.exit(f"the runs trained on different teacher text: {[r['teacher_text'] for r in rows]}")
    report = {"recipe": str(RECIPE.name), "steps": args.steps, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "rows": rows}
    steps = sorted({step for r in rows for step in r["held_out_ppl"]})
    md = ["# The ternary fit on the CPU quickstart's budget", "",
          f"`recipes/cpu-quickstart.yaml` (SmolLM2-135M, data-free distillation, per-channel scales) for {args.steps} "
          f"steps with each fit, on the same teacher text (teacher's own perplexity on it: {rows[0]['teacher_ppl']:.1f}). "
          "Held-out perplexity on a tenth of that text.", "",
          "| fit | " + " | ".join(f"ppl at step {s}" for s in steps) + f" | × {rows[0]['fit']}'s | tokens | training s |",
          "| --- | " + " | ".join("---:" for _ in steps) + " | ---: | ---: | ---: |"]
    for r in rows:
        cells = " | ".join(f"{r['held_out_ppl'][s]:.1f}" if s in r["held_out_ppl"] else "" for s in steps)
        md.append(f"| {r['fit']} | {cells} | {r['final_ppl'] / rows[0]['final_ppl']:.2f} | {r['tokens']:,} | "
                  f"{r['train_seconds']:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "quickstart_fit.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out / "quickstart_fit.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
