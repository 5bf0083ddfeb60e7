"""benchmarks/qat_step_speed.py on the CPU with a tiny random model: it runs, checks the loss of every
variant against the plain path, and writes its table and JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "qat_step_speed.py"


def test_step_speed_benchmark_runs_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--variants", "fused,plain",
                             "--steps", "2", "--warmup", "0", "--out", str(tmp_path), "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "qat_step_speed.json").read_text())
    rows = {row["variant"]: row for row in report["variants"]}
    assert list(rows) == ["plain", "fused"]  # plain first: the reference of the loss check
    assert rows["fused"]["step0_rel_diff"] < 1e-5 and rows["plain"]["tokens_per_second"] > 0
    assert "| fused |" in (tmp_path / "qat_step_speed.md").read_text()
