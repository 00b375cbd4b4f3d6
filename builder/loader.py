"""Recipe files -> validated `Recipe`s, with every error located at a file, line and column.

YAML is composed into nodes (so each value keeps its mark), turned into plain data with a location per key path,
`extends` parents are deep-merged under the child (child wins; a parent's values keep the parent's locations),
each `variants` entry is merged on top, and the result is validated by pydantic. All problems of a file are
collected and raised together as one `RecipeError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from builder.errors import Location, Problem, RecipeError
from builder.recipe import NAME_PATTERN, Recipe, RuleViolation

Path_ = tuple[str, ...]
META_KEYS = ("extends", "variants")
_VARIANT_SUFFIX = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass
class Located:
    """Plain YAML data plus where each key path's value (and key) was written."""

    data: Any
    values: dict[Path_, Location] = field(default_factory=dict)
    keys: dict[Path_, Location] = field(default_factory=dict)

    def where(self, path: Path_, *, key: bool = False) -> Location:
        """The location of `path`, or of its nearest written ancestor."""
        table = self.keys if key else self.values
        for end in range(len(path), -1, -1):
            if path[:end] in table:
                return table[path[:end]]
            if path[:end] in self.values:
                return self.values[path[:end]]
        return next(iter(self.values.values()))


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe and where it came from."""

    recipe: Recipe
    path: Path
    files: tuple[Path, ...]
    """The recipe file and every `extends` parent, child first (what a change to triggers a rebuild)."""
    variant: str | None = None
    source_root: Path = Path(".")
    """Folder that relative `source.model` paths are resolved against (the recipe file's folder)."""

    @property
    def source_path(self) -> Path | None:
        """The local source folder, resolved; None for a Hub source."""
        if not self.recipe.source.is_local:
            return None
        return (self.source_root / Path(self.recipe.source.model).expanduser()).resolve()


# --- YAML with marks ---------------------------------------------------------------------------------------------


def _mark(file: str, node: yaml.Node) -> Location:
    return Location(file, node.start_mark.line + 1, node.start_mark.column + 1)


def parse_yaml(text: str, file: str) -> Located:
    """Parse one YAML document keeping marks; duplicate keys and non-string keys are problems."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        location = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file, 1, 1)
        raise RecipeError([Problem(location, "", f"invalid YAML: {error.problem or error.context}")]) from None
    except yaml.YAMLError as error:
        raise RecipeError([Problem(Location(file, 1, 1), "", f"invalid YAML: {error}")]) from None
    if node is None:
        raise RecipeError([Problem(Location(file, 1, 1), "", "the file is empty; a recipe starts with schema_version: 1")])
    located = Located(None, {(): _mark(file, node)})
    problems: list[Problem] = []
    located.data = _construct(node, (), file, located, problems)
    if problems:
        raise RecipeError(problems)
    return located


def _construct(node: yaml.Node, path: Path_, file: str, located: Located, problems: list[Problem]) -> Any:
    located.values[path] = _mark(file, node)
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                problems.append(Problem(_mark(file, key_node), _dotted(path), "YAML merge keys (<<) are not "
                                        "supported; use `extends` to share settings"))
                continue
            key = _scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                problems.append(Problem(_mark(file, key_node), _dotted(path), "keys must be strings"))
                continue
            if key in result:
                first = located.keys[path + (key,)]
                problems.append(Problem(_mark(file, key_node), _dotted(path + (key,)),
                                        f"duplicate key {key!r} (first written at line {first.line})"))
                continue
            located.keys[path + (key,)] = _mark(file, key_node)
            result[key] = _construct(value_node, path + (key,), file, located, problems)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, path + (str(i),), file, located, problems) for i, item in enumerate(node.value)]
    try:
        return _scalar(node)
    except (yaml.YAMLError, ValueError, OverflowError) as error:
        problems.append(Problem(_mark(file, node), _dotted(path), f"invalid value: {error}"))
        return None


_constructor = yaml.SafeLoader("")  # only its scalar constructors are used: it resolves YAML's tags to Python values


def _scalar(node: yaml.Node) -> Any:
    return _constructor.construct_object(node, deep=True)


# --- extends and variants ----------------------------------------------------------------------------------------


def _merge(parent: Located, child: Located, path: Path_ = ()) -> Located:
    """Deep-merge `child` over `parent` (mappings merge, everything else is replaced by the child's value)."""
    merged = Located(None, {}, {})
    merged.data = _merge_into(parent, child, path, merged)
    return merged


def _merge_into(parent: Located, child: Located, path: Path_, out: Located) -> Any:
    parent_value, child_value = _get(parent.data, path), _get(child.data, path)
    if isinstance(parent_value, dict) and isinstance(child_value, dict):
        out.values[path] = child.values.get(path) or parent.values[path]
        result = {}
        for key in {**parent_value, **child_value}:
            sub = path + (key,)
            side = child if key in child_value else parent
            if key in child_value and key in parent_value:
                result[key] = _merge_into(parent, child, sub, out)
            else:
                _copy_locations(side, sub, out)
                result[key] = _get(side.data, sub)
            out.keys[sub] = side.keys[sub]
        return result
    source = child if _has(child.data, path) else parent
    _copy_locations(source, path, out)
    return _get(source.data, path)


def _copy_locations(source: Located, path: Path_, out: Located) -> None:
    n = len(path)
    for table, target in ((source.values, out.values), (source.keys, out.keys)):
        for p, location in table.items():
            if p[:n] == path:
                target[p] = location


def _get(data: Any, path: Path_) -> Any:
    for key in path:
        data = data[key] if isinstance(data, dict) else data[int(key)]
    return data


def _has(data: Any, path: Path_) -> bool:
    try:
        _get(data, path)
        return True
    except (KeyError, IndexError, ValueError, TypeError):
        return False


def _subtree(located: Located, path: Path_, data: Any) -> Located:
    """`data`, written at `path` of `located`, re-rooted with its locations (a variant's overrides)."""
    n = len(path)
    return Located(
        data,
        {p[n:]: loc for p, loc in located.values.items() if p[:n] == path},
        {p[n:]: loc for p, loc in located.keys.items() if p[:n] == path},
    )


def _read_file(path: Path, display: str, chain: tuple[Path, ...]) -> tuple[Located, tuple[Path, ...]]:
    """Read `path` and its `extends` ancestry; returns the merged data and the files involved, child first."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError([Problem(Location(display, 1, 1), "", "the file is not UTF-8 text")]) from None
    located = parse_yaml(text, display)
    if not isinstance(located.data, dict):
        raise RecipeError([Problem(located.where(()), "", "a recipe is a mapping of keys (schema_version, name, ...)")])
    extends = located.data.pop("extends", None)
    if extends is None:
        return located, (path,)
    where = located.where(("extends",))
    if not isinstance(extends, str) or not extends:
        raise RecipeError([Problem(where, "extends", "extends is a relative path to a parent recipe file")])
    parent_path = (path.parent / extends).resolve()
    if parent_path in chain or parent_path == path.resolve():
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve(), parent_path))
        raise RecipeError([Problem(where, "extends", f"extends cycle: {cycle}; remove one of the links")])
    if not parent_path.is_file():
        raise RecipeError([Problem(where, "extends", f"parent recipe {extends!r} not found (looked for {parent_path})")])
    parent_display = _display(parent_path)
    parent, parent_files = _read_file(parent_path, parent_display, (*chain, path.resolve()))
    for key in ("name",):
        parent.data.pop(key, None)  # the child names the artifact; a parent's name never leaks into it
    return _merge(parent, located), (path, *parent_files)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --- validation --------------------------------------------------------------------------------------------------


def load_recipes(path: str | Path) -> list[LoadedRecipe]:
    """Load one recipe file into the recipes it defines (one, or one per variant). Raises `RecipeError`."""
    path = Path(path)
    display = _display(path) if path.is_absolute() else str(path)
    if not path.is_file():
        raise RecipeError([Problem(Location(display, 1, 1), "", "no such recipe file")])
    located, files = _read_file(path, display, ())
    variants = located.data.pop("variants", None)
    if variants is None:
        return [LoadedRecipe(_validate(located), path, files, None, path.parent)]
    where = located.where(("variants",))
    if not isinstance(variants, dict) or not variants:
        raise RecipeError([Problem(where, "variants", "variants is a mapping of suffix: {overrides}, with at least one")])
    problems: list[Problem] = []
    loaded = []
    base_name = located.data.get("name")
    for suffix, overrides in variants.items():
        key_where = located.where(("variants", suffix), key=True)
        if not _VARIANT_SUFFIX.match(str(suffix)):
            problems.append(Problem(key_where, f"variants.{suffix}", "a variant suffix is lowercase letters, digits, "
                                    "'.', '_', '-'"))
            continue
        if not isinstance(overrides, dict) or {"name", *META_KEYS} & set(overrides):
            problems.append(Problem(key_where, f"variants.{suffix}", "a variant is a mapping of overrides and cannot "
                                    "set name, extends or variants"))
            continue
        variant = _merge(located, _subtree(located, ("variants", suffix), overrides))
        if isinstance(base_name, str):
            variant.data["name"] = f"{base_name}-{suffix}"
        try:
            loaded.append(LoadedRecipe(_validate(variant), path, files, str(suffix), path.parent))
        except RecipeError as error:
            problems.extend(error.problems)
    if problems:
        raise RecipeError(_unique(problems))
    return loaded


def _validate(located: Located) -> Recipe:
    try:
        return Recipe.model_validate(located.data)
    except ValidationError as error:
        raise RecipeError(_unique([_problem(e, located) for e in error.errors()])) from None


def _unique(problems: list[Problem]) -> list[Problem]:
    seen, result = set(), []
    for problem in problems:
        if str(problem) not in seen:
            seen.add(str(problem))
            result.append(problem)
    return sorted(result, key=lambda p: (p.location.file, p.location.line, p.location.column))


def _problem(error: dict, located: Located) -> Problem:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    path = _clean_loc(error["loc"])
    if kind == "value_error" and isinstance(ctx.get("error"), RuleViolation):
        path = path + ctx["error"].path
    dotted = _dotted(path)
    if kind == "extra_forbidden":
        choices = _field_names(path[:-1])
        close = get_close_matches(path[-1], choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; allowed: {', '.join(choices)}"
        return Problem(located.where(path, key=True), dotted, f"unknown key {path[-1]!r}{hint}")
    if kind == "missing":
        return Problem(located.where(path[:-1]), dotted, "required key is missing")
    where = located.where(path)
    if kind == "literal_error":
        choices = tuple(re.findall(r"'([^']*)'", ctx.get("expected", "")))
        return Problem(where, dotted, _not_one_of(value, choices))
    if kind == "union_tag_invalid":
        choices = tuple(re.findall(r"'([^']*)'", ctx.get("expected_tags", "")))
        discriminator = ctx.get("discriminator", "").strip("'")
        return Problem(located.where(path + (discriminator,)), f"{dotted}.{discriminator}",
                       _not_one_of(ctx.get("tag"), choices))
    if kind == "union_tag_not_found":
        discriminator = ctx.get("discriminator", "").strip("'")
        return Problem(where, f"{dotted}.{discriminator}", f"required key is missing; it picks the kind of {dotted} "
                       f"({_tags(path)})")
    if kind == "string_pattern_mismatch" and path == ("name",):
        return Problem(where, dotted, f"{value!r} is not a valid artifact name: use lowercase letters, digits, '.', "
                       f"'_' and '-', starting with a letter or digit, at most 96 characters ({NAME_PATTERN})")
    if kind == "value_error":
        return Problem(where, dotted, str(ctx.get("error", error["msg"])))
    if kind in ("string_type", "bool_type", "int_type", "float_type", "dict_type", "tuple_type", "model_type",
                "list_type", "int_parsing", "float_parsing", "bool_parsing", "model_attributes_type"):
        expected = {"string_type": "a string", "bool_type": "true or false", "bool_parsing": "true or false",
                    "int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
                    "float_parsing": "a number", "dict_type": "a mapping", "model_type": "a mapping",
                    "model_attributes_type": "a mapping", "tuple_type": "a list", "list_type": "a list"}[kind]
        hint = " (quote it to make it a string)" if kind == "string_type" and isinstance(value, (int, float)) else ""
        return Problem(where, dotted, f"expected {expected}, got {_show(value)}{hint}")
    message = error["msg"]
    return Problem(where, dotted, f"{message[0].lower()}{message[1:]} (got {_show(value)})")


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    if value is None:
        return "nothing (null)"
    return repr(value)


def _not_one_of(value: Any, choices: tuple[str, ...]) -> str:
    close = get_close_matches(str(value), choices, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{_show(value)} is not one of {', '.join(choices)}{hint}"


def _dotted(path: Path_) -> str:
    return ".".join(path)


# --- walking the schema by error location ------------------------------------------------------------------------

def _tags_of(annotation: Any) -> dict[str, type[BaseModel]]:
    """Discriminated union members by their `method`/`format` tag."""
    members = {}
    for arg in _flatten(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            for tag_field in ("method", "format"):
                if tag_field in arg.model_fields:
                    for tag in get_args(arg.model_fields[tag_field].annotation):
                        members[tag] = arg
    return members


def _flatten(annotation: Any) -> list[Any]:
    args = get_args(annotation)
    if not args:
        return [annotation]
    if get_origin(annotation) in (dict, tuple, list):
        return [annotation]
    return [a for arg in args for a in _flatten(arg)]


def _clean_loc(loc: tuple) -> Path_:
    """pydantic's error loc without the union tags it inserts (`quantize.bnb-4bit.x` -> `quantize.x`)."""
    model: Any = Recipe
    result: list[str] = []
    items = [str(item) for item in loc]
    i = 0
    while i < len(items):
        item = items[i]
        result.append(item)
        i += 1
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        if item not in fields:
            model = None
            continue
        annotation = fields[item].annotation
        tags = _tags_of(annotation)
        if tags and i < len(items) and items[i] in tags:
            model = tags[items[i]]
            i += 1
        else:
            models = [a for a in _flatten(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
            model = models[0] if len(models) == 1 else None
    return tuple(result)


def _model_at(path: Path_) -> Any:
    model: Any = Recipe
    for item in path:
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        if item not in fields:
            return None
        models = [a for a in _flatten(fields[item].annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = models[0] if len(models) == 1 else None
    return model


def _field_names(path: Path_) -> list[str]:
    model = _model_at(path)
    if model is None and path:
        # A discriminated block (quantize): offer the fields of every kind.
        parent = _model_at(path[:-1])
        if parent is not None and path[-1] in parent.model_fields:
            names: list[str] = []
            for member in _tags_of(parent.model_fields[path[-1]].annotation).values():
                names.extend(n for n in member.model_fields if n not in names)
            return names
        return []
    names = list(model.model_fields) if model is not None else []
    return names + list(META_KEYS) if not path else names


def _tags(path: Path_) -> str:
    parent = _model_at(path[:-1])
    if parent is None or path[-1] not in parent.model_fields:
        return ""
    return ", ".join(_tags_of(parent.model_fields[path[-1]].annotation))


# --- finding recipe files ----------------------------------------------------------------------------------------


def find_recipe_files(paths: list[str | Path]) -> list[Path]:
    """Expand folders into their `*.yaml`/`*.yml` files, sorted; files whose name starts with `_` are partials
    (shared bases for `extends`) and are only checked through the recipes that extend them."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(
                p for p in sorted(path.rglob("*"))
                if p.suffix in (".yaml", ".yml") and p.is_file() and not p.name.startswith("_")
            )
        else:
            found.append(path)
    return found
