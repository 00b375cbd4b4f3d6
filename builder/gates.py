"""The gate's vocabulary: one table of the metrics a threshold bounds, which way, and how they are written.

Every reader goes through it: the recipe schema (`verify.thresholds` has one field per `recipe` gate), the plan and
`builder plan` (the bounds and their signs), both gates (`check`), the card, the report and `builder verify`.
Which gates a model gets, and their default bounds, are its task's and build kind's (`builder.tasks`,
`builder.kinds`); this module imports neither, so all of them can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Gate:
    """One threshold: its key (the `verify.thresholds` field), the report metric it bounds and which way."""

    key: str
    metric: str
    """The name of the metric in the verification report's `metrics`."""
    direction: Literal["min", "max"]
    """"min": the metric must be at least the bound (higher is better); "max": at most."""
    description: str
    """What the recipe field means (the JSON Schema's and docs/recipes.md's wording)."""
    recipe: bool = True
    """Whether a recipe may set it under `verify.thresholds` (False: a fixed bound of its build kind)."""
    ge: float | None = None
    """The recipe field's lowest value (pydantic's `ge`); `le` the highest, `gt` a bound it must exceed."""
    le: float | None = None
    gt: float | None = None

    @property
    def sign(self) -> str:
        """How a passing value compares with the bound: ">=" or "<="."""
        return ">=" if self.direction == "min" else "<="

    def missed_by(self, value: float, bound: float) -> float:
        """How far `value` is on the wrong side of `bound` (<= 0: it passes)."""
        return bound - value if self.direction == "min" else value - bound


GATES: dict[str, Gate] = {
    gate.key: gate
    for gate in (
        Gate(
            "top1_agreement",
            "top1_agreement",
            "min",
            "Minimum share of positions whose top-1 next token matches (LMs; classifier heads of ONNX exports).",
            ge=0,
            le=1,
        ),
        Gate(
            "kl_divergence",
            "kl_divergence_mean",
            "max",
            "Maximum mean KL divergence of next-token distributions, in nats (LMs).",
            ge=0,
        ),
        Gate(
            "perplexity_ratio",
            "perplexity_ratio",
            "max",
            "Maximum perplexity ratio candidate/reference on the evaluation text (LMs, bitsandbytes).",
            ge=1,
        ),
        Gate(
            "max_abs_diff",
            "max_abs_diff",
            "max",
            "Maximum absolute difference of outputs (ONNX) or hidden states (encoders).",
            gt=0,
        ),
        Gate(
            "cosine",
            "cosine_min",
            "min",
            "Minimum cosine similarity of pooled embeddings, the lowest over the inputs (encoders).",
            ge=-1,
            le=1,
        ),
        Gate(
            "footprint_ratio",
            "footprint_ratio",
            "max",
            "Maximum memory footprint ratio candidate/reference (bitsandbytes; default: the plan's expected "
            "ratio plus a margin).",
            gt=0,
        ),
        Gate(
            "generation_match",
            "generation_match",
            "min",
            "Share of prompts whose greedy continuation through the graph equals PyTorch's (float32 ONNX LMs).",
            recipe=False,
        ),
    )
}
RECIPE_GATES: tuple[str, ...] = tuple(key for key, gate in GATES.items() if gate.recipe)
"""The `verify.thresholds` keys, in the table's order."""


def gate_of_metric(metric: str) -> Gate | None:
    """The gate that bounds report metric `metric` (`cosine_min` -> `cosine`), or None when none does."""
    return next((gate for gate in GATES.values() if gate.metric == metric), None)


def check(metrics: dict, thresholds: dict[str, float]) -> list[dict]:
    """The failures of `metrics` against `thresholds`: one entry per missed threshold, with its message."""
    failures = []
    for key, bound in thresholds.items():
        gate = GATES[key]
        value = metrics[gate.metric]
        missed = gate.missed_by(value, bound)
        if missed > 0:
            sign = "<" if gate.direction == "min" else ">"
            failures.append(
                {
                    "metric": gate.metric,
                    "value": value,
                    "threshold": bound,
                    "message": f"{gate.metric} {number(value)} {sign} {number(bound)} (missed by {number(missed)})",
                }
            )
    return failures


def bounds_by_metric(thresholds: dict[str, float]) -> dict[str, float]:
    """Report metric -> the bound the gate holds it to (`{"cosine": 0.9}` -> `{"cosine_min": 0.9}`)."""
    return {GATES[key].metric: bound for key, bound in thresholds.items()}


def describe(thresholds: dict[str, float]) -> str:
    """The thresholds as `builder plan` prints them: "top1_agreement >= 0.45, kl_divergence <= 1.5"."""
    return ", ".join(f"{key} {GATES[key].sign} {bound:g}" for key, bound in thresholds.items())


def number(value: float) -> str:
    """Three decimals, or three significant digits for values too small for that (a KL of 0.000213)."""
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"
