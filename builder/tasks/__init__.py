"""Tasks: optimum's task names (`names`), and the task families the gate verifies, one module each behind
`base.TaskFamily`. `FAMILIES` is the registry: a new family is one module and one line here; everything else asks
`family_of`, and no other module compares task names.
"""

from __future__ import annotations

from builder.errors import BuildError
from builder.tasks import causal_lm, text_encoder
from builder.tasks.base import Runner, TaskFamily
from builder.tasks.names import AUTO_CLASSES, BARE_MODEL_TASK, TASKS, auto_class, infer_task

FAMILIES: dict[str, TaskFamily] = {causal_lm.NAME: causal_lm, text_encoder.NAME: text_encoder}

# What a task the gate cannot feed takes instead of token ids (by task-name prefix), for the refusal's message.
_INPUTS = {
    "image": "images",
    "audio": "audio",
    "automatic-speech": "audio",
    "text-to-audio": "text (it outputs audio)",
    "depth": "images",
    "object": "images",
    "mask": "images",
    "semantic": "images",
    "visual": "images and text",
    "zero-shot-image": "images",
    "masked-im": "images",
    "reinforcement": "environment observations",
}


def family_of(task: str) -> TaskFamily | None:
    """The registered family that verifies `task`, or None."""
    return next((family for family in FAMILIES.values() if task in family.TASKS), None)


def family(task: str) -> TaskFamily:
    """`family_of(task)`, for a task the plan accepted (`BuildError` otherwise)."""
    found = family_of(task)
    if found is None:
        raise BuildError(f"task {task!r} has no verification in builder; {unsupported(task)}")
    return found


def unsupported(task: str) -> str:
    """Why no family verifies `task`, naming what it takes as input."""
    needs = next((inputs for prefix, inputs in _INPUTS.items() if task.startswith(prefix)), "non-text")
    return (
        f"task {task!r} takes {needs} as input, but the verification gate feeds token ids only (it verifies "
        f"{', '.join(FAMILIES)} models), so this build cannot be verified"
    )


def applicable_gates(task: str, runner: Runner) -> tuple[str, ...]:
    """The gates a `runner` gate computes for `task` (empty for a task no family verifies)."""
    found = family_of(task)
    return found.gates(runner, task) if found is not None else ()


__all__ = [
    "AUTO_CLASSES",
    "BARE_MODEL_TASK",
    "FAMILIES",
    "TASKS",
    "TaskFamily",
    "applicable_gates",
    "auto_class",
    "family",
    "family_of",
    "infer_task",
    "unsupported",
]
