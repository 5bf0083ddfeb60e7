"""benchmarks/fit_curve.py: the power-law fit recovers known parameters and keeps its bounds."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fit_curve.py"


def load_script():
    spec = importlib.util.spec_from_file_location("fit_curve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fit_curve = load_script()


def synthetic(E, A, alpha, noise, seed=0, points=30):
    tokens = np.logspace(5, 9, points)
    losses = E + A * tokens**-alpha + np.random.default_rng(seed).normal(0, noise, points)
    return tokens, losses


@pytest.mark.parametrize("E, A, alpha", [(3.2, 40.0, 0.3), (1.5, 800.0, 0.6), (2.0, 5.0, 0.1)])
def test_recovers_known_parameters(E, A, alpha):
    tokens, losses = synthetic(E, A, alpha, noise=1e-4)
    fit = fit_curve.fit_power_law(tokens, losses)
    assert fit["E"] == pytest.approx(E, abs=0.02)
    assert fit["alpha"] == pytest.approx(alpha, rel=0.03)
    # A trades off against alpha, so check the curve it gives rather than A alone.
    assert fit_curve.predict_loss(fit, 1e6) == pytest.approx(E + A * 1e6**-alpha, abs=1e-3)
    assert fit["rms"] < 3e-4
    assert fit["alpha_range"][0] <= fit["alpha"] <= fit["alpha_range"][1]


def test_bounds_hold():
    tokens = np.logspace(6, 8, 10)
    # A loss that rises with tokens would want A < 0: the fit flattens to its mean instead.
    rising = 3.0 + 1e-3 * np.log(tokens)
    fit = fit_curve.fit_power_law(tokens, rising)
    assert fit["A"] == 0 and fit["E"] == pytest.approx(rising.mean())
    # A curve that would extrapolate below zero loss keeps E at 0.
    falling = 10 - np.log(tokens) / 2
    fit = fit_curve.fit_power_law(tokens, falling)
    assert fit["E"] == 0 and fit["A"] > 0 and fit["alpha"] > 0


def test_tokens_to_reach():
    fit = {"E": 1.0, "A": 100.0, "alpha": 0.5}
    assert fit_curve.tokens_to_reach(fit, 2.0) == pytest.approx(1e4)
    assert fit_curve.tokens_to_reach(fit, 1.0) is None


def test_cli_writes_outputs(tmp_path):
    E, A, alpha, teacher = 3.1, 60.0, 0.35, 20.0
    rows = [{"step": 0, "tokens": 0, "teacher_ppl": teacher}]
    for step in range(100, 1300, 100):
        tokens = step * 16384
        rows.append({"step": step, "tokens": tokens, "eval_ppl": math.exp(E + A * tokens**-alpha)})
    metrics = tmp_path / "run_metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), str(metrics), "--out", str(out)],
                            capture_output=True, text=True, check=True)
    assert "| all | 11 |" in result.stdout  # the first evaluation is skipped by default
    report = json.loads((out / "run_metrics_fit.json").read_text())
    assert report["full"]["E"] == pytest.approx(E, abs=0.02)
    assert report["first_half"]["points"] == 5
    assert report["full"]["tokens_to_1.10x_teacher"] is None  # exp(3.1) = 22.2 > 1.10 * 20
    assert (out / "run_metrics_fit.md").read_text().startswith("### Power-law fit")
    assert (out / "run_metrics_fit.png").stat().st_size > 0


def test_linear_solve_matches_brute_force():
    """For a fixed alpha, no (E, A) on a dense grid of the feasible set beats the constrained solve."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        u = np.sort(rng.uniform(0.05, 1.0, 8))
        y = rng.normal(1.0, 1.0, 8)
        alpha = rng.uniform(0.1, 2.0)
        solved = fit_curve._solve_linear(u, y, alpha)
        x = u**-alpha
        E, A = np.meshgrid(np.linspace(0, 4, 401), np.linspace(0, 4, 401))
        sse = ((E[..., None] + A[..., None] * x - y) ** 2).sum(-1)
        assert solved["E"] >= 0 and solved["A"] >= 0
        assert solved["sse"] <= sse.min() + 1e-9
