"""YAML with marks: plain data plus the file, line and column each key path was written at.

YAML is composed into nodes (so each value keeps its mark) and turned into plain data; duplicate keys, merge keys,
unsupported tags and unreadable values are recorded as problems and reading goes on, so every problem of a file is
reported at once. Deep nesting and alias bombs are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from builder.errors import Location, Problem, RecipeError
from builder.recipe.wording import Path_, dotted, show

MAX_DEPTH = 32
MAX_NODES = 20_000  # values, keys and list items as written; a recipe has a few hundred
MAX_VALUES = 100_000  # aliases can make a small file expand exponentially ("billion laughs")
_YAML = "tag:yaml.org,2002:"
_SCALAR_TAGS = tuple(_YAML + t for t in ("str", "int", "float", "bool", "null"))
_COLLECTION_TAGS = (_YAML + "map", _YAML + "seq")


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


class _TooManyNodes(Exception):
    def __init__(self, mark: yaml.Mark):
        self.mark = mark


class _CountingLoader(yaml.SafeLoader):
    """Composes like SafeLoader, but stops at the `MAX_NODES`+1-th node instead of building a huge tree first."""

    def __init__(self, text: str):
        super().__init__(text)
        self.nodes = 0

    def compose_node(self, parent, index):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _TooManyNodes(self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _compose(text: str) -> yaml.Node | None:
    loader = _CountingLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _mark(file: str, node: yaml.Node) -> Location:
    return Location(file, node.start_mark.line + 1, node.start_mark.column + 1)


def parse_yaml(text: str, file: str) -> Located:
    """Parse one YAML document keeping marks. Raises `RecipeError` when the text is not YAML or is empty;
    duplicate keys, non-string keys and unreadable values are collected in `Located.problems`."""
    try:
        node = _compose(text)
    except _TooManyNodes as error:
        raise RecipeError(
            [
                Problem(
                    Location(file, error.mark.line + 1, error.mark.column + 1),
                    "",
                    f"the YAML has "
                    f"more than {MAX_NODES:,} values, keys and list items (the limit was hit here); "
                    "a recipe has a few hundred: remove the generated data",
                )
            ]
        ) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        location = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file, 1, 1)
        raise RecipeError([Problem(location, "", f"invalid YAML: {_yaml_message(error)}")]) from None
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        code = error.character if isinstance(error.character, int) else ord(error.character)
        raise RecipeError(
            [
                Problem(
                    Location(file, line, column),
                    "",
                    f"invalid YAML: the control character U+{code:04X} is not allowed in YAML text; remove it",
                )
            ]
        ) from None
    except yaml.YAMLError as error:
        message = " ".join(str(error).split())
        raise RecipeError([Problem(Location(file, 1, 1), "", f"invalid YAML: {message}")]) from None
    except RecursionError:
        raise RecipeError(
            [
                Problem(
                    Location(file, 1, 1),
                    "",
                    f"the YAML is nested too deeply; a recipe needs at most {MAX_DEPTH} levels",
                )
            ]
        ) from None
    if node is None:
        raise RecipeError(
            [Problem(Location(file, 1, 1), "", "the file is empty; a recipe starts with schema_version: 1")]
        )
    located = Located(None, {(): _mark(file, node)})
    located.data = _construct(node, (), file, located)
    if len(located.values) > MAX_VALUES:
        raise RecipeError(
            [
                Problem(
                    Location(file, 1, 1),
                    "",
                    f"the YAML expands to more than {MAX_VALUES:,} values (through aliases); a recipe is far smaller",
                )
            ]
        )
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
                located.problems.append(
                    Problem(
                        _mark(file, key_node),
                        dotted(path),
                        "YAML merge keys (<<) are not supported; use `extends` to share settings",
                    )
                )
                continue
            key = _key(key_node, path, file, located)
            if key is None:
                continue
            if key in result:
                first = located.keys[path + (key,)]
                located.problems.append(
                    Problem(
                        _mark(file, key_node),
                        dotted(path + (key,)),
                        f"duplicate key {key!r} (first written at line {first.line}); keep one of them",
                    )
                )
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
        if "int_max_str_digits" in str(reason):  # Python's advice (a setting of the interpreter) is not the fix
            reason = f"it has {len(node.value):,} digits; no recipe number is that large"
        return _unreadable(
            located,
            where,
            path,
            f"{show(node.value)} cannot be read as {node.tag.removeprefix(_YAML)}: {' '.join(str(reason).split())}",
        )


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
            reads_as = show(_scalar(node))
        except (yaml.YAMLError, ValueError, OverflowError, KeyError, TypeError):
            reads_as = node.tag.removeprefix(_YAML)
        located.problems.append(
            Problem(
                where,
                dotted(path),
                f"the key {show(node.value)} is read as {reads_as}, not a string; quote it: '{node.value}'",
            )
        )
    elif isinstance(node, yaml.ScalarNode):
        located.problems.append(
            Problem(where, dotted(path), f"the YAML tag {node.tag!r} is not supported on a key; remove it")
        )
    else:
        located.problems.append(Problem(where, dotted(path), "keys must be plain strings, not lists or mappings"))
    return None


def _unreadable(located: Located, where: Location, path: Path_, message: str) -> None:
    located.problems.append(Problem(where, dotted(path), message))
    located.broken.add(where)
    return None


_constructor = yaml.SafeLoader("")  # only its scalar constructors are used: it resolves YAML's tags to Python values


def _scalar(node: yaml.Node) -> Any:
    return _constructor.construct_object(node, deep=True)
