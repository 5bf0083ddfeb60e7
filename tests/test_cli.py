"""The command line end to end on a tiny local model: quantize, inspect, generate, and its errors."""

import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from bitconvert.cli import main


def invoke(*args):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


def test_quantize_then_inspect_and_generate(tmp_path, tiny_llama_dir, corpus_file):
    out = tmp_path / "tern"
    result = invoke("quantize", tiny_llama_dir, "--out", out, "--data", corpus_file, "--steps", 3, "--seq-len", 32,
                    "--batch-size", 2, "--weight-scale", "tensor", "--device", "cpu", "--set", "train.log_every=1")
    assert result.exit_code == 0, result.output
    assert "trained 3 steps, 192 tokens" in result.output and f"exported packed: {out}" in result.output
    for name in ("model.safetensors", "config.json", "bitconvert.json", "README.md", "recipe.yaml",
                 "training_curves.png", "training/metrics.jsonl"):
        assert (out / name).is_file(), name
    assert len((out / "training" / "metrics.jsonl").read_text().splitlines()) == 3
    plain = AutoModelForCausalLM.from_pretrained(out)  # per-tensor scales: plain transformers loads it
    assert torch.isfinite(plain(torch.tensor([[1, 2, 3]])).logits).all()

    result = invoke("inspect", out)
    assert result.exit_code == 0 and "files verified" in result.output
    assert "loads in plain transformers: yes" in result.output
    result = invoke("generate", out, "The river", "--max-new-tokens", 4, "--device", "cpu")
    assert result.exit_code == 0 and result.output.startswith("The river")

    # a finished run continued with a larger budget: trains on from its checkpoint, re-exports, verifies
    result = invoke("quantize", tiny_llama_dir, "--out", out, "--data", corpus_file, "--steps", 5, "--seq-len", 32,
                    "--batch-size", 2, "--weight-scale", "tensor", "--device", "cpu", "--set", "train.log_every=1",
                    "--resume")
    assert result.exit_code == 0, result.output
    assert "trained 5 steps" in result.output
    result = invoke("inspect", out)
    assert result.exit_code == 0 and "files verified" in result.output, result.output


def test_ctrl_c_in_the_export_keeps_the_last_checkpoint_and_resume_only_exports(tmp_path, tiny_llama_dir, corpus_file,
                                                                               monkeypatch):
    import bitconvert.api

    out = tmp_path / "tern"
    args = ["quantize", tiny_llama_dir, "--out", out, "--data", corpus_file, "--steps", 3, "--seq-len", 32,
            "--batch-size", 2, "--weight-scale", "tensor", "--device", "cpu", "--set", "train.log_every=1"]
    export_all = bitconvert.api.export_all

    def interrupted_export(*args, **kwargs):
        raise KeyboardInterrupt  # what a Ctrl-C (or `timeout -s INT`) after the last step does

    monkeypatch.setattr(bitconvert.api, "export_all", interrupted_export)
    result = invoke(*args)
    assert result.exit_code == 130 and "aborted (Ctrl-C)" in result.output and "--resume" in result.output, result.output
    assert not (out / "bitconvert.json").exists() and not (out / "model.safetensors").exists()
    assert (out / "training" / "checkpoints" / "step-0000003").is_dir()

    monkeypatch.setattr(bitconvert.api, "export_all", export_all)
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert "trained 3 steps" in result.output and (out / "bitconvert.json").is_file()
    assert len((out / "training" / "metrics.jsonl").read_text().splitlines()) == 3  # no step trained twice


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_llama_dir):
    result = invoke("quantize", tmp_path / "no-such-model", "--out", tmp_path / "x", "--steps", 1)
    assert result.exit_code == 2 and "error: no model at" in result.output and "Traceback" not in result.output, result.output
    result = invoke("quantize", tiny_llama_dir, "--out", tmp_path / "x", "--steps", 1, "--set", "train.lerning_rate=1")
    assert result.exit_code == 2 and "train.lerning_rate: unknown key" in result.output, result.output
    result = invoke("quantize", tiny_llama_dir, "--out", tmp_path / "x", "--steps", 1, "--data", tmp_path / "none.txt")
    assert result.exit_code == 2 and "none.txt does not exist" in result.output, result.output
    # a task tracked during training without its data fails before anything trains
    (tmp_path / "empty").mkdir()
    result = invoke("quantize", tiny_llama_dir, "--out", tmp_path / "x", "--steps", 1, "--set", "eval.tasks=[piqa_local]",
                    "--set", "eval.track_every=1", "--set", f"eval.data_dir={tmp_path / 'empty'}")
    assert result.exit_code == 2 and "piqa_local: no data at" in result.output, result.output
    assert not (tmp_path / "x" / "training").exists()
    assert not (tmp_path / "x" / "model.safetensors").exists()
    # a misspelt train.freeze pattern: named, before any data is read or step is taken
    result = invoke("quantize", tiny_llama_dir, "--out", tmp_path / "y", "--steps", 1, "--set", "train.freeze=[embed_tokns]")
    assert result.exit_code == 2 and "train.freeze: ['embed_tokns'] match no parameter" in result.output, result.output
    assert not (tmp_path / "y" / "training").exists()
    result = invoke("inspect", tiny_llama_dir)
    assert result.exit_code == 2 and "not a finished bitconvert export" in result.output, result.output


def test_run_dry_run_prints_the_resolved_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: smollm2-135m\ntrain: {steps: 5}\n")
    result = invoke("run", recipe, "--dry-run", "--set", "train.lr=3e-4")
    assert result.exit_code == 0
    assert "lr: 0.0003" in result.output and "steps: 5" in result.output and "weight_scale:" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm2-135m\ntrain: {stesp: 5}\n")
    result = invoke("run", bad)
    assert result.exit_code == 2 and "train.stesp: unknown key; did you mean 'steps'?" in result.output
