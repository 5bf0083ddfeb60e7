"""The side-by-side result: one row per (task, metric) with the original, the ternary model and the delta."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EvalRow:
    task: str
    metric: str
    original: float | None
    ternary: float | None
    higher_is_better: bool | None = None
    n: int | None = None  # items (tasks) or tokens (perplexity files) scored
    original_stderr: float | None = None
    ternary_stderr: float | None = None

    @property
    def delta(self) -> float | None:
        if self.original is None or self.ternary is None:
            return None
        return self.ternary - self.original


def _number(value: float | None, metric: str, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    # Perplexities run from ~10 to millions: thousands separators, 2 decimals. Accuracies and bits
    # per byte live near [0, 10]: 4 decimals.
    spec = ",.2f" if "perplexity" in metric else ".4f"
    return format(value, ("+" if signed else "") + spec)


def _arrow(row: EvalRow) -> str:
    return "" if row.higher_is_better is None else (" ↑" if row.higher_is_better else " ↓")


@dataclass
class EvalReport:
    model_dir: Path
    baseline: str
    rows: list[EvalRow]
    settings: dict[str, Any] = field(default_factory=dict)
    baseline_cached: list[str] = field(default_factory=list)  # tasks/files whose original scores came from cache
    notes: list[str] = field(default_factory=list)
    results_path: Path | None = None

    HEADER = ("task", "metric", "n", "original", "ternary", "delta")

    def _cells(self) -> list[tuple[str, ...]]:
        return [(r.task, f"{r.metric}{_arrow(r)}", "-" if r.n is None else f"{r.n:,}", _number(r.original, r.metric),
                 _number(r.ternary, r.metric), _number(r.delta, r.metric, signed=True)) for r in self.rows]

    def table(self) -> str:
        """A plain-text table for the terminal."""
        cells = [self.HEADER, *self._cells()]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.HEADER))]
        left = {0, 1}
        lines = []
        for k, row in enumerate(cells):
            padded = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            lines.append("  ".join(padded).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        extra = []
        if self.baseline_cached:
            extra.append(f"original scores from cache for: {', '.join(self.baseline_cached)}")
        return "\n".join(lines + extra + self.notes)

    def markdown(self) -> str:
        """The same table in Markdown, for the model card and benchmark results."""
        lines = ["| " + " | ".join(self.HEADER) + " |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self._cells()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"model_dir": str(self.model_dir), "baseline": self.baseline, "settings": self.settings,
                "rows": [{**asdict(r), "delta": r.delta} for r in self.rows],
                "baseline_cached": self.baseline_cached, "notes": self.notes}
