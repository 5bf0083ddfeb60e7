"""The one progress helper: a tqdm bar that shows loss, tokens/s and ETA, and stays quiet off-terminal."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    """Progress over a budget of steps or of seconds (for wall-clock budgets).

    ``update(step, tokens, **stats)`` is called once per optimizer step with running totals; a stat
    left out keeps its last shown value (the loss is only read back from the GPU at log steps).
    """

    def __init__(self, *, total_steps: int | None = None, total_seconds: float | None = None, desc: str = "train",
                 initial_step: int = 0, initial_seconds: float = 0.0, enabled: bool = True, leave: bool = True):
        self.by_time = total_steps is None
        self.total_seconds = total_seconds
        self._start_seconds = initial_seconds
        self._clock = time.perf_counter()
        self._last_tokens: tuple[float, int] | None = None
        self._stats: dict[str, float] = {}
        self.bar = tqdm(total=(round(total_seconds) if self.by_time else total_steps), desc=desc,
                        initial=(round(initial_seconds) if self.by_time else initial_step),
                        unit=("s" if self.by_time else "step"), disable=not enabled, leave=leave, dynamic_ncols=True,
                        file=sys.stderr, bar_format=None if not self.by_time else
                        "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}s [{elapsed}<{remaining}{postfix}]")

    def update(self, step: int, tokens: int, elapsed_seconds: float, **stats: float) -> None:
        now = time.perf_counter()
        if self._last_tokens is not None and now > self._last_tokens[0]:
            stats["tok/s"] = (tokens - self._last_tokens[1]) / (now - self._last_tokens[0])
        self._last_tokens = (now, tokens)
        self._stats.update(stats)
        stats = self._stats
        if self.by_time:
            self.bar.update(max(0, min(round(elapsed_seconds), self.bar.total) - self.bar.n))
            stats = {"step": step, **stats}
        else:
            self.bar.update(step - self.bar.n)
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in stats.items()}, refresh=False)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
