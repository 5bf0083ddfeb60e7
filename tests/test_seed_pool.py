"""benchmarks/seed_pool.py: rows repeated over seeds pool into means, and a difference is set against its noise."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "seed_pool.py"

spec = importlib.util.spec_from_file_location("seed_pool", SCRIPT)
seed_pool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_pool)


def row(name, piqa, ppl=30.0, steps=300):
    return {"name": name, "steps": steps, "piqa_acc": piqa, "final_ppl": ppl}


def report(number, *rows):
    return {"round": number, "device": "GPU", "original_ppl": 25.0, "original_piqa": 0.65, "configs": list(rows)}


def test_config_and_seed_from_a_row_name():
    assert seed_pool.config_and_seed("chat_teacher_text_seed_2") == ("chat_teacher_text", 2)
    assert seed_pool.config_and_seed("reference") == ("reference", 0)
    assert seed_pool.config_and_seed("chat_4x_tracked") == ("chat", 0)  # the steps column says how long it trained
    assert seed_pool.config_and_seed("chat_4x_seed_1") == ("chat", 1)


def test_pairs_of_one_seed_and_steps_span_budgets():
    result = seed_pool.pool([report(8, row("reference", 0.55, 28.0), row("reference_seed_1", 0.57),
                                    row("chat", 0.56, 28.0), row("chat_seed_1", 0.60), row("chat_seed_2", 0.5)),
                             report(10, row("chat_4x_tracked", 0.60, 26.0, steps=1200),
                                    row("reference_4x", 0.57, 26.0, steps=1200))])
    (pairs,) = result["paired"]  # chat's seed 2 has no reference run to pair with
    assert [(q["steps"], q["seed"]) for q in pairs["pairs"]] == [(300, 0), (300, 1), (1200, 0)]
    assert pairs["piqa_differences"] == pytest.approx([0.01, 0.03, 0.03])
    assert pairs["piqa_mean_difference"] == pytest.approx(0.07 / 3)
    assert pairs["piqa_standard_error"] == pytest.approx(statistics.stdev([0.01, 0.03, 0.03]) / math.sqrt(3))
    assert pairs["ppl_ratios"] == pytest.approx([1.0, 1.0, 1.0])


def test_groups_pool_over_reports_and_set_against_the_reference():
    first = report(8, row("reference", 0.55, 27.0), row("reference_seed_1", 0.57, 29.0), row("chat", 0.60, 30.0),
                   row("lonely", 0.9), row("reference", 0.9, steps=1200), {"name": "skipped", "steps": 300})
    second = report(9, row("chat_seed_1", 0.62, 32.0))
    result = seed_pool.pool([first, second])
    by_name = {g["config"]: g for g in result["groups"]}
    assert list(by_name) == ["reference", "chat"]  # one seed alone (lonely, 1,200 steps) is not a group
    assert by_name["reference"]["rounds"] == [8, 8] and by_name["chat"]["rounds"] == [8, 9]
    assert by_name["chat"]["piqa_mean"] == pytest.approx(0.61) and by_name["reference"]["ppl_ratio"] == pytest.approx(28 / 25)
    sd = math.sqrt((0.01 ** 2 * 2 + 0.01 ** 2 * 2) / 2)  # each pair's sample sd is 0.0141
    assert result["pooled_piqa_sd"] == pytest.approx(sd)
    assert by_name["chat"]["piqa_minus_reference"] == pytest.approx(0.05)
    assert by_name["chat"]["noise_of_difference"] == pytest.approx(sd * math.sqrt(1 / 2 + 1 / 2))
    assert by_name["chat"]["ppl_vs_reference"] == pytest.approx(31 / 28 - 1)


def test_a_row_twice_or_different_originals_are_errors():
    with pytest.raises(ValueError, match="appears twice"):
        seed_pool.pool([report(8, row("a", 0.5), row("a_seed_1", 0.5)), report(9, row("a", 0.6))])
    other = report(9, row("a_seed_2", 0.5))
    other["original_ppl"] = 26.0
    with pytest.raises(ValueError, match="different originals"):
        seed_pool.pool([report(8, row("a", 0.5), row("a_seed_1", 0.5)), other])
    with pytest.raises(ValueError, match="two seeds or more"):
        seed_pool.pool([report(8, row("a", 0.5))])


def test_the_committed_rounds_pool(tmp_path):
    """The script as run from the command line on rounds 8-12, as docs/benchmarks.md quotes it."""
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    result = json.loads((tmp_path / "seed_pool.json").read_text())
    assert [g["config"] for g in result["groups"]][0] == "reference"
    assert {g["config"]: len(g["seeds"]) for g in result["groups"]} == {
        "reference": 5, "chat_and_wiki_teacher_text": 5, "chat_teacher_text": 3}
    assert {p["config"]: len(p["pairs"]) for p in result["paired"]} == {"chat_and_wiki_teacher_text": 6,
                                                                      "chat_teacher_text": 4}
    assert (tmp_path / "seed_pool.md").read_text().startswith("# Ablation rows pooled over seeds")
