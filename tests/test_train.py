"""QAT loop: learning, exact resume, Ctrl-C, atomic checkpoints, data sources."""

import errno
import json
import math
import os
import signal

import pytest
import torch

from bitconvert.recipes.schema import DataConfig, DataSource, TrainConfig
from bitconvert.train import loop as loop_module
from bitconvert.train.checkpoint import latest_checkpoint, list_checkpoints
from bitconvert.train.data import DataError, build_training_data, read_texts
from bitconvert.train.loop import (
    batch_size_at,
    learning_rate,
    planned_steps,
    quant_strength,
    train,
    weight_decay_on,
)
from bitconvert.utils.io import DiskFullError


def make_run(tiny_tokenizer, corpus_file, fit="absmean", **train_overrides):
    from accelerate import Accelerator

    from bitconvert.convert import convert_to_bitnet
    from bitconvert.quant import QuantSpec
    from conftest import build_tiny_model

    teacher = build_tiny_model("llama", len(tiny_tokenizer))
    student = build_tiny_model("llama", len(tiny_tokenizer))
    convert_to_bitnet(student, QuantSpec(weight_scale="channel", ternary_fit=fit))
    data = build_training_data(DataConfig(train=[DataSource(path=str(corpus_file))], sequence_length=32,
                                          eval_fraction=0.1), tiny_tokenizer, seed=0, cache_dir=corpus_file.parent)
    cfg = TrainConfig(**{"mode": "distill", "steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
                         "quant_warmup_steps": 2, "log_every": 1, "save_every": 0, "mixed_precision": "no",
                         **train_overrides})
    return student, teacher, data, cfg, Accelerator(cpu=True)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_distillation_lowers_the_loss(tmp_path, tiny_tokenizer, corpus_file):
    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, steps=30, lr=1e-2)
    result = train(student, teacher, data, cfg, tmp_path, accelerator=acc)
    losses = [r["loss"] for r in result.metrics if "loss" in r]
    assert result.steps == 30 and not result.interrupted
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[2:7]) / 5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["teacher_ppl"] > 1 and "eval_ppl" in rows[-1]
    assert {"tokens_per_second", "lr", "quant_strength", "kl", "ce"} <= set(rows[1])


def interrupt_at(monkeypatch, call: int):
    """Deliver a real SIGINT (as Ctrl-C does) during the given micro-batch."""
    real = loop_module.compute_losses
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "compute_losses", interrupting)
    return lambda: monkeypatch.setattr(loop_module, "compute_losses", real)


def test_ctrl_c_then_resume_continues_exactly(tmp_path, tiny_tokenizer, corpus_file, monkeypatch):
    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file)
    train(student, teacher, data, cfg, tmp_path / "straight", accelerator=acc)
    reference = weights(student)

    restore = interrupt_at(monkeypatch, 3)
    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file)
    result = train(student, teacher, data, cfg, tmp_path / "split", accelerator=acc)
    assert result.interrupted and result.steps == 3  # the step in flight finishes, then a checkpoint
    assert latest_checkpoint(tmp_path / "split").name == "step-0000003"
    restore()

    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file)  # a new process would start like this
    result = train(student, teacher, data, cfg, tmp_path / "split", accelerator=acc, resume=True)
    assert result.steps == 6 and not result.interrupted
    for key, value in weights(student).items():
        assert torch.equal(value, reference[key]), key
    straight = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    split = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in straight] == [r.get("loss") for r in split]


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, tiny_tokenizer, corpus_file, monkeypatch):
    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, save_every=2)
    real_save = acc.save_state
    calls = {"n": 0}

    def failing_save(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(path, *args, **kwargs)  # write half of it, then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(acc, "save_state", failing_save)
    with pytest.raises(DiskFullError, match="previous checkpoint step-0000002 is intact"):
        train(student, teacher, data, cfg, tmp_path, accelerator=acc)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path, tiny_tokenizer, corpus_file):
    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, steps=2)
    train(student, teacher, data, cfg, tmp_path, accelerator=acc)
    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, batch_size=2)
    with pytest.raises(loop_module.ResumeError, match="batch_size was 4, now 2"):
        train(student, teacher, data, cfg, tmp_path, accelerator=acc, resume=True)


def test_frozen_parameters_stay_as_they_are_and_a_typo_fails_first(tmp_path, tiny_tokenizer, corpus_file):
    from bitconvert.recipes.loading import RecipeError

    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, steps=3, freeze=["lm_head"])
    student.lm_head.weight = student.model.embed_tokens.weight  # tied, as in SmolLM2: freezing the head freezes both
    before = weights(student)
    train(student, teacher, data, cfg, tmp_path / "run", accelerator=acc)
    after = weights(student)
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])

    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, steps=3, freeze=["embed_token"])
    with pytest.raises(RecipeError, match=r"\['embed_token'\] match no parameter"):
        train(student, teacher, data, cfg, tmp_path / "typo", accelerator=acc)
    assert not (tmp_path / "typo").exists()


def test_schedules():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, quant_warmup_steps=40)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(cfg, 10, 0.1) < 1.0 and learning_rate(cfg, 100, 1.0) == pytest.approx(0.1)
    assert quant_strength(cfg, 20, 0.2) == pytest.approx(0.5)
    # a budget shorter than the warmup is still fully ternary for its second half
    assert quant_strength(cfg, 5, 0.5) == 1.0


def test_two_stage_schedule_drops_at_the_cooldown_and_stops_weight_decay():
    cfg = TrainConfig(steps=100, lr=1.5e-3, min_lr_ratio=0.0, warmup_steps=0, schedule="two_stage",
                      cooldown_at=0.5, cooldown_lr_ratio=1 / 3, weight_decay=0.1)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(1.5e-3)
    assert learning_rate(cfg, 49, 0.4999) == pytest.approx(7.5e-4, rel=1e-3)  # stage 1 ends at lr / 2
    assert learning_rate(cfg, 50, 0.5) == pytest.approx(5e-4)  # then drops, as 2B4T's 8e-4 -> 5e-4
    assert learning_rate(cfg, 100, 1.0) == pytest.approx(0.0, abs=1e-12)
    rates = [learning_rate(cfg, s, s / 100) for s in range(101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert weight_decay_on(cfg, 0.49) and not weight_decay_on(cfg, 0.5)
    assert weight_decay_on(TrainConfig(steps=1), 0.9)
    with pytest.raises(ValueError, match="cooldown_lr_ratio"):
        TrainConfig(steps=1, schedule="two_stage", cooldown_lr_ratio=0.05, min_lr_ratio=0.1)


def test_two_stage_training_turns_weight_decay_off_for_the_cooldown(tmp_path, tiny_tokenizer, corpus_file, monkeypatch):
    seen = []
    real_step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append([(g["weight_decay"], g["lr"]) for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, steps=4, warmup_steps=0,
                                                schedule="two_stage", weight_decay=0.1)
    train(student, teacher, data, cfg, tmp_path, accelerator=acc)
    assert [groups[0][0] for groups in seen] == [0.1, 0.1, 0.0, 0.0]  # the matrices: decay, then the cooldown
    assert all(groups[1][0] == 0.0 for groups in seen)  # norms and biases never decay


def test_batch_ramp_doubles_up_to_the_batch_size():
    cfg = TrainConfig(tokens=10_000, batch_size=32, batch_ramp={"start": 8, "share": 0.2})
    assert [batch_size_at(cfg, p) for p in (0.0, 0.09, 0.1, 0.19, 0.2, 0.9)] == [8, 8, 16, 16, 32, 32]
    assert batch_size_at(TrainConfig(tokens=1, batch_size=32), 0.0) == 32
    # tokens budget: the ramp's small steps come first, then full ones; without a ramp, ceil(tokens / step)
    assert planned_steps(cfg, 10, 1) == 13 + 6 + 25  # 80 tokens a step to 1040, 160 to 2000, then 320
    assert planned_steps(TrainConfig(tokens=10_000, batch_size=32), 10, 1) == 32
    for start in (5, 12, 32):
        with pytest.raises(ValueError, match="power of two"):
            TrainConfig(steps=1, batch_size=32, batch_ramp={"start": start})
    with pytest.raises(ValueError, match="batch_ramp"):
        TrainConfig(steps=1, batch_size=32, batch_ramp={"start": 8, "sahre": 0.2})


def test_batch_ramp_trains_the_same_tokens_in_more_steps_and_resumes_exactly(tmp_path, tiny_tokenizer, corpus_file,
                                                                              monkeypatch):
    ramp = {"tokens": 16 * 32, "batch_ramp": {"start": 1, "share": 0.5}, "steps": None}
    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, **ramp)
    result = train(student, teacher, data, cfg, tmp_path / "straight", accelerator=acc)
    rows = [r for r in result.metrics if "batch_size" in r]
    # 16 blocks: the first 4 one a step, the next 4 two a step, the last 8 four a step
    assert [r["batch_size"] for r in rows] == [1, 1, 1, 1, 2, 2, 4, 4]
    assert result.steps == 8 and result.tokens == cfg.tokens
    reference = weights(student)

    restore = interrupt_at(monkeypatch, 5)  # inside the ramp
    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, **ramp)
    assert train(student, teacher, data, cfg, tmp_path / "split", accelerator=acc).interrupted
    restore()
    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, **ramp)
    result = train(student, teacher, data, cfg, tmp_path / "split", accelerator=acc, resume=True)
    assert result.steps == 8
    for key, value in weights(student).items():
        assert torch.equal(value, reference[key]), key

    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, tokens=ramp["tokens"], steps=None)
    with pytest.raises(loop_module.ResumeError, match="batch_ramp"):
        train(student, teacher, data, cfg, tmp_path / "split", accelerator=acc, resume=True)


def test_blocks_continue_the_batches_stream(tiny_tokenizer, corpus_file):
    data = build_training_data(DataConfig(train=[DataSource(path=str(corpus_file))], sequence_length=16),
                               tiny_tokenizer, seed=0, cache_dir=corpus_file.parent)
    stream = torch.cat([data.batch(i, 3) for i in range(4)])
    assert torch.equal(data.blocks(2, 7), stream[2:9])


def test_data_sources(tmp_path, tiny_tokenizer):
    good = tmp_path / "docs.jsonl"
    good.write_text('{"text": "hello there"}\n\n{"text": "general kenobi"}\n')
    assert list(read_texts(DataSource(path=str(good)))) == ["hello there", "general kenobi"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1 has no text field 'text'"):
        list(read_texts(DataSource(path=str(bad))))
    with pytest.raises(DataError, match="does not exist"):
        list(read_texts(DataSource(path=str(tmp_path / "missing.txt"))))
    import datasets

    datasets.Dataset.from_dict({"body": ["one two three"] * 3}).save_to_disk(str(tmp_path / "saved"))
    assert list(read_texts(DataSource(path=str(tmp_path / "saved"), text_field="body"))) == ["one two three"] * 3
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    with pytest.raises(DataError, match="less than one block"):
        build_training_data(DataConfig(train=[DataSource(path=str(tiny))], sequence_length=64), tiny_tokenizer,
                            seed=0, cache_dir=tmp_path)


def test_mixing_keeps_every_block_of_every_source(caplog):
    from bitconvert.train.data import _mix

    small = torch.arange(3).reshape(3, 1)
    large = torch.arange(100, 110).reshape(10, 1)
    pool = _mix([small, large], [1.0, 2.0])  # 10 blocks at 2/3 need a pool of 15: small repeats to 5
    assert set(large.flatten().tolist()) <= set(pool.flatten().tolist())
    assert (pool < 100).sum().item() == 5 and (pool >= 100).sum().item() == 10
    # a weight far below a source's share of the blocks would need a huge pool: capped, and said
    with caplog.at_level("WARNING"):
        capped = _mix([small, large], [1.0, 0.001])
    assert len(capped) <= 8 * 13 + 1 and "only 1 of its 10 blocks" in caplog.text  # every source keeps a block


def test_held_out_blocks_may_be_shorter_than_training_blocks(tmp_path, tiny_tokenizer, corpus_file):
    source = DataSource(path=str(corpus_file))
    data = build_training_data(DataConfig(train=[source], eval=source, sequence_length=64, eval_sequence_length=16),
                               tiny_tokenizer, seed=0, cache_dir=tmp_path)
    assert data.pool.shape[1] == 64 and data.eval_blocks.shape[1] == 16
    with pytest.raises(ValueError, match="eval_sequence_length applies to data.eval"):
        DataConfig(train=[source], eval_fraction=0.1, eval_sequence_length=16)


def test_batches_are_deterministic_and_disjoint_across_ranks(tiny_tokenizer, corpus_file):
    data = build_training_data(DataConfig(train=[DataSource(path=str(corpus_file))], sequence_length=16),
                               tiny_tokenizer, seed=3, cache_dir=corpus_file.parent)
    a = data.batch(5, 4, rank=0, world=2)
    b = data.batch(5, 4, rank=1, world=2)
    assert torch.equal(a, data.batch(5, 4, rank=0, world=2))
    assert not torch.equal(a, b)
    one_rank = torch.cat([data.batch(10, 4), data.batch(11, 4)])
    assert torch.equal(one_rank, torch.cat([a, b]))  # two ranks see what one rank sees over two micro-steps


def test_teacher_continues_prompts_from_a_file(tmp_path, tiny_tokenizer, corpus_file, monkeypatch):
    from bitconvert.recipes.schema import GenerateSource
    from bitconvert.train.sampling import generate_texts
    from conftest import build_tiny_model

    monkeypatch.setenv("PROMPT_DIR", str(corpus_file.parent))  # recipes say ${BITCONVERT_DATA}/...
    config = GenerateSource(tokens=64, sequence_length=16, batch_size=4, prompts_from="${PROMPT_DIR}/" + corpus_file.name,
                            prompt_tokens=6)
    texts = generate_texts(build_tiny_model("llama", len(tiny_tokenizer)), tiny_tokenizer, config, seed=0, device="cpu")
    lines = [line for line in corpus_file.read_text().splitlines() if line.strip()]
    starts = {tiny_tokenizer.decode(tiny_tokenizer(line, add_special_tokens=False)["input_ids"][:6]) for line in lines}
    assert len(texts) == 4 and all(any(text.startswith(start) for start in starts) for text in texts)
    with pytest.raises(DataError, match="no line"):
        generate_texts(None, tiny_tokenizer, config.model_copy(update={"prompt_tokens": 10_000}), seed=0, device="cpu")
    with pytest.raises(ValueError, match="at most one of prompts, prompts_from"):
        GenerateSource(prompts=["a"], prompts_from=str(corpus_file))


def test_learned_steps_train_without_weight_decay(tmp_path, tiny_tokenizer, corpus_file, monkeypatch):
    """``ternary_fit: learned``: every log step moves, and none is in the optimizer's decayed group."""
    from bitconvert.convert import quantized_modules

    groups = []
    real_adamw = torch.optim.AdamW

    def recording_adamw(param_groups, **kwargs):
        groups.extend(param_groups)
        return real_adamw(param_groups, **kwargs)

    monkeypatch.setattr(loop_module.torch.optim, "AdamW", recording_adamw)
    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, "learned", steps=4, weight_decay=0.1)
    steps = {n: p.detach().clone() for n, p in student.named_parameters() if n.endswith("_log_step")}
    assert len(steps) == len(quantized_modules(student))
    train(student, teacher, data, cfg, tmp_path, accelerator=acc)

    decayed = {id(p) for p in groups[0]["params"]}
    named = dict(student.named_parameters())
    assert not any(id(named[n]) in decayed for n in steps)
    assert id(named["model.layers.0.mlp.down_proj.weight"]) in decayed
    moved = [n for n, before in steps.items() if not torch.equal(named[n].detach(), before)]
    assert len(moved) == len(steps)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


@pytest.mark.parametrize("mode, fit", [(True, "absmean"), ("layers", "absmean"), ("layers", "learned")])
def test_compiled_student_trains_like_eager(tmp_path, tiny_tokenizer, corpus_file, mode, fit):
    """train.compile: torch.compile over BitLinear layers (straight-through quantizers, the quant
    strength buffer, a learned step), the whole student (true, as older recipes say: model) or each decoder
    block, runs a training step and gives the eager loss."""
    losses = {}
    for compiled in (False, mode):
        student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, fit, steps=2, compile=compiled)
        result = train(student, teacher, data, cfg, tmp_path / str(compiled), accelerator=acc)
        losses[compiled] = [r["loss"] for r in result.metrics if "loss" in r]
        assert result.steps == 2
    assert all(math.isfinite(x) for x in losses[mode])
    assert losses[mode] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)


def test_tasks_are_tracked_during_training_and_leave_it_unchanged(tmp_path, tiny_tokenizer, corpus_file):
    """eval.track_every: the teacher scored once, the student every N steps and at the end, through the
    harness on a local task; the run's weights are those of a run without tracking."""
    from bitconvert.eval import EvalError, TaskTracker
    from bitconvert.utils.plots import plot_training_curves

    piqa = tmp_path / "data" / "piqa"
    piqa.mkdir(parents=True)
    items = [("Open a jar", "twist the lid", "freeze the lid", 0), ("Dry shoes", "bake them", "use newspaper", 1),
             ("Keep bread", "in a bag", "in water", 0)]
    (piqa / "valid.jsonl").write_text("".join(json.dumps({"goal": g, "sol1": a, "sol2": b}) + "\n" for g, a, b, _ in items))
    (piqa / "valid-labels.lst").write_text("".join(f"{label}\n" for *_, label in items))
    with pytest.raises(EvalError, match="unknown task 'piqa_locl'; did you mean piqa_local"):
        TaskTracker(["piqa_locl"], tiny_tokenizer, data_dir=tmp_path / "data")
    tracker = TaskTracker(["piqa_local"], tiny_tokenizer, limit=3, batch_size=2, data_dir=tmp_path / "data")

    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file)
    train(student, teacher, data, cfg, tmp_path / "plain", accelerator=acc)
    reference = weights(student)
    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file)
    result = train(student, teacher, data, cfg, tmp_path / "tracked", accelerator=acc, tracker=tracker, track_every=4)
    for key, value in weights(student).items():
        assert torch.equal(value, reference[key]), key
    assert student.training

    rows = [json.loads(line) for line in (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()]
    teacher_rows = [r for r in rows if "teacher_tasks" in r]
    assert len(teacher_rows) == 1 and teacher_rows[0]["step"] == 0
    assert set(teacher_rows[0]["teacher_tasks"]) == {"piqa_local/acc", "piqa_local/acc_norm"}
    tracked = [r for r in rows if "tasks" in r]
    assert [r["step"] for r in tracked] == [4, 6] and tracked[-1]["tokens"] == result.tokens
    assert all(0 <= v <= 1 and v * 3 == round(v * 3) for r in tracked for v in r["tasks"].values())
    assert plot_training_curves(tmp_path / "tracked" / "metrics.jsonl", tmp_path / "curves.png").is_file()


def test_attention_relation_loss_compares_relations_not_scales():
    from bitconvert.train.losses import attention_relation_kl

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 32, generator=g) for _ in range(3))
    assert attention_relation_kl([q, k, v], [q, k, v], head_dim=16).item() == pytest.approx(0.0, abs=1e-6)
    # one scale per whole tensor changes the relations' sharpness, so it is not free; a different
    # tensor costs more than the same one sharpened slightly
    other = [torch.randn(2, 7, 32, generator=g) for _ in range(3)]
    student = [t.clone().requires_grad_() for t in other]
    loss = attention_relation_kl(student, [q, k, v], head_dim=16)
    assert loss.item() > attention_relation_kl([1.05 * q, k, v], [q, k, v], head_dim=16).item() > 0
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in student)
    # causal: the relation of the first token is to itself only, so changing later tokens leaves row 0 alone
    later = q.clone()
    later[:, 1:] += 1.0
    rows = []
    for a in (q, later):
        heads = a.reshape(2, 7, 2, 16).transpose(1, 2)
        rows.append(torch.softmax((heads @ heads.transpose(-1, -2)).masked_fill(
            torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf")), -1)[..., 0, :])
    assert torch.equal(rows[0], rows[1])


def test_attention_inputs_find_the_layer_or_say_why():
    from bitconvert.train.losses import AttentionInputs
    from conftest import build_tiny_model

    model = build_tiny_model("llama", 320)
    capture = AttentionInputs(model, -1)
    assert capture.layer == 1 and capture.head_dim == 16
    with capture:
        model(input_ids=torch.randint(0, 320, (2, 5)))
    q, k, v = capture.states
    assert q.shape == (2, 5, 64) and k.shape == v.shape == (2, 5, 32)  # 4 query heads, 2 key/value heads of 16
    assert not model.model.layers[1].self_attn.q_proj._forward_hooks  # hooks removed on exit
    with pytest.raises(ValueError, match="not one of this model's 2 decoder layers"):
        AttentionInputs(model, 2)
    with pytest.raises(ValueError, match="q_proj"):
        AttentionInputs(build_tiny_model("gpt2", 320), -1)


def test_distillation_with_the_attention_relation_loss(tmp_path, tiny_tokenizer, corpus_file):
    student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, steps=3,
                                                loss={"kl": 1.0, "ce": 0.0, "attention": 1.0, "attention_layer": 0})
    result = train(student, teacher, data, cfg, tmp_path, accelerator=acc)
    rows = [r for r in result.metrics if "attention" in r]
    assert result.steps == 3 and len(rows) == 3
    # the student starts as a copy of the teacher at quantization strength 0: relations differ once it quantizes
    assert all(math.isfinite(r["attention"]) and r["attention"] >= 0 for r in rows) and rows[-1]["attention"] > 0
    assert all(r["loss"] == pytest.approx(r["kl"] + r["attention"], rel=1e-4) for r in rows)


def test_layer_compilation_finds_the_decoder_blocks(tiny_tokenizer):
    from bitconvert.train.compiling import decoder_blocks
    from conftest import build_tiny_model

    for arch, path in (("llama", "model.layers"), ("gpt2", "transformer.h"), ("mixtral", "model.layers")):
        model = build_tiny_model(arch, len(tiny_tokenizer))
        assert decoder_blocks(model) is model.get_submodule(path), arch
    with pytest.raises(ValueError, match="train.compile: model"):
        decoder_blocks(torch.nn.Linear(2, 2))
