"""bitsandbytes 8-bit (`quantize.method: bnb-8bit`, LLM.int8()): int8 weights with one scale per row, reloaded
by stock transformers for the gate, which also bounds the loaded footprint by what the plan expects."""

from __future__ import annotations

from builder.kinds.base import (
    BNB_REQUIRED,
    BNB_VERSIONED,
    bnb_build,
    bnb_default_thresholds,
    bnb_describe,
    bnb_expected_artifact_bytes,
    bnb_expected_footprint,
    bnb_refusal,
    bnb_reverify,
    bnb_verify,
)
from builder.recipe import Recipe
from builder.tasks.base import Runner

NAME: str = "bnb-8bit"
STAGE: str = "quantize"
RUNNER: Runner = "transformers"
LIBRARY: str = "transformers"
VERSIONED: tuple[str, ...] = BNB_VERSIONED
REQUIRED: tuple[str, ...] = BNB_REQUIRED
GATES: tuple[str, ...] = ("footprint_ratio",)

default_thresholds = bnb_default_thresholds
refusal = bnb_refusal
expected_artifact_bytes = bnb_expected_artifact_bytes
describe = bnb_describe
build = bnb_build
verify = bnb_verify
reverify = bnb_reverify


def scheme(recipe: Recipe) -> str:
    return "bnb-int8"


def expected_footprint(recipe: Recipe, tensors, config: dict) -> float | None:
    return bnb_expected_footprint(recipe, tensors, config, bits=8)


def card_tags(block: dict) -> list[str]:
    return ["bitsandbytes", "8-bit"]


def card_summary(block: dict) -> str:
    return "bitsandbytes LLM.int8()"


def quantized(block: dict) -> bool:
    return True
