"""pydantic validation errors -> located, one-line problems that say what to write instead.

`problem_from_error` walks the recipe schema along pydantic's error location (dropping the union tags it inserts)
to name the key, offer a did-you-mean from the fields or values that are allowed there, and point at the line.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from pydantic import BaseModel

from builder.errors import Problem
from builder.recipe.schema import NAME_PATTERN, Recipe, RuleViolation
from builder.recipe.wording import Path_, closest, dotted, not_one_of, show

if TYPE_CHECKING:
    from builder.recipe.marks import Located

META_KEYS = ("extends", "variants")


def unique_sorted(problems: list[Problem]) -> list[Problem]:
    seen, result = set(), []
    for problem in problems:
        if str(problem) not in seen:
            seen.add(str(problem))
            result.append(problem)
    return sorted(result, key=lambda p: (p.location.file, p.location.line, p.location.column))


_EXPECTED = {
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
}


def problem_from_error(error: dict, located: Located) -> Problem:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    path, holders = _walk(error["loc"])
    if kind == "value_error" and isinstance(ctx.get("error"), RuleViolation):
        path = path + ctx["error"].path
    shown_path = dotted(path)
    if kind == "extra_forbidden":
        return Problem(located.where(path, key=True), shown_path, _unknown_key(path, holders))
    if kind == "missing":
        return Problem(located.where(path[:-1]), shown_path, "required key is missing")
    where = located.where(path)
    if kind == "literal_error":
        choices = _literal_choices(holders[-1], path[-1]) or tuple(re.findall(r"'([^']*)'", ctx.get("expected", "")))
        return Problem(where, shown_path, not_one_of(value, choices))
    if kind == "union_tag_invalid":
        choices = tuple(re.findall(r"'([^']*)'", ctx.get("expected_tags", "")))
        discriminator = ctx.get("discriminator", "").strip("'")
        tag = value.get(discriminator) if isinstance(value, dict) else ctx.get("tag")
        return Problem(
            located.where(path + (discriminator,)), f"{shown_path}.{discriminator}", not_one_of(tag, choices)
        )
    if kind == "union_tag_not_found":
        discriminator = ctx.get("discriminator", "").strip("'")
        return Problem(
            where,
            f"{shown_path}.{discriminator}",
            f"required key is missing; it picks the kind of {shown_path} ({_tags(path)})",
        )
    if kind == "string_pattern_mismatch" and path == ("name",):
        return Problem(
            where,
            shown_path,
            f"{show(value)} is not a valid artifact name: use lowercase letters, digits, '.', "
            f"'_' and '-', starting with a letter or digit, at most 96 characters ({NAME_PATTERN})",
        )
    if kind == "value_error":
        return Problem(where, shown_path, str(ctx.get("error", error["msg"])))
    if kind in _EXPECTED:
        return Problem(where, shown_path, f"expected {_EXPECTED[kind]}, got {show(value)}{_type_hint(kind, value)}")
    message = error["msg"]
    return Problem(where, shown_path, f"{message[0].lower()}{message[1:]} (got {show(value)})")


def _type_hint(kind: str, value: Any) -> str:
    if kind == "string_type" and isinstance(value, (bool, int, float)):
        return " (quote it to make it a string)"
    if isinstance(value, str) and kind in ("bool_type", "int_type", "float_type"):
        return " (write it without quotes)"
    return ""


def _unknown_key(path: Path_, holders: list[Any]) -> str:
    key, holder = path[-1], holders[-1]
    choices = [*_fields(holder)] + ([*META_KEYS] if len(path) == 1 else [])
    close = closest(key, choices)
    if len(path) >= 2 and (members := _tags_of(_fields(holders[-2]).get(path[-2]))):
        tag_field = next(f for f in ("method", "format") if f in _fields(holder))
        here = next(tag for tag, member in members.items() if member is holder)
        elsewhere = [tag for tag, member in members.items() if member is not holder and key in _fields(member)]
        if elsewhere:
            return f"unknown key {show(key)} for {tag_field} {here}; it is a setting of {' and '.join(elsewhere)}"
    hint = f" (did you mean {close!r}?)" if close else f"; allowed: {', '.join(choices)}"
    return f"unknown key {show(key)}{hint}"


# --- walking the schema by error location ------------------------------------------------------------------------


def _fields(model: Any) -> dict[str, Any]:
    return model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}


def _tags_of(field_info: Any) -> dict[str, type[BaseModel]]:
    """Discriminated union members by their `method`/`format` tag (empty when the field is not such a union)."""
    members: dict[str, type[BaseModel]] = {}
    union = _flatten(field_info.annotation) if field_info is not None else []
    for arg in union:
        for tag_field in ("method", "format"):
            if tag_field in _fields(arg):
                for tag in get_args(arg.model_fields[tag_field].annotation):
                    members[tag] = arg
    return members if len({id(m) for m in members.values()}) > 1 else {}


def _flatten(annotation: Any) -> list[Any]:
    args = get_args(annotation)
    if not args or get_origin(annotation) in (dict, tuple, list, Literal):
        return [annotation]
    return [a for arg in args for a in _flatten(arg)]


def _models_in(field_info: Any) -> list[type[BaseModel]]:
    return [a for a in _flatten(field_info.annotation) if _fields(a)]


def _walk(loc: tuple) -> tuple[Path_, list[Any]]:
    """pydantic's error loc without the union tags it inserts (`quantize.bnb-4bit.x` -> `quantize.x`), and for
    each key the model that holds it (None below plain mappings and lists)."""
    model: Any = Recipe
    path: list[str] = []
    holders: list[Any] = []
    items = [str(item) for item in loc]
    i = 0
    while i < len(items):
        item = items[i]
        path.append(item)
        holders.append(model)
        i += 1
        field_info = _fields(model).get(item)
        if field_info is None:
            model = None
            continue
        tags = _tags_of(field_info)
        if tags and i < len(items) and items[i] in tags:
            model = tags[items[i]]
            i += 1
        else:
            models = _models_in(field_info)
            model = models[0] if len(models) == 1 else None
    return tuple(path), holders


def _literal_choices(holder: Any, name: str) -> tuple[str, ...]:
    field_info = _fields(holder).get(name)
    if field_info is None:
        return ()
    return tuple(str(v) for a in _flatten(field_info.annotation) if get_origin(a) is Literal for v in get_args(a))


def _model_at(path: Path_) -> Any:
    model: Any = Recipe
    for item in path:
        field_info = _fields(model).get(item)
        if field_info is None:
            return None
        models = _models_in(field_info)
        model = models[0] if len(models) == 1 else None
    return model


def _tags(path: Path_) -> str:
    return ", ".join(_tags_of(_fields(_model_at(path[:-1])).get(path[-1])))


def discriminator_at(path: Path_) -> str | None:
    """The key that picks the kind of the block at `path` (`method` for quantize, `format` for export), if any."""
    if not path:
        return None
    tags = _tags_of(_fields(_model_at(path[:-1])).get(path[-1]))
    if not tags:
        return None
    return next(f for f in ("method", "format") if f in _fields(next(iter(tags.values()))))
