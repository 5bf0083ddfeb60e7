"""The one error type of the evaluation bridge."""

from __future__ import annotations


class EvalError(ValueError):
    """An evaluation cannot start or finish: unknown task, missing data, nothing to score.

    The CLI prints it as one line and exits with status 2.
    """
