"""What a build kind is: the `BuildKind` protocol every module of `builder.kinds` satisfies, the threshold policy
they share, and the helpers of the two bitsandbytes kinds (`bnb_*`, as pre-commit's `lang_base` holds `basic_*`).

A kind owns what a build of it does and expects: its build stage (the step, what `builder plan` says of it, the
packages whose versions change its bytes), the artifact's expected size and footprint, its share of the gate (which
runner compares the artifact, the scheme its task family's default bounds are keyed by, gates of its own such as
the footprint), how the gate runs for it, and the card's tags and summary.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from builder.checkpoint import DTYPE_BYTES, FLOAT_DTYPES, TORCH_DTYPE_BYTES, TensorInfo
from builder.errors import BuildError
from builder.gates import GATES
from builder.modules import is_quantizable, left_alone_by_bnb
from builder.recipe import Bnb4Bit, Recipe
from builder.steps import torch_defaults
from builder.tasks import family
from builder.tasks.base import Runner

if TYPE_CHECKING:
    from builder.artifact import Manifest
    from builder.context import BuildContext


class BuildKind(Protocol):
    """One kind of build (a module of `builder.kinds`, registered in `builder.kinds.KINDS` under the name the recipe
    gives it: `quantize.method` or `export.format`)."""

    NAME: str
    STAGE: str
    """The build stage that makes the artifact ("quantize", "export"): `builder plan`'s step and the manifest's
    `kind`."""
    RUNNER: Runner
    """How the gate runs the artifact."""
    LIBRARY: str
    """The card's `library_name`: what loads the artifact."""
    VERSIONED: tuple[str, ...]
    """Packages whose version can change the artifact's bytes (they go into the build hash)."""
    REQUIRED: tuple[str, ...]
    """The packages a build cannot run without."""
    GATES: tuple[str, ...]
    """The kind's own gates, besides its task family's (`builder.gates` keys)."""

    def scheme(self, recipe: Recipe) -> str:
        """The key of the task families' default bounds for this recipe ("bnb-nf4", "onnx-float16", ...)."""
        ...

    def default_thresholds(self, expected_footprint: float | None) -> dict[str, float]:
        """The default bounds of the kind's own gates."""
        ...

    def refusal(self, task: str, config: dict) -> str | None:
        """Why the gate cannot verify this kind of build of a model with `task` and config.json, or None."""
        ...

    def expected_footprint(self, recipe: Recipe, tensors: tuple[TensorInfo, ...], config: dict) -> float | None:
        """The artifact's loaded memory over the source's that the build should give (None: not predicted)."""
        ...

    def expected_artifact_bytes(self, recipe: Recipe, tensors: tuple[TensorInfo, ...]) -> int: ...

    def describe(self, recipe: Recipe, loaded_bytes: int, artifact_bytes: int) -> tuple[str, int, str]:
        """What `builder plan` says of the build stage: (what it does, its peak memory, what the gate does)."""
        ...

    def build(self, ctx: BuildContext) -> None:
        """The build stage: write the artifact into `ctx.workdir` and record what it measured in `ctx`."""
        ...

    def verify(self, ctx: BuildContext) -> dict:
        """The gate's report of the artifact in `ctx.workdir`."""
        ...

    def reverify(
        self, manifest: Manifest, recipe: Recipe, artifact_dir: Path, source_dir: Path, device: str, **options: Any
    ) -> dict:
        """The gate's report of an existing artifact (`builder verify`)."""
        ...

    def card_tags(self, block: dict) -> list[str]:
        """The Hub tags of an artifact whose recipe block (`quantize` or `export`, as JSON) is `block`."""
        ...

    def card_summary(self, block: dict) -> str:
        """What was done, in a few words ("bitsandbytes 4-bit (nf4, double quantization)")."""
        ...

    def quantized(self, block: dict) -> bool:
        """Whether the artifact's weights differ from the source's (the card's `base_model_relation`)."""
        ...


def thresholds(kind: BuildKind, recipe: Recipe, task: str, expected_footprint: float | None) -> dict[str, float]:
    """The gate's bounds for a `kind` build of `recipe` for `task`: its task family's defaults under the kind's
    scheme and the kind's own, then the recipe's `verify.thresholds`; a threshold the gate has no metric for is
    refused."""
    tasks = family(task)
    try:
        defaults = tasks.default_thresholds(kind.scheme(recipe), task)
    except KeyError:
        raise BuildError(
            f"{recipe.name}: the {tasks.NAME} gate has no default thresholds for {kind.scheme(recipe)} builds; "
            "see docs/support.md for what builder builds"
        ) from None
    applicable = [key for key in (*tasks.gates(kind.RUNNER, task), *kind.GATES) if GATES[key].recipe]
    what = f"a {task} model" if kind.RUNNER == "transformers" else f"an ONNX export of a {task} model"
    return with_overrides(defaults | kind.default_thresholds(expected_footprint), recipe, applicable, what)


def with_overrides(
    defaults: dict[str, float], recipe: Recipe, applicable: Iterable[str], what: str
) -> dict[str, float]:
    """`defaults` with the recipe's `verify.thresholds` written over them; a threshold outside `applicable` (the
    gates of `what` is being verified) is refused."""
    applicable = tuple(applicable)
    merged = dict(defaults)
    for key, value in recipe.verify.thresholds.model_dump(exclude_none=True).items():
        if key not in applicable:
            raise BuildError(
                f"verify.thresholds.{key} does not apply to {what} (its gates: "
                f"{', '.join(applicable)}); remove it from the recipe"
            )
        merged[key] = value
    return merged


# --- the bitsandbytes kinds -------------------------------------------------------------------------------------

BNB_VERSIONED = ("torch", "transformers", "accelerate", "bitsandbytes")
BNB_REQUIRED = ("torch", "transformers", "bitsandbytes")
FOOTPRINT_MARGIN = 0.05
UNKNOWN_FOOTPRINT_BOUND = 0.99
"""The footprint bound when the expected ratio is unknown (no safetensors headers): the artifact must have shrunk."""


def footprint_threshold(expected: float | None) -> float:
    """The gate's default `footprint_ratio`: the expected ratio plus FOOTPRINT_MARGIN, but never past halfway to
    1.0, the ratio of a build that quantized nothing (a model that is mostly embeddings expects ~0.98)."""
    if expected is None:
        return UNKNOWN_FOOTPRINT_BOUND
    return round(min(expected + FOOTPRINT_MARGIN, (expected + 1) / 2), 4)


def bnb_default_thresholds(expected_footprint: float | None) -> dict[str, float]:
    return {"footprint_ratio": footprint_threshold(expected_footprint)}


def bnb_refusal(task: str, config: dict) -> str | None:
    if config.get("is_encoder_decoder"):
        return (
            f"{config.get('model_type', 'this model')} is an encoder-decoder model: the bitsandbytes gate probes "
            "decoder-only LMs (text-generation) and encoders (their last hidden state), and its forward needs "
            "decoder inputs, so this build cannot be verified"
        )
    return None


def load_dtype(recipe: Recipe, config: dict, tensors: tuple[TensorInfo, ...]) -> str | None:
    """The dtype from_pretrained loads the source in: `source.dtype`, or for `auto` config.json's, else the first
    floating checkpoint tensor's (None when none is known)."""
    if recipe.source.dtype != "auto":
        return recipe.source.dtype
    found = config.get("dtype") or config.get("torch_dtype")
    if isinstance(found, str):
        return found.removeprefix("torch.")
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    return next((names[t.dtype] for t in tensors if t.dtype in names), None)


def bnb_expected_footprint(recipe: Recipe, tensors: tuple[TensorInfo, ...], config: dict, bits: int) -> float | None:
    """The memory of the quantized model over the source's, both loaded (what the gate's `footprint_ratio`
    measures with get_memory_footprint): quantizable Linear weights at `bits`, everything else in the load dtype.
    None for a source without safetensors headers."""
    quantize = recipe.quantize
    if quantize is None or not tensors:
        return None
    loaded = TORCH_DTYPE_BYTES.get(load_dtype(recipe, config, tensors) or "")
    source = artifact = 0.0
    for tensor in tensors:
        size = tensor.numel * loaded if loaded and tensor.dtype in FLOAT_DTYPES else tensor.nbytes
        source += size
        if not is_quantizable(tensor, quantize.skip_modules) or left_alone_by_bnb(tensor, config):
            artifact += size
        else:
            artifact += tensor.numel * bits / 8
    return round(artifact / source, 4) if source else None


def bnb_expected_artifact_bytes(recipe: Recipe, tensors: tuple[TensorInfo, ...]) -> int:
    quantize = recipe.quantize
    assert quantize is not None
    total = 0.0
    for tensor in tensors:
        if not is_quantizable(tensor, quantize.skip_modules):
            total += tensor.numel * TORCH_DTYPE_BYTES.get(recipe.source.dtype, DTYPE_BYTES.get(tensor.dtype, 4))
        elif isinstance(quantize, Bnb4Bit):
            # 4 bits a weight, plus one absmax per block (fp32, or uint8 + fp32 per 256 blocks with double quant)
            blocks = tensor.numel / quantize.blocksize
            scales = blocks * (1 + 4 / 256) if quantize.double_quant else blocks * 4
            total += tensor.numel / 2 + scales
        else:
            total += tensor.numel + tensor.shape[0] * 4  # int8 weights + one fp32 scale per row
    return int(total)


def bnb_describe(recipe: Recipe, loaded_bytes: int, artifact_bytes: int) -> tuple[str, int, str]:
    assert recipe.quantize is not None
    what = [
        f"quantize ({recipe.quantize.method}): streamed tensor by tensor when transformers' module selection allows "
        "it, else loaded and quantized by transformers",
        "write safetensors, config, tokenizer, generation config",
    ]
    if recipe.quantize.dequantize:
        what.append("write a dequantized checkpoint")
    return (
        "; ".join(what),
        loaded_bytes + artifact_bytes,
        "reload the artifact with stock transformers and compare with the source",
    )


def bnb_build(ctx: BuildContext) -> None:
    from builder.steps.quantize import quantize  # deferred: torch and transformers, only when a build runs
    from builder.steps.verify import start_candidate, start_reference

    # The gate's runs start now: the reference computes (a run on this process's threads loads once this step is
    # done: `torch_defaults`), the candidate's imports its modeling code, while this quantizes.
    ctx.reference, ctx.candidate = start_reference(ctx), start_candidate(ctx)
    with torch_defaults.exclusive():
        quantize(ctx)


def bnb_verify(ctx: BuildContext) -> dict:
    from builder.steps.verify import run_checks, start_reference  # deferred: torch and transformers

    assert ctx.source_dir is not None  # set by resolve
    return run_checks(
        ctx.loaded.recipe,
        ctx.plan.task,
        ctx.source_dir,
        ctx.workdir,
        ctx.device,
        reference=ctx.reference or start_reference(ctx),
        candidate=ctx.candidate,
        max_device_memory=ctx.max_gpu_memory,
        expected_footprint=ctx.plan.expected_footprint_ratio,
    )


def bnb_reverify(
    manifest: Manifest, recipe: Recipe, artifact_dir: Path, source_dir: Path, device: str, **options: Any
) -> dict:
    from builder.steps.verify import run_checks  # deferred: torch and transformers

    assert manifest.source.task is not None
    return run_checks(
        recipe,
        manifest.source.task,
        source_dir,
        artifact_dir,
        device,
        revision=manifest.source.revision,
        use_cache=options.get("use_cache", True),
        max_device_memory=options.get("max_gpu_memory"),
        expected_footprint=manifest.footprint.expected_ratio if manifest.footprint else None,
    )
