"""Compare runs of benchmarks/multigpu/recipe.yaml: tokens/s, loss curves, held-out perplexity, exports."""

import argparse
import json
import statistics
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("runs", nargs="+", help="label=run_output_folder")
parser.add_argument("--out", type=Path, required=True)
args = parser.parse_args()


def metrics(folder: Path):
    return [json.loads(x) for x in (folder / "training" / "metrics.jsonl").read_text().splitlines() if x.strip()]


runs = {}
for item in args.runs:
    label, folder = item.split("=", 1)
    rows = metrics(Path(folder))
    train = [r for r in rows if "loss" in r]
    runs[label] = {
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in train[3:]),
        "loss": [r["loss"] for r in train],
        "eval_ppl": [(r["step"], r["eval_ppl"]) for r in rows if "eval_ppl" in r],
        "steps": train[-1]["step"], "tokens": train[-1]["tokens"],
    }
base_label = next(iter(runs))
base = runs[base_label]
lines = ["| run | tokens/s | speed-up | max abs loss diff vs " + base_label + " | final held-out ppl |",
         "| --- | --- | --- | --- | --- |"]
for label, run in runs.items():
    diff = max(abs(a - b) for a, b in zip(run["loss"], base["loss"]))
    run["speedup"] = run["tokens_per_second"] / base["tokens_per_second"]
    run["max_loss_diff"] = diff
    lines.append(f"| {label} | {run['tokens_per_second']:,.0f} | {run['speedup']:.2f}x | {diff:.4f} | "
                 f"{run['eval_ppl'][-1][1]:.3f} |")
table = "\n".join(lines)
print(table)
args.out.mkdir(parents=True, exist_ok=True)
(args.out / "multigpu.json").write_text(json.dumps(runs, indent=2))
(args.out / "multigpu.md").write_text(table + "\n")

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run in runs.items():
        ax.plot(range(1, len(run["loss"]) + 1), run["loss"], label=f"{label} ({run['tokens_per_second']:,.0f} tok/s)")
    ax.set_xlabel("optimizer step (same global batch)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "multigpu_loss.png", dpi=110)
except Exception as err:  # the figures matter more than the plot
    print("plot failed:", err)
