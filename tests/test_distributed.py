"""Processes: a real 2-process run (torchrun, gloo on CPU) matches one process with the same global batch, and
the accelerate state of one process takes a second run with other settings."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import build_tiny_model


@pytest.mark.slow
def test_two_processes_equal_one_process_with_grad_accum(tmp_path, tiny_tokenizer, corpus_file):
    model_dir = tmp_path / "model"
    build_tiny_model("llama", len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    piqa = tmp_path / "data" / "piqa"  # PIQA tracked during training: the main process scores, the other waits
    piqa.mkdir(parents=True)
    (piqa / "valid.jsonl").write_text("".join(json.dumps({"goal": f"goal {i}", "sol1": "one way", "sol2": "another"})
                                              + "\n" for i in range(3)))
    (piqa / "valid-labels.lst").write_text("0\n1\n0\n")
    recipe = {"model": str(model_dir), "device": "cpu",
              "data": {"train": [{"path": str(corpus_file)}], "sequence_length": 32, "eval_fraction": 0.1},
              "train": {"mode": "distill", "steps": 5, "batch_size": 2, "log_every": 1, "warmup_steps": 1,
                        "quant_warmup_steps": 2},
              "eval": {"tasks": ["piqa_local"], "track_every": 2, "data_dir": str(tmp_path / "data")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "bitconvert.cli",
                          "-q", "run", str(tmp_path / "r.yaml"), "--set", f"output={tmp_path / 'two'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained 5 steps, 640 tokens") == 1  # only the main process reports
    one = subprocess.run([sys.executable, "-m", "bitconvert.cli", "-q", "run", str(tmp_path / "r.yaml"),
                          "--set", f"output={tmp_path / 'one'}", "--set", "train.grad_accum=2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    def curve(run):
        rows = [json.loads(x) for x in (tmp_path / run / "training" / "metrics.jsonl").read_text().splitlines()]
        return ([r["loss"] for r in rows if "loss" in r], [r["eval_ppl"] for r in rows if "eval_ppl" in r],
                [(r["step"], r["tasks"]) for r in rows if "tasks" in r])

    (loss_two, ppl_two, tasks_two), (loss_one, ppl_one, tasks_one) = curve("two"), curve("one")
    assert len(loss_two) == 5
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    assert ppl_two == pytest.approx(ppl_one, rel=1e-5)
    assert [step for step, _ in tasks_two] == [2, 4, 5] and tasks_two == tasks_one
    assert (tmp_path / "two" / "eval" / "results.json").is_file()  # and the export scored after training


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_second_run_in_one_process_may_change_the_accelerator_settings(fresh_accelerate_state):
    """A GPU run (bf16) and then a CPU run in one notebook: accelerate alone refuses the second Accelerator."""
    from accelerate import Accelerator

    from bitconvert.api import make_accelerator
    from bitconvert.recipes.schema import Recipe

    Accelerator(cpu=True, mixed_precision="bf16")
    accelerator = make_accelerator(Recipe(device="cpu"))
    assert str(accelerator.mixed_precision) == "no" and accelerator.device.type == "cpu"


def test_cpu_processes_meet_on_their_own_group(monkeypatch):
    """accelerate < 1.16 gives a CPU barrier ``device_ids``, which a machine with fewer GPUs than processes fails."""
    from accelerate.utils import DistributedType

    from bitconvert.train.processes import wait_for_everyone

    calls = []
    monkeypatch.setattr("torch.distributed.barrier", lambda *args, **kwargs: calls.append(("torch", args, kwargs)))

    class Processes:
        def __init__(self, kind):
            self.distributed_type = kind

        def wait_for_everyone(self):
            calls.append(("accelerate", (), {}))

    wait_for_everyone(Processes(DistributedType.MULTI_CPU))
    wait_for_everyone(Processes(DistributedType.MULTI_GPU))
    assert calls == [("torch", (), {}), ("accelerate", (), {})]
