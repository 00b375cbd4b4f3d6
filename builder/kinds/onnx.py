"""ONNX exports (`export.format: onnx`): the graph for an onnxruntime execution provider, optionally float16,
dynamic int8 or 4-bit weight-only; the gate runs it on onnxruntime against the PyTorch source, and a GPU provider
that leaves compute-heavy nodes on the CPU fails it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.checkpoint import TensorInfo
from builder.errors import BuildError
from builder.modules import EMBEDDING_NAMES
from builder.recipe import Recipe
from builder.tasks.base import Runner

if TYPE_CHECKING:
    from builder.artifact import Manifest
    from builder.context import BuildContext

NAME: str = "onnx"
STAGE: str = "export"
RUNNER: Runner = "onnxruntime"
LIBRARY: str = "onnx"
VERSIONED: tuple[str, ...] = (
    "torch",
    "transformers",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-genai",
    "onnxruntime-genai-cuda",
    "optimum",
    "optimum-onnx",
)
REQUIRED: tuple[str, ...] = ("torch", "transformers", "onnx")
GATES: tuple[str, ...] = ()
_WEIGHT_ONLY = ("int4", "nf4", "fp4")


def scheme(recipe: Recipe) -> str:
    """ "onnx-<quantize>" for a quantized graph, else "onnx-<dtype>"."""
    assert recipe.export is not None
    quantize = recipe.export.quantize
    return f"onnx-{quantize}" if quantize != "none" else f"onnx-{recipe.export.dtype}"


def default_thresholds(expected_footprint: float | None) -> dict[str, float]:
    return {}


def refusal(task: str, config: dict) -> str | None:
    return None


def expected_footprint(recipe: Recipe, tensors: tuple[TensorInfo, ...], config: dict) -> float | None:
    return None  # onnxruntime's session memory is not what the gate measures


def expected_artifact_bytes(recipe: Recipe, tensors: tuple[TensorInfo, ...]) -> int:
    export = recipe.export
    assert export is not None
    if export.quantize in _WEIGHT_ONLY:
        # 4 bits and one float scale (plus a 4-bit zero point for int4) per block of each MatMul weight;
        # embeddings and 1-D tensors stay float32
        block = export.block_size or (32 if export.quantize == "int4" else 64)
        per_weight = 0.5 + (4.5 if export.quantize == "int4" else 4) / block
        # onnxruntime-genai's model builder quantizes the embedding table too (GatherBlockQuantized)
        genai = export.exporter == "genai"
        return int(
            sum(
                t.numel * (per_weight if len(t.shape) == 2 and (genai or not EMBEDDING_NAMES.search(t.name)) else 4)
                for t in tensors
            )
        )
    if export.quantize == "int8":  # 8 bits, one float scale and a zero point per block (genai exporter)
        block = export.block_size or 32
        return int(sum(t.numel * ((1 + 5 / block) if len(t.shape) == 2 else 4) for t in tensors))
    per_element = 1 if export.quantize == "dynamic-int8" else (4 if export.dtype == "float32" else 2)
    return sum(t.numel for t in tensors) * per_element


def describe(recipe: Recipe, loaded_bytes: int, artifact_bytes: int) -> tuple[str, int, str]:
    export = recipe.export
    assert export is not None
    what = [
        f"load the source as {recipe.source.dtype}, export to ONNX (opset {export.opset}, {export.dtype}, "
        f"exporter {export.exporter})"
    ]
    if export.exporter == "genai":  # the model builder loads, exports and quantizes in one subprocess
        what = [
            f"onnxruntime-genai's model builder in a subprocess ({export.dtype}"
            f"{', ' + export.quantize if export.quantize != 'none' else ''}, {export.provider}): fused attention "
            "with the KV cache, genai_config.json"
        ]
    peak = loaded_bytes * 2
    if export.optimize != "none":
        what.append(f"onnxruntime transformer optimizer {export.optimize}")
        peak = max(peak, artifact_bytes * 2)
    if export.quantize != "none" and export.exporter != "genai":
        what.append("onnxruntime dynamic int8 quantization")
        peak = max(peak, artifact_bytes * 5)
    return "; ".join(what), peak, f"compare with the PyTorch source on {export.verify_on or export.provider}"


def build(ctx: BuildContext) -> None:
    from builder.steps.export import export  # deferred: torch and onnx, only when a build runs

    export(ctx)


def verify(ctx: BuildContext) -> dict:
    from builder.steps.verify_onnx import onnx_report  # deferred: torch and onnxruntime

    assert ctx.onnx is not None and ctx.source_dir is not None  # set by export and resolve
    return onnx_report(ctx.loaded.recipe, ctx.onnx, ctx.workdir, ctx.source_dir, ctx.device)


def reverify(
    manifest: Manifest, recipe: Recipe, artifact_dir: Path, source_dir: Path, device: str, **options: Any
) -> dict:
    from builder.steps.verify_onnx import onnx_report  # deferred: torch and onnxruntime

    if manifest.onnx is None:
        raise BuildError(f"{artifact_dir}/manifest.json has no `onnx` record of the export; rebuild the artifact")
    return onnx_report(recipe, manifest.onnx, artifact_dir, source_dir, device)


def card_tags(block: dict) -> list[str]:
    tags = ["onnx", block["provider"]]
    if block.get("quantize") == "dynamic-int8":
        tags.append("int8")
    elif block.get("quantize") in _WEIGHT_ONLY:
        tags += ["4-bit", block["quantize"]]
    return tags


def card_summary(block: dict) -> str:
    return (
        f"ONNX (opset {block['opset']}, {block['dtype']}, optimize {block['optimize']}, "
        f"quantize {block['quantize']}) for {block['provider']}"
    )


def quantized(block: dict) -> bool:
    # A float32 ONNX export holds the source's weights unchanged: a conversion, not a quantization.
    return block.get("quantize") not in (None, "none") or block.get("dtype") == "float16"
