"""Recipe files -> validated `Recipe`s, with every error located at a file, line and column.

YAML is composed into nodes (so each value keeps its mark), turned into plain data with a location per key path,
`extends` parents are deep-merged under the child (child wins; a parent's values keep the parent's locations),
each `variants` entry is merged on top, and the result is validated by pydantic. All problems of a file are
collected and raised together as one `RecipeError`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from builder.errors import BuilderError, Location, Problem, RecipeError
from builder.recipe.marks import Located, parse_yaml
from builder.recipe.messages import (
    META_KEYS,
    discriminator_at,
    problem_from_error,
    unique_sorted,
)
from builder.recipe.schema import Recipe, is_local_path
from builder.recipe.wording import Path_, did_you_mean, show

_VARIANT_SUFFIX = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_RECIPE_BYTES = 1024 * 1024  # recipes are a few KiB; parsing YAML in Python takes seconds per MiB
MAX_EXTENDS_FILES = 32  # files in one `extends` chain, the recipe included; recipes have a base or two
_CHAIN_LOOKAHEAD = 1024  # files read past the limit for their `extends` only, to tell a long chain from a cycle


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
    name_at: Location | None = None
    """Where `name` was written."""
    marks: Located | None = field(default=None, compare=False, repr=False)
    """Where every value was written (after `extends` and the variant), for problems found past the schema."""

    def where(self, path: Path_) -> Location:
        """The location of the value at `path` (or its nearest written ancestor)."""
        return self.marks.where(path) if self.marks is not None else Location(str(self.path), 1, 1)

    @property
    def source_path(self) -> Path | None:
        """The local source folder, resolved; None for a Hub source."""
        if not self.recipe.source.is_local:
            return None
        return (self.source_root / Path(self.recipe.source.model).expanduser()).resolve()


# --- extends and variants ----------------------------------------------------------------------------------------


def _merge(parent: Located, child: Located) -> Located:
    """Deep-merge `child` over `parent` (mappings merge, everything else is replaced by the child's value)."""
    merged = Located(None, {}, {}, [*parent.problems, *child.problems], parent.broken | child.broken)
    taken: dict[Path_, Located] = {}
    merged.data = _merge_into(parent, child, (), merged, taken)
    # One pass over each side's locations, not one per key taken: a pass per key made a file's merges quadratic.
    for side in (parent, child):
        for table, target in ((side.values, merged.values), (side.keys, merged.keys)):
            for path, location in table.items():
                if _taken_from(taken, path) is side:
                    target[path] = location
    return merged


def _merge_into(parent: Located, child: Located, path: Path_, out: Located, taken: dict[Path_, Located]) -> Any:
    """The merged value at `path`; records in `taken` the side whose whole subtree each unmerged path comes from."""
    parent_value, child_value = _get(parent.data, path), _get(child.data, path)
    if (
        isinstance(parent_value, dict)
        and isinstance(child_value, dict)
        and not _kind_changes(path, parent_value, child_value)
    ):
        out.values[path] = child.values.get(path) or parent.values[path]
        result = {}
        for key in {**parent_value, **child_value}:
            sub = path + (key,)
            side = child if key in child_value else parent
            if key in child_value and key in parent_value:
                result[key] = _merge_into(parent, child, sub, out, taken)
            else:
                taken[sub] = side
                result[key] = _get(side.data, sub)
            out.keys[sub] = side.keys[sub]
        return result
    source = child if _has(child.data, path) else parent
    taken[path] = source
    return _get(source.data, path)


def _kind_changes(path: Path_, parent_value: dict, child_value: dict) -> bool:
    """True when the child picks another kind of a discriminated block (`quantize.method`): the parent's keys
    belong to the other kind, so the child's block replaces the parent's instead of merging with it."""
    tag_field = discriminator_at(path)
    return tag_field is not None and tag_field in child_value and parent_value.get(tag_field) != child_value[tag_field]


def _taken_from(taken: dict[Path_, Located], path: Path_) -> Located | None:
    """The side whose subtree holds `path` in the merge, or None where the merged value is neither side's (a merged
    mapping, whose locations the merge wrote, or a key no longer in the data, such as a popped `extends`)."""
    for end in range(len(path) + 1):
        if (side := taken.get(path[:end])) is not None:
            return side
    return None


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


def _without_variants(located: Located, variants: dict) -> tuple[Located, dict[str, Located]]:
    """`located` without its `variants` locations (and without its problems, reported once for the file), and each
    variant's overrides re-rooted with their locations, in one pass: a pass per variant, and every variant's merge
    carrying all the others' locations, made loading quadratic in the number of variants."""
    base = Located(located.data, {}, {}, [], located.broken)
    overrides = {suffix: Located({} if written is None else written) for suffix, written in variants.items()}
    for table in ("values", "keys"):
        for path, location in getattr(located, table).items():
            if path[:1] != ("variants",):
                getattr(base, table)[path] = location
            elif len(path) >= 2:
                getattr(overrides[path[1]], table)[path[2:]] = location
    return base, overrides


def _parse_file(path: Path, display: str) -> Located:
    """One recipe file's mapping with its locations (its `extends` not followed)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)  # never more: the file may be huge or still growing
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(
                [
                    Problem(
                        Location(display, 1, 1),
                        "",
                        f"the file is over {MAX_RECIPE_BYTES:,} bytes "
                        f"(1 MiB), the limit for a recipe; recipes are a few KiB: is this the right "
                        "file?",
                    )
                ]
            )
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        raise RecipeError(
            [
                Problem(
                    Location(display, line, 1),
                    "",
                    f"the file is not UTF-8 text (byte "
                    f"{error.object[error.start]:#04x} on line {line}); save it as UTF-8",
                )
            ]
        ) from None
    except OSError as error:
        raise RecipeError([Problem(Location(display, 1, 1), "", f"cannot read the file: {error.strerror}")]) from None
    located = parse_yaml(text, display)
    if not isinstance(located.data, dict):
        raise RecipeError(
            [
                Problem(
                    located.where(()),
                    "",
                    "a recipe is a mapping of keys (schema_version: 1, "
                    "name: ..., source: ...), not a list or a single value",
                )
            ]
        )
    return located


def _read_file(path: Path, display: str, chain: tuple[Path, ...]) -> tuple[Located, tuple[Path, ...]]:
    """Read `path` and its `extends` ancestry; returns the merged data and the files involved, child first.
    `chain` is the files that extend `path`, resolved, the recipe first."""
    located = _parse_file(path, display)
    extends = located.data.pop("extends", None)
    if extends is None:
        return located, (path,)
    where = located.where(("extends",))
    if not isinstance(extends, str) or not extends:
        raise RecipeError(
            unique_sorted(
                [
                    *located.problems,
                    Problem(
                        where,
                        "extends",
                        "extends is the relative path of a parent recipe file, e.g. extends: _base.yaml",
                    ),
                ]
            )
        )
    here = (*chain, path.resolve())
    parent_path = (path.parent / extends).resolve()
    if parent_path in here:
        raise RecipeError(unique_sorted([*located.problems, _cycle(where, (*here, parent_path))]))
    if not parent_path.is_file():
        raise RecipeError(
            unique_sorted(
                [
                    *located.problems,
                    Problem(
                        where,
                        "extends",
                        f"parent recipe {show(extends)} not found (looked for {_display(parent_path)})",
                    ),
                ]
            )
        )
    if len(here) == MAX_EXTENDS_FILES:
        raise RecipeError(unique_sorted([*located.problems, _chain_too_long(where, (*here, parent_path))]))
    try:
        parent, parent_files = _read_file(parent_path, _display(parent_path), here)
    except RecipeError as error:
        raise RecipeError(unique_sorted([*located.problems, *error.problems])) from None
    parent.data.pop("name", None)  # the child names the artifact; a parent's name never leaks into it
    return _merge(parent, located), (path, *parent_files)


def _cycle(where: Location, chain: tuple[Path, ...]) -> Problem:
    return Problem(where, "extends", f"extends cycle: {_shown_chain(chain)}; remove one of the links")


def _chain_too_long(where: Location, chain: tuple[Path, ...]) -> Problem:
    """The problem of an `extends` chain that goes past the limit at `where`: a cycle if the files past the limit
    close one (each read for its `extends` only), else the chain and its length."""
    while len(chain) < MAX_EXTENDS_FILES + _CHAIN_LOOKAHEAD and (link := _extends_of(chain[-1])) is not None:
        link_at, parent_path = link
        if parent_path in chain:
            return _cycle(link_at, (*chain, parent_path))
        chain = (*chain, parent_path)
    ended = len(chain) < MAX_EXTENDS_FILES + _CHAIN_LOOKAHEAD  # else the look-ahead stopped first
    length = f"{len(chain):,} files" if ended else f"at least {len(chain):,} files"
    return Problem(
        where,
        "extends",
        f"extends chain of {length}, over the limit of {MAX_EXTENDS_FILES} (the recipe and its parents): "
        f"{_shown_chain(chain)}; a recipe needs a base or two: merge the bases into fewer files",
    )


def _extends_of(path: Path) -> tuple[Location, Path] | None:
    """Where `path` writes `extends` and the parent file it names; None when it names none, or none that exists, or
    cannot be read."""
    try:
        located = _parse_file(path, _display(path))
    except RecipeError:
        return None
    extends = located.data.get("extends")
    if not isinstance(extends, str) or not extends or not (parent := (path.parent / extends).resolve()).is_file():
        return None
    return located.where(("extends",)), parent


def _shown_chain(chain: tuple[Path, ...]) -> str:
    """`a.yaml -> b.yaml -> c.yaml`; a long chain shows its first and last three files."""
    if len(chain) <= 8:
        return " -> ".join(_display(p) for p in chain)
    return " -> ".join(
        [*(_display(p) for p in chain[:3]), f"... ({len(chain) - 6:,} more)", *(_display(p) for p in chain[-3:])]
    )


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
        raise RecipeError(
            [
                Problem(
                    Location(display, 1, 1),
                    "",
                    "is a folder; name a recipe file (`builder validate` also takes folders)",
                )
            ]
        )
    if not path.is_file():
        raise RecipeError([Problem(Location(display, 1, 1), "", "no such recipe file")])
    located, files = _read_file(path, display, ())
    variants = located.data.pop("variants", None)
    if variants is None:
        root = _source_root(located, path)
        _folder_written_bare(located, root)
        recipe = _validate(located)
        return [LoadedRecipe(recipe, path, files, None, root, located.where(("name",)), located)]
    if not isinstance(variants, dict) or not variants:
        raise RecipeError(
            unique_sorted(
                [
                    *located.problems,
                    Problem(
                        located.where(("variants",)),
                        "variants",
                        "variants is a mapping of suffix: {overrides}, with at least one suffix",
                    ),
                ]
            )
        )
    problems = list(located.problems)
    results: list[tuple[str, Located, Recipe | None, list[Problem]]] = []
    roots: dict[str, Path] = {}
    marks: dict = {}
    base, overrides = _without_variants(located, variants)
    base_root = _source_root(located, path)
    for suffix, written in overrides.items():
        if not _variant_ok(located, suffix, written.data, problems):
            continue
        variant = _merge(base, written)
        variant.values[()] = located.values[()]  # a missing top-level key is missing in the file, not the variant
        if isinstance(located.data.get("name"), str):
            variant.data["name"] = f"{located.data['name']}-{suffix}"
        # a variant writes in this file; resolving paths for each of 10,000 variants took a quarter of the load
        roots[suffix] = path.parent if ("source", "model") in written.values else base_root
        _folder_written_bare(variant, roots[suffix])
        marks[suffix] = variant
        try:
            results.append((suffix, written, _validate(variant), []))
        except RecipeError as error:
            results.append((suffix, written, None, error.problems))
    problems += _variant_problems(results)
    if problems:
        raise RecipeError(unique_sorted(problems))
    name_at = located.where(("name",))
    return [
        LoadedRecipe(recipe, path, files, suffix, roots[suffix], name_at, marks[suffix])
        for suffix, _, recipe, _ in results
        if recipe is not None
    ]  # a failed variant raised above


def _source_root(located: Located, path: Path) -> Path:
    """The folder a relative `source.model` is relative to: that of the file that wrote it (a parent's own folder
    for a path inherited through `extends`). Location files are paths as shown, relative to the working folder."""
    written = located.values.get(("source", "model"))
    if written is None or Path(written.file).resolve() == path.resolve():
        return path.parent
    return Path(written.file).resolve().parent


def _folder_written_bare(located: Located, root: Path) -> None:
    """A `source.model` without `./` that names a folder beside the file that wrote it is that folder (what its
    writer meant: it is right there), written `./<it>` so the plan, the manifest, the card and publish all take it
    for a local folder. Where the folder is absent it stays a Hub repo id; the two build hashes differ."""
    source = located.data.get("source")
    model = source.get("model") if isinstance(source, dict) else None
    if isinstance(model, str) and model and not is_local_path(model) and "\\" not in model and (root / model).is_dir():
        located.data["source"] = {**source, "model": f"./{model}"}


def _variant_ok(located: Located, suffix: str, overrides: Any, problems: list[Problem]) -> bool:
    where = located.where(("variants", suffix), key=True)
    if not _VARIANT_SUFFIX.fullmatch(suffix):
        problems.append(
            Problem(
                where,
                f"variants.{suffix}",
                f"{show(suffix)} is not a variant suffix: use lowercase "
                "letters, digits, '.', '_', '-' (at most 64), starting with a letter or digit",
            )
        )
        return False
    if not isinstance(overrides, dict):
        problems.append(
            Problem(
                located.where(("variants", suffix)),
                f"variants.{suffix}",
                f"expected a mapping of overrides (or nothing), got {show(overrides)}",
            )
        )
        return False
    reserved = [key for key in ("name", *META_KEYS) if key in overrides]
    for key in reserved:
        why = f" (its artifact is named <name>-{suffix})" if key == "name" else ""
        problems.append(
            Problem(
                located.where(("variants", suffix, key), key=True),
                f"variants.{suffix}.{key}",
                f"a variant cannot set {key}{why}; move it to the top level of the file",
            )
        )
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
        found = (problem_from_error(dict(e), located) for e in error.errors())
        problems += [p for p in found if p.location not in located.broken]
    if problems or recipe is None:
        raise RecipeError(unique_sorted(problems))
    return recipe


# --- finding recipe files ----------------------------------------------------------------------------------------


def find_recipe_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand folders into their `*.yaml`/`*.yml` files, sorted; files whose name starts with `_` are partials
    (shared bases for `extends`) and are only checked through the recipes that extend them."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.suffix in (".yaml", ".yml") and p.is_file() and not p.name.startswith("_")
            )
        else:
            found.append(path)
    return found


def files_defining(names: list[str], files: list[Path]) -> list[Path]:
    """The recipe files among `files` that define an artifact named in `names`. A name that no valid file defines
    is an error naming the closest artifact (and any file that could not be read)."""
    loaded, unreadable = _readable(files)
    defined = {item.recipe.name for item in loaded}
    for name in names:
        if name not in defined:
            hint = did_you_mean(name, sorted(defined))
            broken = f"; these files have errors, see `builder validate`: {', '.join(unreadable)}" if unreadable else ""
            raise BuilderError(f"no recipe defines an artifact named {name!r}{hint}{broken}")
    return list(dict.fromkeys(item.path for item in loaded if item.recipe.name in names))


def name_clashes(files: list[Path]) -> list[tuple[Path, Problem]]:
    """(recipe file, problem) for each recipe whose artifact name an earlier recipe already has: both would build
    into `<out>/<name>/`. Files that do not load are skipped (their own problems are reported elsewhere)."""
    first: dict[str, LoadedRecipe] = {}
    problems = []
    for item in _readable(files)[0]:
        name = item.recipe.name
        if name not in first:
            first[name] = item
            continue
        other = first[name]
        where = f"{other.path}" + (f" (variant {other.variant})" if other.variant else "")
        problems.append(
            (
                item.path,
                Problem(
                    item.name_at or Location(str(item.path), 1, 1),
                    "name",
                    f"artifact {name!r} is also built by {where}; artifact names must be "
                    "unique (each builds <out>/<name>/)",
                ),
            )
        )
    return problems


def require_unique_names(files: list[Path]) -> None:
    """Raise `RecipeError` when two recipes among `files` build the same artifact (see `name_clashes`)."""
    if clashes := name_clashes(files):
        raise RecipeError([problem for _, problem in clashes])


def _readable(files: list[Path]) -> tuple[list[LoadedRecipe], list[str]]:
    """Every recipe the files define, and the files that do not load."""
    loaded, unreadable = [], []
    for file in files:
        try:
            loaded += load_recipes(file)
        except RecipeError:
            unreadable.append(str(file))
    return loaded, unreadable
