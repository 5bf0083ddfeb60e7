"""Training curves as a PNG, from the metrics JSONL the trainer writes."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash: ignore it
                continue
    return rows


def plot_training_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike, title: str = "") -> Path | None:
    """Loss terms, held-out perplexity and any tracked task scores (``eval.track_every``) against training
    tokens. Returns None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_ppl" in r]
    if not train and not evals:
        return None
    tracked = [r for r in rows if "tasks" in r]
    fig, axes = plt.subplots(1, 3 if tracked else 2, figsize=(16 if tracked else 11, 4))
    for key in ("loss", "kl", "ce", "hidden"):
        points = [(r["tokens"], r[key]) for r in train if key in r]
        if points:
            axes[0].plot(*zip(*points), label=key)
    axes[0].set_xlabel("training tokens")
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("training loss")
    if evals:
        axes[1].plot([r["tokens"] for r in evals], [r["eval_ppl"] for r in evals], marker="o", label="student")
        teacher = next((r["teacher_ppl"] for r in rows if "teacher_ppl" in r), None)
        if teacher:
            axes[1].axhline(teacher, color="gray", linestyle="--", label=f"original ({teacher:.2f})")
        axes[1].set_yscale("log")
        axes[1].legend()
    axes[1].set_xlabel("training tokens")
    axes[1].set_ylabel("held-out perplexity")
    axes[1].set_title("held-out perplexity")
    if tracked:
        teacher = next((r["teacher_tasks"] for r in rows if "teacher_tasks" in r), {})
        for name in dict.fromkeys(k for r in tracked for k in r["tasks"]):
            points = [(r["tokens"], r["tasks"][name]) for r in tracked if name in r["tasks"]]
            line, = axes[2].plot(*zip(*points), marker="o", label=name)
            if name in teacher:
                axes[2].axhline(teacher[name], color=line.get_color(), linestyle="--",
                                label=f"original ({teacher[name]:.3f})")
        axes[2].legend(fontsize="small")
        axes[2].set_xlabel("training tokens")
        axes[2].set_ylabel("score")
        axes[2].set_title("tracked tasks")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
