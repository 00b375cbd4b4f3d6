"""Every user-facing failure is a `BuilderError`; its message says what happened and what to do next.

The CLI prints the message and exits 1. Anything that is not a `BuilderError` is a bug: the CLI writes the
traceback to a log file and exits 3.
"""

from __future__ import annotations

from dataclasses import dataclass


class BuilderError(Exception):
    """A failure the user can act on. `str(error)` is the one-line (or one-line-per-problem) message."""


@dataclass(frozen=True)
class Location:
    """Where a value came from: a file and a 1-based line and column."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One located problem in a recipe: `recipes/x.yaml:12:5: quantize.quant_type: <message>`."""

    location: Location
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.location}: {where}{self.message}"

    def as_json(self) -> dict:
        return {
            "file": self.location.file,
            "line": self.location.line,
            "column": self.location.column,
            "path": self.path,
            "message": self.message,
        }


class RecipeError(BuilderError):
    """A recipe (or one of its `extends` parents) is invalid; holds every problem found in it."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))


class SourceError(BuilderError):
    """The source model cannot be found, read or trusted as the recipe asks."""


class BuildError(BuilderError):
    """A build step failed for a reason the user can fix (memory, disk, a library that is missing)."""


class VerificationFailed(BuilderError):
    """The artifact missed one or more of the recipe's verification thresholds."""


class ArtifactError(BuilderError):
    """An artifact folder is missing its manifest, or its manifest is not one this builder reads."""


class PublishError(BuilderError):
    """Publishing was refused or failed; the message says why and how to proceed."""


class MissingDependency(BuilderError):
    """A step needs an optional dependency that is not installed."""

    def __init__(self, package: str, extra: str):
        super().__init__(
            f"this step needs {package}, which is not installed; install it with: pip install -e '.[{extra}]'"
        )
