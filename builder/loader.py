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
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from builder.errors import Location, Problem, RecipeError
from builder.recipe import NAME_PATTERN, Recipe, RuleViolation

Path_ = tuple[str, ...]
META_KEYS = ("extends", "variants")
MAX_DEPTH = 32
MAX_VALUES = 100_000  # aliases can make a small file expand exponentially ("billion laughs")
_VARIANT_SUFFIX = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_YAML = "tag:yaml.org,2002:"
_SCALAR_TAGS = tuple(_YAML + t for t in ("str", "int", "float", "bool", "null"))
_COLLECTION_TAGS = (_YAML + "map", _YAML + "seq")
# Spellings people reach for, mapped to the value the schema uses (offered as "did you mean").
_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32",
            "4bit": "bnb-4bit", "bnb4": "bnb-4bit", "8bit": "bnb-8bit", "bnb8": "bnb-8bit", "int8": "bnb-8bit",
            "sdpa_attention": "sdpa", "flash_attention": "flash_attention_2", "cpu": "CPUExecutionProvider",
            "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "rocm": "ROCMExecutionProvider"}


@dataclass
class Located:
    """Plain YAML data plus where each key path's value (and key) was written."""

    data: Any
    values: dict[Path_, Location] = field(default_factory=dict)
    keys: dict[Path_, Location] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    """Problems found while reading (duplicate keys, unreadable values); reading goes on so all are reported."""
    broken: set[Location] = field(default_factory=set)
    """Where unreadable values were (read as null): validation errors at these places are not reported twice."""

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
    """Folder that a relative `source.model` is resolved against: that of the file that wrote it."""

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
    """Parse one YAML document keeping marks. Raises `RecipeError` when the text is not YAML or is empty;
    duplicate keys, non-string keys and unreadable values are collected in `Located.problems`."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        location = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file, 1, 1)
        raise RecipeError([Problem(location, "", f"invalid YAML: {_yaml_message(error)}")]) from None
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        code = error.character if isinstance(error.character, int) else ord(error.character)
        raise RecipeError([Problem(Location(file, line, column), "", f"invalid YAML: the control character "
                                   f"U+{code:04X} is not allowed in YAML text; remove it")]) from None
    except yaml.YAMLError as error:
        message = " ".join(str(error).split())
        raise RecipeError([Problem(Location(file, 1, 1), "", f"invalid YAML: {message}")]) from None
    except RecursionError:
        raise RecipeError([Problem(Location(file, 1, 1), "", f"the YAML is nested too deeply; a recipe needs at most "
                                   f"{MAX_DEPTH} levels")]) from None
    if node is None:
        raise RecipeError([Problem(Location(file, 1, 1), "", "the file is empty; a recipe starts with "
                                   "schema_version: 1")])
    located = Located(None, {(): _mark(file, node)})
    located.data = _construct(node, (), file, located)
    if len(located.values) > MAX_VALUES:
        raise RecipeError([Problem(Location(file, 1, 1), "", f"the YAML expands to more than {MAX_VALUES:,} values "
                                   "(through aliases); a recipe is far smaller")])
    return located


def _yaml_message(error: yaml.MarkedYAMLError) -> str:
    """PyYAML's problem and context as one line, with the fix for the usual mistakes."""
    problem, context = error.problem or "", error.context or ""
    if context.startswith("while "):
        mark = error.context_mark
        message = f"{problem} ({context} that starts at line {mark.line + 1})" if mark is not None else problem
    else:
        message = f"{context} {problem}".strip()
    if "'\\t'" in problem:
        message += "; indent with spaces, not tabs"
    elif "mapping values are not allowed" in problem:
        message += "; quote a value that contains ': '"
    elif "another document" in problem:
        message += "; a recipe file holds one YAML document: remove the second '---'"
    return " ".join(message.split())


def _construct(node: yaml.Node, path: Path_, file: str, located: Located) -> Any:
    where = located.values[path] = _mark(file, node)
    if len(located.values) > MAX_VALUES:
        return None  # parse_yaml reports it
    if len(path) > MAX_DEPTH:
        return _unreadable(located, where, path, f"nested deeper than {MAX_DEPTH} levels; no recipe key is that deep")
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _COLLECTION_TAGS:
        return _unreadable(located, where, path, f"the YAML tag {node.tag!r} is not supported; remove it")
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _YAML + "merge":
                located.problems.append(Problem(_mark(file, key_node), _dotted(path), "YAML merge keys (<<) are not "
                                                "supported; use `extends` to share settings"))
                continue
            key = _key(key_node, path, file, located)
            if key is None:
                continue
            if key in result:
                first = located.keys[path + (key,)]
                located.problems.append(Problem(_mark(file, key_node), _dotted(path + (key,)),
                                                f"duplicate key {key!r} (first written at line {first.line}); "
                                                "keep one of them"))
                continue
            located.keys[path + (key,)] = _mark(file, key_node)
            result[key] = _construct(value_node, path + (key,), file, located)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, path + (str(i),), file, located) for i, item in enumerate(node.value)]
    if node.tag == _YAML + "timestamp":
        return node.value  # no recipe field is a date: `revision: 2024-01-01` is the tag's name
    if node.tag not in _SCALAR_TAGS:
        return _unreadable(located, where, path, f"the YAML tag {node.tag!r} is not supported; remove it")
    try:
        return _scalar(node)
    except (yaml.YAMLError, ValueError, OverflowError, KeyError, TypeError) as error:
        reason = error.problem if isinstance(error, yaml.MarkedYAMLError) else str(error)
        return _unreadable(located, where, path, f"{node.value!r} cannot be read as {node.tag.removeprefix(_YAML)}: "
                           f"{' '.join(str(reason).split())}")


def _key(node: yaml.Node, path: Path_, file: str, located: Located) -> str | None:
    """A mapping key as a string: integers (GPU indexes like `0:`) become their digits; anything else that is not
    a string is a problem (None)."""
    where = _mark(file, node)
    if isinstance(node, yaml.ScalarNode) and node.tag == _YAML + "str":
        return node.value
    if isinstance(node, yaml.ScalarNode) and node.tag == _YAML + "int":
        try:
            return str(_scalar(node))
        except (yaml.YAMLError, ValueError, OverflowError):
            pass
    if isinstance(node, yaml.ScalarNode) and node.tag in _SCALAR_TAGS:
        try:
            reads_as = _show(_scalar(node))
        except (yaml.YAMLError, ValueError, OverflowError, KeyError, TypeError):
            reads_as = node.tag.removeprefix(_YAML)
        located.problems.append(Problem(where, _dotted(path), f"the key {node.value!r} is read as {reads_as}, not a "
                                        f"string; quote it: '{node.value}'"))
    elif isinstance(node, yaml.ScalarNode):
        located.problems.append(Problem(where, _dotted(path), f"the YAML tag {node.tag!r} is not supported on a key; "
                                        "remove it"))
    else:
        located.problems.append(Problem(where, _dotted(path), "keys must be plain strings, not lists or mappings"))
    return None


def _unreadable(located: Located, where: Location, path: Path_, message: str) -> None:
    located.problems.append(Problem(where, _dotted(path), message))
    located.broken.add(where)
    return None


_constructor = yaml.SafeLoader("")  # only its scalar constructors are used: it resolves YAML's tags to Python values


def _scalar(node: yaml.Node) -> Any:
    return _constructor.construct_object(node, deep=True)


# --- extends and variants ----------------------------------------------------------------------------------------


def _merge(parent: Located, child: Located, path: Path_ = ()) -> Located:
    """Deep-merge `child` over `parent` (mappings merge, everything else is replaced by the child's value)."""
    merged = Located(None, {}, {}, [*parent.problems, *child.problems], parent.broken | child.broken)
    merged.data = _merge_into(parent, child, path, merged)
    return merged


def _merge_into(parent: Located, child: Located, path: Path_, out: Located) -> Any:
    parent_value, child_value = _get(parent.data, path), _get(child.data, path)
    if isinstance(parent_value, dict) and isinstance(child_value, dict) and not _kind_changes(path, parent_value,
                                                                                              child_value):
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


def _kind_changes(path: Path_, parent_value: dict, child_value: dict) -> bool:
    """True when the child picks another kind of a discriminated block (`quantize.method`): the parent's keys
    belong to the other kind, so the child's block replaces the parent's instead of merging with it."""
    if not path or not (tags := _tags_of(_fields(_model_at(path[:-1])).get(path[-1]))):
        return False
    tag_field = next(f for f in ("method", "format") if f in _fields(next(iter(tags.values()))))
    return tag_field in child_value and parent_value.get(tag_field) != child_value[tag_field]


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
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        raise RecipeError([Problem(Location(display, line, 1), "", f"the file is not UTF-8 text (byte "
                                   f"{error.object[error.start]:#04x} on line {line}); save it as UTF-8")]) from None
    except OSError as error:
        raise RecipeError([Problem(Location(display, 1, 1), "", f"cannot read the file: {error.strerror}")]) from None
    located = parse_yaml(text, display)
    if not isinstance(located.data, dict):
        raise RecipeError([Problem(located.where(()), "", "a recipe is a mapping of keys (schema_version: 1, "
                                   "name: ..., source: ...), not a list or a single value")])
    extends = located.data.pop("extends", None)
    if extends is None:
        return located, (path,)
    where = located.where(("extends",))
    if not isinstance(extends, str) or not extends:
        raise RecipeError(_unique([*located.problems, Problem(where, "extends", "extends is the relative path of a "
                                                              "parent recipe file, e.g. extends: _base.yaml")]))
    parent_path = (path.parent / extends).resolve()
    if parent_path in chain or parent_path == path.resolve():
        cycle = " -> ".join(_display(p) for p in (*chain, path.resolve(), parent_path))
        raise RecipeError(_unique([*located.problems, Problem(where, "extends", f"extends cycle: {cycle}; remove "
                                                              "one of the links")]))
    if not parent_path.is_file():
        raise RecipeError(_unique([*located.problems, Problem(where, "extends", f"parent recipe {extends!r} not "
                                                              f"found (looked for {_display(parent_path)})")]))
    try:
        parent, parent_files = _read_file(parent_path, _display(parent_path), (*chain, path.resolve()))
    except RecipeError as error:
        raise RecipeError(_unique([*located.problems, *error.problems])) from None
    parent.data.pop("name", None)  # the child names the artifact; a parent's name never leaks into it
    return _merge(parent, located), (path, *parent_files)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --- validation --------------------------------------------------------------------------------------------------


def load_recipes(path: str | Path) -> list[LoadedRecipe]:
    """Load one recipe file into the recipes it defines (one, or one per variant). Raises `RecipeError` holding
    every problem of the file and of its `extends` parents."""
    path = Path(path)
    display = _display(path) if path.is_absolute() else str(path)
    if path.is_dir():
        raise RecipeError([Problem(Location(display, 1, 1), "", "is a folder; name a recipe file (`builder "
                                   "validate` also takes folders)")])
    if not path.is_file():
        raise RecipeError([Problem(Location(display, 1, 1), "", "no such recipe file")])
    located, files = _read_file(path, display, ())
    variants = located.data.pop("variants", None)
    if variants is None:
        recipe = _validate(located)
        return [LoadedRecipe(recipe, path, files, None, _source_root(located, path))]
    if not isinstance(variants, dict) or not variants:
        raise RecipeError(_unique([*located.problems, Problem(located.where(("variants",)), "variants", "variants is "
                                   "a mapping of suffix: {overrides}, with at least one suffix")]))
    problems, results, roots = list(located.problems), [], {}
    for suffix, overrides in variants.items():
        overrides = {} if overrides is None else overrides
        if not _variant_ok(located, suffix, overrides, problems):
            continue
        written = _subtree(located, ("variants", suffix), overrides)
        variant = _merge(located, written)
        variant.problems = []  # the file's own problems are already in `problems`
        variant.values[()] = located.values[()]  # a missing top-level key is missing in the file, not the variant
        if isinstance(located.data.get("name"), str):
            variant.data["name"] = f"{located.data['name']}-{suffix}"
        roots[suffix] = _source_root(variant, path)
        try:
            results.append((suffix, written, _validate(variant), []))
        except RecipeError as error:
            results.append((suffix, written, None, error.problems))
    problems += _variant_problems(results)
    if problems:
        raise RecipeError(_unique(problems))
    return [LoadedRecipe(recipe, path, files, suffix, roots[suffix]) for suffix, _, recipe, _ in results]


def _source_root(located: Located, path: Path) -> Path:
    """The folder a relative `source.model` is relative to: that of the file that wrote it (a parent's own folder
    for a path inherited through `extends`). Location files are paths as shown, relative to the working folder."""
    written = located.values.get(("source", "model"))
    if written is None or Path(written.file).resolve() == path.resolve():
        return path.parent
    return Path(written.file).resolve().parent


def _variant_ok(located: Located, suffix: str, overrides: Any, problems: list[Problem]) -> bool:
    where = located.where(("variants", suffix), key=True)
    if not _VARIANT_SUFFIX.fullmatch(suffix):
        problems.append(Problem(where, f"variants.{suffix}", f"{suffix!r} is not a variant suffix: use lowercase "
                                "letters, digits, '.', '_', '-' (at most 64), starting with a letter or digit"))
        return False
    if not isinstance(overrides, dict):
        problems.append(Problem(located.where(("variants", suffix)), f"variants.{suffix}", f"expected a mapping of "
                                f"overrides (or nothing), got {_show(overrides)}"))
        return False
    reserved = [key for key in ("name", *META_KEYS) if key in overrides]
    for key in reserved:
        why = f" (its artifact is named <name>-{suffix})" if key == "name" else ""
        problems.append(Problem(located.where(("variants", suffix, key), key=True), f"variants.{suffix}.{key}",
                                f"a variant cannot set {key}{why}; move it to the top level of the file"))
    return not reserved


def _variant_problems(results: list[tuple[str, Located, Recipe | None, list[Problem]]]) -> list[Problem]:
    """Problems of the variants; one that only some variants have, found outside their own overrides, names them."""
    counts: dict[str, int] = {}
    for _, _, _, problems in results:
        for text in {str(p) for p in problems}:
            counts[text] = counts.get(text, 0) + 1
    found = []
    for suffix, written, _, problems in results:
        own = {*written.values.values(), *written.keys.values()}
        for problem in problems:
            if counts[str(problem)] < len(results) and problem.location not in own:
                problem = Problem(problem.location, problem.path, f"{problem.message} (in variant {suffix!r})")
            found.append(problem)
    return found


def _validate(located: Located) -> Recipe:
    """Validate merged data; raises `RecipeError` with the reading problems and every validation problem."""
    problems = list(located.problems)
    recipe = None
    try:
        recipe = Recipe.model_validate(located.data)
    except ValidationError as error:
        found = (_problem(e, located) for e in error.errors())
        problems += [p for p in found if p.location not in located.broken]
    if problems or recipe is None:
        raise RecipeError(_unique(problems))
    return recipe


def _unique(problems: list[Problem]) -> list[Problem]:
    seen, result = set(), []
    for problem in problems:
        if str(problem) not in seen:
            seen.add(str(problem))
            result.append(problem)
    return sorted(result, key=lambda p: (p.location.file, p.location.line, p.location.column))


_EXPECTED = {"string_type": "a string", "bool_type": "true or false", "bool_parsing": "true or false",
             "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
             "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
             "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
             "tuple_type": "a list", "list_type": "a list"}


def _problem(error: dict, located: Located) -> Problem:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    path, holders = _walk(error["loc"])
    if kind == "value_error" and isinstance(ctx.get("error"), RuleViolation):
        path = path + ctx["error"].path
    dotted = _dotted(path)
    if kind == "extra_forbidden":
        return Problem(located.where(path, key=True), dotted, _unknown_key(path, holders))
    if kind == "missing":
        return Problem(located.where(path[:-1]), dotted, "required key is missing")
    where = located.where(path)
    if kind == "literal_error":
        choices = _literal_choices(holders[-1], path[-1]) or tuple(re.findall(r"'([^']*)'", ctx.get("expected", "")))
        return Problem(where, dotted, _not_one_of(value, choices))
    if kind == "union_tag_invalid":
        choices = tuple(re.findall(r"'([^']*)'", ctx.get("expected_tags", "")))
        discriminator = ctx.get("discriminator", "").strip("'")
        tag = value.get(discriminator) if isinstance(value, dict) else ctx.get("tag")
        return Problem(located.where(path + (discriminator,)), f"{dotted}.{discriminator}", _not_one_of(tag, choices))
    if kind == "union_tag_not_found":
        discriminator = ctx.get("discriminator", "").strip("'")
        return Problem(where, f"{dotted}.{discriminator}", f"required key is missing; it picks the kind of {dotted} "
                       f"({_tags(path)})")
    if kind == "string_pattern_mismatch" and path == ("name",):
        return Problem(where, dotted, f"{value!r} is not a valid artifact name: use lowercase letters, digits, '.', "
                       f"'_' and '-', starting with a letter or digit, at most 96 characters ({NAME_PATTERN})")
    if kind == "value_error":
        return Problem(where, dotted, str(ctx.get("error", error["msg"])))
    if kind in _EXPECTED:
        return Problem(where, dotted, f"expected {_EXPECTED[kind]}, got {_show(value)}{_type_hint(kind, value)}")
    message = error["msg"]
    return Problem(where, dotted, f"{message[0].lower()}{message[1:]} (got {_show(value)})")


def _type_hint(kind: str, value: Any) -> str:
    if kind == "string_type" and isinstance(value, (bool, int, float)):
        return " (quote it to make it a string)"
    if isinstance(value, str) and kind in ("bool_type", "int_type", "float_type"):
        return " (write it without quotes)"
    return ""


def _unknown_key(path: Path_, holders: list[Any]) -> str:
    key, holder = path[-1], holders[-1]
    choices = [*_fields(holder)] + ([*META_KEYS] if len(path) == 1 else [])
    close = get_close_matches(key, choices, n=1) or [c for c in choices if _shares_prefix(key, c)]
    if len(path) >= 2 and (members := _tags_of(_fields(holders[-2]).get(path[-2]))):
        tag_field = next(f for f in ("method", "format") if f in _fields(holder))
        here = next(tag for tag, member in members.items() if member is holder)
        elsewhere = [tag for tag, member in members.items() if member is not holder and key in _fields(member)]
        if elsewhere:
            return f"unknown key {key!r} for {tag_field} {here}; it is a setting of {' and '.join(elsewhere)}"
    hint = f" (did you mean {close[0]!r}?)" if close else f"; allowed: {', '.join(choices)}"
    return f"unknown key {key!r}{hint}"


def _shares_prefix(key: str, choice: str) -> bool:
    """`opset_version` ~ `opset`: one name starts with the other (for names of three or more characters)."""
    return len(key) >= 3 and (key.startswith(choice) or choice.startswith(key))


def _show(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return "a mapping" if isinstance(value, dict) else "a list"
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _not_one_of(value: Any, choices: tuple[str, ...]) -> str:
    close = []
    if isinstance(value, str) and value:
        containing = [c for c in choices if len(value) >= 3 and value.lower() in c.lower()]
        close = ([_ALIASES[value.lower()]] if _ALIASES.get(value.lower()) in choices else
                 get_close_matches(value, choices, n=1) or (containing if len(containing) == 1 else []))
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{_show(value)} is not one of {', '.join(choices)}{hint}"


def _dotted(path: Path_) -> str:
    return ".".join(path)


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
