"""benchmarks/qat_ablations.py's round settings, without training: what each row's recipe holds, its time
estimate, and which rows may become the recipe's default."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("qat_ablations", ROOT / "benchmarks" / "qat_ablations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("qat_ablations", module)
    spec.loader.exec_module(module)
    return module


def round_args(bench, tmp_path, number=4, **overrides):
    settings = dict(model="tiny", data=tmp_path / "wikitext-2", steps=300, seconds=40, eval_every=0,
                    sequence_length=512, generate_tokens=1024, piqa_limit=-1, piqa_seconds=20,
                    num_layers=30, mix_files={"teacher_mix": tmp_path / "mix.jsonl"})
    args = argparse.Namespace(**{**settings, **overrides})
    args.reference, args.ablations, args.defaults, _ = bench.round_settings(number)
    return args


def test_round_4_rows_become_valid_recipes(tmp_path):
    bench = load_benchmark()
    args = round_args(bench, tmp_path)
    (tmp_path / "mix.jsonl").write_text('{"text": "a"}\n')
    for name in args.defaults:
        recipe = bench.recipe_for(name, args)  # validated: a benchmark-only key left in would be an error
        assert [s.weight for s in recipe.data.train] == [0.25, 0.75], name
    assert bench.recipe_for("reference_4x_tracked", args).train.steps == 1200
    assert bench.recipe_for("frozen_embeddings", args).train.freeze == ["embed_tokens"]
    assert bench.recipe_for("full_precision", args).convert.skip == []  # the row itself skips the conversion


def test_round_5_rows_become_valid_recipes(tmp_path):
    bench = load_benchmark()
    args = round_args(bench, tmp_path, number=5)
    (tmp_path / "mix.jsonl").write_text('{"text": "a"}\n')
    for name in args.defaults:
        recipe = bench.recipe_for(name, args)
        assert [s.weight for s in recipe.data.train] == [0.25, 0.75], name
    assert bench.recipe_for("twn_fit", args).convert.ternary_fit == "twn"
    two_stage = bench.recipe_for("two_stage_lr", args).train
    assert (two_stage.schedule, two_stage.weight_decay) == ("two_stage", 0.1)
    # the ramp trains the reference's tokens (300 steps of 32 x 512), not its steps
    ramp = bench.recipe_for("batch_ramp", args).train
    assert (ramp.steps, ramp.tokens, ramp.batch_ramp.start) == (None, 300 * 32 * 512, 8)
    assert bench.is_settable("batch_ramp", args) and not bench.is_settable("twn_fit_4x_tracked", args)


def test_time_estimates_and_the_rows_that_may_win(tmp_path):
    bench = load_benchmark()
    args = round_args(bench, tmp_path)
    assert bench.row_seconds("reference", args) == 40
    # four times the steps, PIQA on the teacher once and after every 300 of 1,200 steps
    assert bench.row_seconds("reference_4x_tracked", args) == 4 * 40 + 5 * 20
    # expressible as --set overrides (the bf16 diagnostics are: convert.skip), unlike the benchmark's own keys
    settable = {name for name in args.ablations if bench.is_settable(name, args)}
    assert settable == {"reference", "frozen_embeddings", "kl_only", "lr_1e-3", "lr_3e-4", "mlp_ternary_only",
                        "attention_ternary_only"}
    rows = [{"name": "full_precision", "final_ppl": 19.1, "all_ternary": False, "settable": False},
            {"name": "reference", "final_ppl": 29.6, "all_ternary": True, "settable": True}]
    assert bench.winner({"configs": rows})["name"] == "reference"
    assert bench.winner({"configs": rows[:1]}) is None  # no diagnostic row becomes the default
    assert bench.rounded({"lr": 3e-4, "share": 2 / 3}) == {"lr": 0.0003, "share": 0.667}


def test_piqa_curve_fits_the_committed_results(tmp_path):
    import json
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "piqa_curve.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "piqa_curve.json").read_text())
    assert len(report["tracked"]) >= 3 and len(report["finished"]) == 7
    assert report["fits"]["log_linear"]["b"] > 0 and (tmp_path / "piqa_curve.png").stat().st_size > 0


def test_budget_curve_fits_the_end_points_of_the_committed_runs(tmp_path):
    import json
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "budget_curve.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "budget_curve.json").read_text())
    assert {name: len(points) for name, points in report["points"].items()} == {"twn": 8, "absmean": 6,
                                                                                 "twn + conversations": 7}
    for fit in report["fits"].values():  # longer schedules ended lower, so every gap shrinks
        assert fit["ppl"]["alpha"] > 0 and fit["ppl"]["alpha_95"][0] <= fit["ppl"]["alpha"] <= fit["ppl"]["alpha_95"][1]
    assert report["ppl_fits_cross_at"] is not None and (tmp_path / "budget_curve.png").stat().st_size > 0


def test_round_6_rows_become_valid_recipes(tmp_path):
    bench = load_benchmark()
    args = round_args(bench, tmp_path, number=6)
    (tmp_path / "mix.jsonl").write_text('{"text": "a"}\n')
    assert args.reference["convert"]["ternary_fit"] == "absmean"  # what rounds 2-6 measured against, whatever the recipe
    specs = {}
    for name in args.defaults:
        recipe = bench.recipe_for(name, args)
        assert [s.weight for s in recipe.data.train] == [0.25, 0.75], name
        specs[name] = recipe.convert.quant_spec()
    assert {(s.group_size, s.ternary_fit) for s in specs.values()} == {
        (64, "absmean"), (32, "absmean"), (32, "twn"), (64, "twn"), (192, "absmean"), (16, "absmean"), (16, "twn")}
    assert all(s.weight_scale == "group" and 576 % s.group_size == 0 == 1536 % s.group_size for s in specs.values())


def test_round_7_rows_become_valid_recipes(tmp_path):
    bench = load_benchmark()
    args = round_args(bench, tmp_path, number=7)
    (tmp_path / "mix.jsonl").write_text('{"text": "a"}\n')
    assert args.reference["convert"]["ternary_fit"] == "twn"  # the recipe as it now is
    recipes = {name: bench.recipe_for(name, args) for name in args.defaults}
    assert all([s.weight for s in r.data.train] == [0.25, 0.75] for r in recipes.values())
    assert recipes["channel_scale"].convert.weight_scale == "channel"
    old = recipes["old_defaults"]  # what `bitconvert quantize` trained with before, on the reference's tokens
    assert (old.convert.weight_scale, old.convert.ternary_fit, old.train.lr, old.train.batch_size) == (
        "tensor", "absmean", 1e-3, 8)
    assert (old.train.steps, old.train.tokens) == (None, 300 * 32 * 512)
    assert recipes["channel_scale_4x"].train.steps == 1200 and recipes["reference_seed_1"].train.seed == 1


def mix_round_args(bench, tmp_path, number):
    """A round whose rows draw on both teacher texts (continuations and conversations), each one line long here."""
    mix_files = {"teacher_mix": tmp_path / "mix.jsonl", "teacher_mix_chat": tmp_path / "chat.jsonl"}
    for path in mix_files.values():
        path.write_text('{"text": "a"}\n')
    return round_args(bench, tmp_path, number=number, mix_files=mix_files)


def test_round_10_runs_the_mix_and_the_reference_at_four_times_the_steps(tmp_path):
    bench = load_benchmark()
    args = mix_round_args(bench, tmp_path, 10)
    assert "reference" in args.ablations and "reference" not in args.defaults  # named for the step-speed call only
    recipes = {name: bench.recipe_for(name, args) for name in args.defaults}
    sources = {name: [(Path(s.path).name, s.weight) for s in r.data.train] for name, r in recipes.items()}
    assert sources == {"chat_and_wiki_teacher_text_4x_tracked": [("valid.txt", 0.25), ("mix.jsonl", 0.375),
                                                                  ("chat.jsonl", 0.375)],
                       "reference_4x": [("valid.txt", 0.25), ("mix.jsonl", 0.75)]}
    assert all(r.train.steps == 1200 for r in recipes.values())


def test_round_11_pairs_the_mix_and_the_reference_on_a_fourth_seed(tmp_path):
    bench = load_benchmark()
    args = mix_round_args(bench, tmp_path, 11)
    recipes = {name: bench.recipe_for(name, args) for name in args.defaults}
    assert sorted(recipes) == ["chat_and_wiki_teacher_text_seed_3", "reference_seed_3"]
    assert all(r.train.seed == 3 and r.train.steps == 300 for r in recipes.values())


def test_round_12_repeats_the_four_times_pair_and_adds_a_fifth_seed(tmp_path):
    bench = load_benchmark()
    args = mix_round_args(bench, tmp_path, 12)
    recipes = {name: bench.recipe_for(name, args) for name in args.defaults}
    assert {name: (r.train.seed, r.train.steps) for name, r in recipes.items()} == {
        "chat_and_wiki_teacher_text_4x_seed_1": (1, 1200), "reference_4x_seed_1": (1, 1200),
        "chat_and_wiki_teacher_text_seed_4": (4, 300), "reference_seed_4": (4, 300)}


@pytest.mark.parametrize("number, pair_count, seeds, steps",
                         [(13, 4, {0, 1, 2}, {300, 1200}), (14, 3, {1, 2, 3}, {300, 1200})])
def test_rounds_13_and_14_pair_a_learned_step_with_the_recipes_fixed_one(tmp_path, number, pair_count, seeds, steps):
    bench = load_benchmark()
    args = mix_round_args(bench, tmp_path, number)
    recipes = {name: bench.recipe_for(name, args) for name in args.defaults}
    fits = {name: (r.convert.ternary_fit, r.train.seed, r.train.steps, r.convert.weight_scale)
            for name, r in recipes.items()}
    pairs = {name: (fits[name], fits[name.replace("chat_and_wiki_teacher_text_same_call", "learned_step")])
             for name in fits if name.startswith("chat_and_wiki")}
    assert len(pairs) == pair_count and len(fits) == 2 * pair_count
    for (fixed_fit, *fixed_rest), (learned_fit, *learned_rest) in pairs.values():
        # same seed, same steps, same scales
        assert (fixed_fit, learned_fit) == ("twn", "learned") and fixed_rest == learned_rest
    assert {fit[1] for fit in fits.values()} == seeds and {fit[2] for fit in fits.values()} == steps
    assert all(fit[2] == (1200 if "_4x" in name else 300) for name, fit in fits.items())  # 4x rows: 4x steps
    sources = {tuple((Path(s.path).name, s.weight) for s in r.data.train) for r in recipes.values()}
    assert sources == {(("valid.txt", 0.25), ("mix.jsonl", 0.375), ("chat.jsonl", 0.375))}


def test_piqa_after_a_row_leaves_the_compiled_blocks_compiled(tiny_tokenizer):
    """Scoring PIQA at many batch shapes with the blocks compiled would spend dynamo's recompile limit and leave every
    later row in the process eager: the benchmark scores eager."""
    import torch
    from conftest import build_tiny_model
    from torch._dynamo.utils import counters

    bench = load_benchmark()
    model = build_tiny_model("llama", len(tiny_tokenizer))
    torch._dynamo.reset()
    for block in model.model.layers:
        block.compile(backend="eager", dynamic=False)
    model(input_ids=torch.ones(2, 8, dtype=torch.long))
    graphs = counters["stats"]["unique_graphs"]

    def tracker(scored):  # lm-eval's batches: every length another shape
        for length in range(3, 3 + 12):
            scored(input_ids=torch.ones(4, length, dtype=torch.long))
        return {"piqa_local/acc": 0.5}

    args = argparse.Namespace(piqa_limit=-1, piqa={None: tracker})
    assert bench.piqa_accuracy(model, tiny_tokenizer, args) == 0.5
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_round_8_splits_piqa_and_trains_on_one_half(tmp_path):
    """Round 8's data: the teacher's conversations in place of its valid.txt continuations, and (a diagnostic) PIQA's
    even half as text; PIQA split into halves on disk, the labels kept apart from the training text."""
    import json

    bench = load_benchmark()
    piqa = tmp_path / "piqa"  # beside data's wikitext-2, where the benchmark looks
    piqa.mkdir()
    items = [{"goal": f"goal {i}", "sol1": f"first {i}", "sol2": f"second {i}"} for i in range(5)]
    (piqa / "valid.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (piqa / "valid-labels.lst").write_text("0\n1\n1\n0\n1\n")
    args = round_args(bench, tmp_path, number=8, work=tmp_path / "work",
                      mix_files={"teacher_mix": tmp_path / "mix.jsonl", "teacher_mix_chat": tmp_path / "chat.jsonl"})
    bench.split_piqa(args)
    assert args.piqa_items == {"a": 3, "b": 2}
    half_b = [json.loads(line) for line in (args.piqa_dirs["b"] / "piqa" / "valid.jsonl").read_text().splitlines()]
    assert [(row["goal"], row["label"]) for row in half_b] == [("goal 1", 1), ("goal 3", 0)]
    texts = [json.loads(line)["text"] for line in args.mix_files[bench.PIQA_HALF].read_text().splitlines()]
    assert texts[:2] == ["Question: goal 0\nAnswer: first 0", "Question: goal 0\nAnswer: second 0"] and len(texts) == 6

    for name in ("mix.jsonl", "chat.jsonl"):
        (tmp_path / name).write_text('{"text": "a"}\n')
    sources = {name: [(Path(s.path).name, round(s.weight, 6)) for s in bench.recipe_for(name, args).data.train]
               for name in args.defaults}
    assert sources["reference"] == [("valid.txt", 0.25), ("mix.jsonl", 0.75)]
    assert sources["chat_teacher_text"] == [("valid.txt", 0.25), ("chat.jsonl", 0.75)]
    assert sources["piqa_half_a_text"] == [("valid.txt", 0.15), ("mix.jsonl", 0.75), ("piqa_half_a.jsonl", 0.1)]
    assert not bench.is_settable("piqa_half_a_text", args) and bench.recipe_for("chat_teacher_text_4x", args).train.steps == 1200

    # each half scored on its own; the whole set's accuracy is their mean weighted by the items scored
    args.piqa = {"a": lambda model: {"piqa_local/acc": 1.0}, "b": lambda model: {"piqa_local/acc": 0.5}}
    model = __import__("torch").nn.Linear(1, 1)
    assert bench.piqa_scores(model, None, args) == {"piqa_a": 1.0, "piqa_b": 0.5, "piqa_acc": (3 * 1.0 + 2 * 0.5) / 5}


def test_a_later_call_replaces_an_earlier_calls_skip_of_the_row_it_runs():
    bench = load_benchmark()
    earlier = [{"name": "reference", "final_ppl": 27.8}, {"name": "slow_row", "skipped": "deadline"},
               {"name": "broken_row", "error": "OOM"}, {"name": "other_row", "skipped": "deadline"}]
    kept = bench.earlier_rows(earlier, ["slow_row", "broken_row"])
    assert [row["name"] for row in kept] == ["reference", "other_row"]
    assert bench.earlier_rows(earlier, ["reference"]) == earlier  # a measured row stays beside its repeat
