"""The recipes reference (docs/recipes.md's table of keys) rendered from the schema itself, so the
documentation cannot drift from what the validator accepts."""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from bitconvert.recipes.schema import Recipe


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", '"') for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in args if a is not type(None)) + (" \\| null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, list):
        value = [v.model_dump(exclude_defaults=True) if isinstance(v, BaseModel) else v for v in value]
    return f"`{value!r}`".replace("None", "null").replace("'", '"')


def _nested(annotation) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        for inner in (arg, *typing.get_args(arg)):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {field.description or ''} |")
        inner = _nested(field.annotation)
        if inner is not None:
            is_list = typing.get_origin(field.annotation) is list
            nested.append((inner, f"{key}[]." if is_list else f"{key}."))
    for inner, inner_prefix in nested:
        rows += _rows(inner, inner_prefix)
    return rows


def render_reference() -> str:
    head = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    return "\n".join(head + _rows(Recipe, "")) + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
