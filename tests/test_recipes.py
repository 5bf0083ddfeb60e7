"""Recipe schema: errors name the key and suggest the right one; overrides; shipped recipes validate."""

from pathlib import Path

import pytest
import yaml

from bitconvert.recipes.loading import RecipeError, dump_recipe, load_recipe, recipe_from_dict
from bitconvert.recipes.reference import render_reference

ROOT = Path(__file__).resolve().parents[1]


def error_of(data, overrides=()):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, list(overrides))
    return str(info.value)


def test_misspelt_keys_name_the_path_and_the_nearest_key():
    message = error_of({"trian": {"steps": 3}})
    assert "trian: unknown key; did you mean 'train'?" in message
    message = error_of({"train": {"stpes": 3}})
    assert "train.stpes: unknown key; did you mean 'steps'?" in message
    message = error_of({"data": {"train": [{"path": "x.txt", "wieght": 2}]}})
    assert "data.train.0.wieght: unknown key; did you mean 'weight'?" in message
    message = error_of({"convert": {"weight_scale": "row"}})
    assert "convert.weight_scale" in message and "'tensor', 'channel' or 'group'" in message


def test_wrong_types_and_impossible_combinations():
    assert "train.lr: Input should be a valid number" in error_of({"train": {"lr": "fast", "steps": 1}})
    assert "exactly one training budget" in error_of({"train": {"steps": 3, "minutes": 2}})
    assert "exactly one of path, hub or generate" in error_of({"data": {"train": [{"path": "a", "hub": "b"}]}})
    assert "group_size must be a multiple of 8" in error_of({"convert": {"weight_scale": "group", "group_size": 12}})
    message = error_of({"train": {"mode": "pretrain", "steps": 1}, "data": {"train": [{"generate": {}}]}})
    assert "needs the teacher" in message
    assert "list at least one task" in error_of({"eval": {"track_every": 50}})
    message = error_of({"train": {"mode": "none"}, "eval": {"tasks": ["piqa_local"], "track_every": 50}})
    assert "trains nothing" in message


def test_several_errors_are_reported_together():
    message = error_of({"train": {"stpes": 3, "lr": -1}})
    assert "train.stpes" in message and "train.lr" in message


def test_overrides_set_nested_keys_with_yaml_values():
    recipe = recipe_from_dict({"train": {"steps": 5}}, ["train.lr=3e-4", "train.loss.kl=0", "convert.skip=[lm_head, mlp]",
                                                       "data.train=[{path: a.txt}]"])
    assert recipe.train.lr == 3e-4 and recipe.train.loss.kl == 0
    assert recipe.convert.skip == ["lm_head", "mlp"]
    assert recipe.data.train[0].path == "a.txt"
    assert recipe_from_dict({"train": {"steps": 5}}, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert "train.lr: Input should be greater than 0" in error_of({}, ["train.lr=-1"])
    with pytest.raises(RecipeError, match="expected key=value"):
        recipe_from_dict({}, ["train.lr"])
    with pytest.raises(RecipeError, match="train.steps is not a section"):
        recipe_from_dict({"train": {"steps": 3}}, ["train.steps.x=1"])


def test_overrides_index_lists_and_leave_the_input_alone():
    data = {"data": {"train": [{"path": "a.txt"}, {"path": "b.txt", "weight": 1}]}}
    recipe = recipe_from_dict(data, ["data.train.1.weight=3", "data.train.0.path=c.txt"])
    assert [s.path for s in recipe.data.train] == ["c.txt", "b.txt"] and recipe.data.train[1].weight == 3
    assert data["data"]["train"][1]["weight"] == 1  # the caller's recipe is not changed
    with pytest.raises(RecipeError, match="data.train is a list of 2; expected an index 0-1, got '2'"):
        recipe_from_dict(data, ["data.train.2.weight=3"])
    with pytest.raises(RecipeError, match="got 'first'"):
        recipe_from_dict(data, ["data.train.first.weight=3"])


def test_resolved_recipe_round_trips(tmp_path):
    recipe = recipe_from_dict({"model": "m", "train": {"steps": 7}})
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == recipe


def test_defaults_are_the_ablations_choice_for_b158_and_the_papers_for_other_variants():
    recipe = recipe_from_dict({"model": "m"})
    spec = recipe.convert.quant_spec()  # round 7: TWN, one scale per row; lr 3e-3 and 32 sequences (round 1)
    assert (spec.weight_scale, spec.ternary_fit, spec.group_size) == ("channel", "twn", 64)
    assert (recipe.train.lr, recipe.train.batch_size) == (3e-3, 32)
    # a variant without the measured defaults keeps QuantSpec's (onebit takes no other), instead of failing on them
    onebit = recipe_from_dict({"model": "m", "convert": {"variant": "onebit"}}).convert
    assert (onebit.weight_scale, onebit.ternary_fit) == ("tensor", "absmean")
    binary = recipe_from_dict({"model": "m"}, ["convert.variant=bitnet1", "convert.weight_scale=channel"]).convert
    assert (binary.weight_scale, binary.ternary_fit) == ("channel", "absmean")
    assert "applies to variant 'b1.58' only" in error_of({"model": "m", "convert": {"variant": "bitnet1", "ternary_fit": "twn"}})
    resolved = recipe_from_dict({"model": "m", "convert": {"variant": "onebit"}})  # the resolved recipe spells it out
    assert recipe_from_dict(yaml.safe_load(dump_recipe(resolved))) == resolved


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    load_recipe(path)


def test_bad_yaml_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [steps: 1\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(broken)
    with pytest.raises(RecipeError, match="no recipe at"):
        load_recipe(tmp_path / "missing.yaml")


def test_docs_reference_matches_schema():
    doc = (ROOT / "docs" / "recipes.md").read_text()
    start, end = "<!-- reference:start -->\n", "<!-- reference:end -->"
    assert doc.split(start, 1)[1].split(end, 1)[0] == render_reference(), \
        "docs/recipes.md is stale: regenerate with `python -m bitconvert.recipes.reference`"


@pytest.mark.slow
def test_ci_tiny_recipe_runs_end_to_end(tmp_path, monkeypatch):
    """`bitconvert run recipes/ci-tiny.yaml` on the real embedded SmolLM2, then reload the export."""
    from click.testing import CliRunner

    from bitconvert.cli import main
    from bitconvert.export.packed import read_manifest

    monkeypatch.chdir(ROOT)
    out = tmp_path / "ci-tiny"
    result = CliRunner().invoke(main, ["run", "recipes/ci-tiny.yaml", "--set", f"output={out}"])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
    manifest = read_manifest(out)
    assert len(manifest["modules"]) == 210 and manifest["spec"]["weight_scale"] == "channel"
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["output"] == str(out) and saved["train"]["steps"] == 2
    assert (out / "training_curves.png").is_file() and "## Recipe" in (out / "README.md").read_text()
    result = CliRunner().invoke(main, ["generate", str(out), "Hello", "--max-new-tokens", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
