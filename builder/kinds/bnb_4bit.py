"""bitsandbytes 4-bit (`quantize.method: bnb-4bit`): nf4 or fp4 weights, reloaded by stock transformers for the
gate, which also bounds the loaded footprint by what the plan expects."""

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
from builder.recipe import Bnb4Bit, Recipe
from builder.tasks.base import Runner

NAME: str = "bnb-4bit"
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
    assert isinstance(recipe.quantize, Bnb4Bit)
    return f"bnb-{recipe.quantize.quant_type}"


def expected_footprint(recipe: Recipe, tensors, config: dict) -> float | None:
    return bnb_expected_footprint(recipe, tensors, config, bits=4)


def card_tags(block: dict) -> list[str]:
    return ["bitsandbytes", "4-bit", *([block["quant_type"]] if block.get("quant_type") else [])]


def card_summary(block: dict) -> str:
    double = ", double quantization" if block.get("double_quant") else ""
    return f"bitsandbytes 4-bit ({block.get('quant_type', 'nf4')}{double})"


def quantized(block: dict) -> bool:
    return True
