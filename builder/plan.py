"""What a build would do, decided before anything heavy runs: the build hash, the steps and a preflight.

The preflight reads config.json and the safetensors headers only, so `builder plan` runs on a laptop with the
core install and tells you parameter count, expected artifact size and peak memory per stage.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata

from builder.card import inherited_license_problem
from builder.checkpoint import DTYPE_BYTES, FLOAT_DTYPES, TORCH_DTYPE_BYTES, TensorInfo
from builder.errors import RecipeError, SourceError
from builder.modules import EMBEDDING_NAMES, is_quantizable, left_alone_by_bnb, unmatched_skip_modules
from builder.recipe import Bnb4Bit, LoadedRecipe, Recipe
from builder.source import ResolvedSource, resolve
from builder.tasks import family_of, infer_task, unsupported

DISTRIBUTION = "recipe-builder"
"""This package's distribution name (pyproject's `name`); it is recorded as `builder` in manifests."""

# Packages whose version can change an artifact's bytes, per kind of build.
_VERSIONED = {
    "quantize": ("torch", "transformers", "accelerate", "bitsandbytes"),
    "export": (
        "torch",
        "transformers",
        "onnx",
        "onnxscript",
        "onnxruntime",
        "onnxruntime-gpu",
        "optimum",
        "optimum-onnx",
    ),
}
# The packages a build cannot run without (the others in `_VERSIONED` are alternatives: onnxruntime or -gpu).
_BUILDS_WITH = {"quantize": ("torch", "transformers", "bitsandbytes"), "export": ("torch", "transformers", "onnx")}


def package_versions(kind: str) -> dict[str, str]:
    """Installed versions of the packages that matter for `kind` (quantize/export), plus builder's own."""
    versions = {"builder": _version(DISTRIBUTION)}
    for name in _VERSIONED[kind]:
        if (found := _version(name)) != "not installed":
            versions[name] = found
    return versions


def recorded_versions(kind: str, versions: dict[str, str]) -> dict[str, str]:
    """The part of a manifest's `versions` that went into its build hash (builder's and `kind`'s byte-relevant
    packages; the manifest also records others for information)."""
    return {name: version for name, version in versions.items() if name == "builder" or name in _VERSIONED[kind]}


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def build_kind(recipe: Recipe) -> str:
    return "export" if recipe.export is not None else "quantize"


def build_hash(recipe: Recipe, source_revision: str, versions: dict[str, str]) -> str:
    """sha256 of the canonical resolved recipe, the pinned source revision and the versions that change bytes.
    `publish` and `source.base_model` are left out: where an artifact goes and which model its card names do not
    change what it is."""
    content = recipe.model_dump(mode="json", exclude={"publish": True, "source": {"base_model"}})
    canonical = json.dumps(
        {"recipe": content, "source": source_revision, "versions": versions}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Stage:
    name: str
    description: str
    peak_memory_bytes: int | None = None


@dataclass
class Plan:
    loaded: LoadedRecipe
    source: ResolvedSource
    task: str
    """The recipe's `source.task`, or the one config.json's `architectures` implies."""
    versions: dict[str, str]
    stages: list[Stage]
    parameter_count: int
    source_bytes: int
    expected_artifact_bytes: int
    expected_footprint_ratio: float | None = None
    """The loaded artifact's memory over the source's that the quantization should give (None for exports)."""
    warnings: list[str] = field(default_factory=list)

    @functools.cached_property
    def build_hash(self) -> str:
        """`build_hash` of the recipe, source and versions (waits for the source's digest: `ResolvedSource.pin`)."""
        return build_hash(self.loaded.recipe, self.source.revision, self.versions)

    def as_json(self) -> dict:
        recipe = self.loaded.recipe
        return {
            "name": recipe.name,
            "recipe_file": str(self.loaded.path),
            "variant": self.loaded.variant,
            "recipe": recipe.model_dump(mode="json"),
            "build_hash": self.build_hash,
            "source": {"model": recipe.source.model, "revision": self.source.revision, "task": self.task},
            "versions": self.versions,
            "parameter_count": self.parameter_count,
            "source_bytes": self.source_bytes,
            "expected_artifact_bytes": self.expected_artifact_bytes,
            "expected_footprint_ratio": self.expected_footprint_ratio,
            "stages": [
                {"name": s.name, "description": s.description, "peak_memory_bytes": s.peak_memory_bytes}
                for s in self.stages
            ],
            "warnings": self.warnings,
        }


def make_plan(loaded: LoadedRecipe) -> Plan:
    """Resolve the source (metadata only), check skip_modules against it and estimate sizes and memory."""
    recipe = loaded.recipe
    source = resolve(recipe.source, loaded.source_path)
    task = recipe.source.task or infer_task(source.config.get("architectures"))
    if task is None:
        raise SourceError(
            f"cannot infer the task of {recipe.source.model} from config.json's `architectures`; set "
            "`source.task` in the recipe (e.g. text-generation)"
        )
    if family_of(task) is None:
        raise SourceError(f"{recipe.name}: {unsupported(task)}; see docs/support.md for what builder builds")
    if build_kind(recipe) == "quantize" and source.config.get("is_encoder_decoder"):
        raise SourceError(
            f"{recipe.name}: {source.config.get('model_type', 'this model')} is an encoder-decoder model: the "
            "bitsandbytes gate probes decoder-only LMs (text-generation) and encoders (their last hidden state), "
            "and its forward needs decoder inputs, so this build cannot be verified; see docs/support.md for "
            "what builder builds"
        )
    _check_skip_modules(recipe, source)
    if (problem := inherited_license_problem(loaded)) is not None:
        raise RecipeError([problem])
    versions = package_versions(build_kind(recipe))
    source_bytes = sum(t.nbytes for t in source.tensors)
    loaded_bytes = sum(t.numel * _loaded_bytes(t, recipe) for t in source.tensors)
    artifact = _expected_artifact_bytes(recipe, source.tensors)
    warnings = []
    if recipe.publish is not None and not recipe.source.pinned:
        warnings.append(
            f"source.revision {recipe.source.revision or 'main'!r} is not a 40-hex commit: the build "
            "records the commit it resolved, but `builder publish` will refuse until you pin it"
        )
    if (mismatch := compute_dtype_warning(recipe, source.config, source.tensors)) is not None:
        warnings.append(mismatch)
    if missing := [name for name in _BUILDS_WITH[build_kind(recipe)] if name not in versions]:
        warnings.append(
            f"{', '.join(missing)} not installed here: this environment cannot build the recipe, and its "
            "build hash differs from one made where they are; `builder list` compares artifacts by the "
            "versions their manifests record"
        )
    stages = _stages(recipe, loaded_bytes, artifact)
    return Plan(
        loaded,
        source,
        task,
        versions,
        stages,
        source.parameter_count,
        source_bytes,
        artifact,
        expected_footprint_ratio(recipe, source.tensors, source.config),
        warnings,
    )


def _check_skip_modules(recipe: Recipe, source: ResolvedSource) -> None:
    unmatched = unmatched_skip_modules(recipe, source.tensors, source.config)
    if unmatched:
        raise SourceError("; ".join(f"quantize.skip_modules: {message}" for _, message in unmatched))


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


def compute_dtype_warning(recipe: Recipe, config: dict, tensors: tuple[TensorInfo, ...]) -> str | None:
    """A warning when a 4-bit recipe's `compute_dtype` is not the dtype the model loads in: the matmuls then cast
    every activation (float32 compute on a bfloat16 model is slower and no more accurate than its weights)."""
    quantize = recipe.quantize
    loaded = load_dtype(recipe, config, tensors)
    if not isinstance(quantize, Bnb4Bit) or loaded is None or quantize.compute_dtype == loaded:
        return None
    return (
        f"quantize.compute_dtype is {quantize.compute_dtype} but the model loads in {loaded} "
        f"({'source.dtype' if recipe.source.dtype != 'auto' else 'config.json'}): the 4-bit matmuls cast "
        f"every activation; set `quantize.compute_dtype: {loaded}` unless you want {quantize.compute_dtype} "
        "matmuls"
    )


def expected_footprint_ratio(recipe: Recipe, tensors: tuple[TensorInfo, ...], config: dict) -> float | None:
    """The memory of the quantized model over the source's, both loaded (what the gate's `footprint_ratio`
    measures with get_memory_footprint): quantizable Linear weights at 4 or 8 bits, everything else in the load
    dtype. None for an export or a source without safetensors headers."""
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
            artifact += tensor.numel / 2 if isinstance(quantize, Bnb4Bit) else tensor.numel
    return round(artifact / source, 4) if source else None


FOOTPRINT_MARGIN = 0.05
UNKNOWN_FOOTPRINT_BOUND = 0.99
"""The footprint bound when the expected ratio is unknown (no safetensors headers): the artifact must have shrunk."""


def footprint_threshold(expected: float | None) -> float:
    """The gate's default `footprint_ratio`: the expected ratio plus FOOTPRINT_MARGIN, but never past halfway to
    1.0, the ratio of a build that quantized nothing (a model that is mostly embeddings expects ~0.98)."""
    if expected is None:
        return UNKNOWN_FOOTPRINT_BOUND
    return round(min(expected + FOOTPRINT_MARGIN, (expected + 1) / 2), 4)


def _loaded_bytes(tensor: TensorInfo, recipe: Recipe) -> int:
    dtype = recipe.source.dtype
    return TORCH_DTYPE_BYTES.get(dtype, DTYPE_BYTES.get(tensor.dtype, 4))


def _expected_artifact_bytes(recipe: Recipe, tensors: tuple[TensorInfo, ...]) -> int:
    quantize = recipe.quantize
    if recipe.export is not None:
        if recipe.export.quantize in ("int4", "nf4", "fp4"):
            # 4 bits and one float scale (plus a 4-bit zero point for int4) per block of each MatMul weight;
            # embeddings and 1-D tensors stay float32
            block = recipe.export.block_size or (32 if recipe.export.quantize == "int4" else 64)
            per_weight = 0.5 + (4.5 if recipe.export.quantize == "int4" else 4) / block
            return int(
                sum(
                    t.numel * (per_weight if len(t.shape) == 2 and not EMBEDDING_NAMES.search(t.name) else 4)
                    for t in tensors
                )
            )
        per_element = 1 if recipe.export.quantize == "dynamic-int8" else (2 if recipe.export.dtype == "float16" else 4)
        return sum(t.numel for t in tensors) * per_element
    total = 0.0
    for tensor in tensors:
        if quantize is None or not is_quantizable(tensor, quantize.skip_modules):
            total += tensor.numel * _loaded_bytes(tensor, recipe)
        elif isinstance(quantize, Bnb4Bit):
            # 4 bits a weight, plus one absmax per 64-block (fp32, or uint8 + fp32 per 256 blocks with double quant)
            scales = tensor.numel / 64 * (1 + 4 / 256) if quantize.double_quant else tensor.numel / 64 * 4
            total += tensor.numel / 2 + scales
        else:
            total += tensor.numel + tensor.shape[0] * 4  # int8 weights + one fp32 scale per row
    return int(total)


def build_stages(recipe: Recipe) -> tuple[str, ...]:
    """The stages of a build, in order: what `builder plan` lists and `builder build` counts ([1/4] ...)."""
    return ("resolve", build_kind(recipe), "verify", "write")


def _stages(recipe: Recipe, loaded_bytes: int, artifact_bytes: int) -> list[Stage]:
    """`build_stages` with what each does and the peak memory it needs."""
    described = {
        "resolve": Stage("resolve", "pin the source (commit sha or content digest) and read its config"),
        "write": Stage("write", "manifest.json, recipe.lock.yaml, verify-report.json, README.md; then rename"),
    }
    if recipe.export is not None:
        export = recipe.export
        what = [
            f"load the source as {recipe.source.dtype}, export to ONNX (opset {export.opset}, {export.dtype}, "
            f"exporter {export.exporter})"
        ]
        peak = loaded_bytes * 2
        if export.optimize != "none":
            what.append(f"onnxruntime transformer optimizer {export.optimize}")
            peak = max(peak, artifact_bytes * 2)
        if export.quantize != "none":
            what.append("onnxruntime dynamic int8 quantization")
            peak = max(peak, artifact_bytes * 5)
        described["export"] = Stage("export", "; ".join(what), peak)
        verify_on = export.verify_on or export.provider
        described["verify"] = Stage(
            "verify", f"compare with the PyTorch source on {verify_on}", loaded_bytes + artifact_bytes
        )
    else:
        method = recipe.quantize.method if recipe.quantize else "none"
        what = [
            f"quantize ({method}): streamed tensor by tensor when transformers' module selection allows it, else "
            "loaded and quantized by transformers",
            "write safetensors, config, tokenizer, generation config",
        ]
        if recipe.quantize is not None and recipe.quantize.dequantize:
            what.append("write a dequantized checkpoint")
        described["quantize"] = Stage("quantize", "; ".join(what), loaded_bytes + artifact_bytes)
        described["verify"] = Stage(
            "verify",
            "reload the artifact with stock transformers and compare with the source",
            loaded_bytes + artifact_bytes,
        )
    return [described[name] for name in build_stages(recipe)]
