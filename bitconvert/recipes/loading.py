"""Reading recipes: YAML plus ``--set key=value`` overrides, validated once, with errors that say
which key is wrong and what was probably meant."""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bitconvert.recipes.schema import Recipe
from bitconvert.utils.io import atomic_write_text


class RecipeError(ValueError):
    """A recipe that cannot run; the message names every bad key."""


def _model_at(path: tuple, root: type[BaseModel] = Recipe) -> type[BaseModel] | None:
    """The pydantic model class that holds the keys at ``path`` (list indices skipped)."""
    model = root
    for key in path:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(key)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for arg in list(candidates):
            candidates.extend(getattr(arg, "__args__", ()))
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            return None
        model = nested
    return model


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(options)}"


def format_validation_error(err: ValidationError, source: str = "recipe") -> str:
    lines = []
    for problem in err.errors():
        loc = tuple(problem["loc"])
        # pydantic adds the name of a validator or union member to loc; keep only real keys
        key_path = ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
        if problem["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            options = sorted(parent.model_fields) if parent else []
            lines.append(f"  {key_path}: unknown key{_suggest(str(loc[-1]), options) if options else ''}")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            got = problem.get("input")
            shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            lines.append(f"  {key_path or '<top level>'}: {message}{shown}")
    return f"invalid {source}:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (['train', 'lr'], 0.0003); the value is read as YAML."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key=value, e.g. train.lr=3e-4")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise RecipeError(f"--set {item!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``key.path=value``; a number in the path picks an item of a list
    (``data.train.1.weight=3``: the second training source)."""
    for item in overrides:
        keys, value = parse_override(item)
        node: Any = data
        for depth, key in enumerate(keys):
            where = ".".join(keys[:depth]) or "<top level>"
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    expected = f"expected an index 0-{len(node) - 1}" if node else "nothing to index"
                    raise RecipeError(f"--set {item!r}: {where} is a list of {len(node)}; {expected}, got {key!r}")
                key = int(key)
            elif not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {where} is not a section")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return data


def recipe_from_dict(data: dict[str, Any], overrides: list[str] = (), source: str = "recipe") -> Recipe:
    data = apply_overrides(copy.deepcopy(dict(data or {})), list(overrides))
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source)) from None


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no recipe at {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping of sections (model, convert, data, train, export, eval)")
    return recipe_from_dict(data, overrides, source=f"recipe {path}")


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe (every default spelled out), as YAML that ``load_recipe`` reads back."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    atomic_write_text(path, dump_recipe(recipe))
