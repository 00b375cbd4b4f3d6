"""What a build would do, decided before anything heavy runs: the build hash, the steps and a preflight.

The preflight reads config.json and the safetensors headers only, so `builder plan` runs on a laptop with the
core install and tells you parameter count, expected artifact size and peak memory per stage.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import metadata

from builder.checkpoint import DTYPE_BYTES, TORCH_DTYPE_BYTES, TensorInfo
from builder.errors import SourceError
from builder.recipe import Bnb4Bit, Bnb8Bit, LoadedRecipe, Recipe
from builder.source import ResolvedSource, resolve

DISTRIBUTION = "recipe-builder"
"""This package's distribution name (pyproject's `name`); it is recorded as `builder` in manifests."""

# Packages whose version can change an artifact's bytes, per kind of build.
_VERSIONED = {
    "quantize": ("torch", "transformers", "accelerate", "bitsandbytes"),
    "export": ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "optimum",
               "optimum-onnx"),
}
# The packages a build cannot run without (the others in `_VERSIONED` are alternatives: onnxruntime or -gpu).
_BUILDS_WITH = {"quantize": ("torch", "transformers", "bitsandbytes"), "export": ("torch", "transformers", "onnx")}
_EMBEDDING_NAMES = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|shared)")


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
    canonical = json.dumps({"recipe": content, "source": source_revision, "versions": versions},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def skip_module_matches(module: str, pattern: str) -> bool:
    """transformers' rule (quantizers_utils.should_convert_module): a prefix up to a module boundary, a regex
    with the same boundary, or a suffix of the module's full name."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    try:
        return bool(re.match(rf"(?:{pattern}){boundary}", module)) or module.endswith(pattern)
    except re.error:
        return module.endswith(pattern)


def module_names(tensors: tuple[TensorInfo, ...]) -> list[str]:
    """Every module path implied by the tensor names (`a.b.weight` -> `a`, `a.b`)."""
    names: set[str] = set()
    for tensor in tensors:
        parts = tensor.name.split(".")[:-1]
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(names)


@dataclass
class Stage:
    name: str
    description: str
    peak_memory_bytes: int | None = None


@dataclass
class Plan:
    loaded: LoadedRecipe
    source: ResolvedSource
    build_hash: str
    versions: dict[str, str]
    stages: list[Stage]
    parameter_count: int
    source_bytes: int
    expected_artifact_bytes: int
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        recipe = self.loaded.recipe
        return {
            "name": recipe.name,
            "recipe_file": str(self.loaded.path),
            "variant": self.loaded.variant,
            "recipe": recipe.model_dump(mode="json"),
            "build_hash": self.build_hash,
            "source": {"model": recipe.source.model, "revision": self.source.revision},
            "versions": self.versions,
            "parameter_count": self.parameter_count,
            "source_bytes": self.source_bytes,
            "expected_artifact_bytes": self.expected_artifact_bytes,
            "stages": [{"name": s.name, "description": s.description, "peak_memory_bytes": s.peak_memory_bytes}
                       for s in self.stages],
            "warnings": self.warnings,
        }


def make_plan(loaded: LoadedRecipe) -> Plan:
    """Resolve the source (metadata only), check skip_modules against it and estimate sizes and memory."""
    recipe = loaded.recipe
    source = resolve(recipe.source, loaded.source_path)
    _check_skip_modules(recipe, source)
    versions = package_versions(build_kind(recipe))
    source_bytes = sum(t.nbytes for t in source.tensors)
    loaded_bytes = sum(t.numel * _loaded_bytes(t, recipe) for t in source.tensors)
    artifact = _expected_artifact_bytes(recipe, source.tensors)
    warnings = []
    if recipe.publish is not None and not recipe.source.pinned:
        warnings.append(f"source.revision {recipe.source.revision or 'main'!r} is not a 40-hex commit: the build "
                        "records the commit it resolved, but `builder publish` will refuse until you pin it")
    if missing := [name for name in _BUILDS_WITH[build_kind(recipe)] if name not in versions]:
        warnings.append(f"{', '.join(missing)} not installed here: this environment cannot build the recipe, and its "
                        "build hash differs from one made where they are; `builder list` compares artifacts by the "
                        "versions their manifests record")
    stages = _stages(recipe, loaded_bytes, artifact)
    return Plan(loaded, source, build_hash(recipe, source.revision, versions), versions, stages,
                source.parameter_count, source_bytes, artifact, warnings)


def _check_skip_modules(recipe: Recipe, source: ResolvedSource) -> None:
    if not isinstance(recipe.quantize, (Bnb4Bit, Bnb8Bit)) or not source.tensors:
        return
    modules = module_names(source.tensors) + _tied_heads(source.config)
    unmatched = [p for p in recipe.quantize.skip_modules if not any(skip_module_matches(m, p) for m in modules)]
    if unmatched:
        example = ", ".join(m for m in modules if m.count(".") <= 1)[:200]
        raise SourceError(f"quantize.skip_modules: {', '.join(map(repr, unmatched))} match no module of "
                          f"{recipe.source.model} (modules include: {example}, ...); use a module name or suffix "
                          "such as lm_head or mlp.down_proj")


def _tied_heads(config: dict) -> list[str]:
    """An output head tied to the input embeddings is a module of the model but has no tensor in the checkpoint."""
    heads = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM")
    tied = config.get("tie_word_embeddings", True) is not False
    return ["lm_head"] if tied and any(a.endswith(heads) for a in config.get("architectures") or ()) else []


def _loaded_bytes(tensor: TensorInfo, recipe: Recipe) -> int:
    dtype = recipe.source.dtype
    return TORCH_DTYPE_BYTES.get(dtype, DTYPE_BYTES.get(tensor.dtype, 4))


def is_quantizable(tensor: TensorInfo, skip_modules: tuple[str, ...]) -> bool:
    """Estimate of what bnb replaces: 2-D `.weight`s of linear layers, not embeddings, lm_head or skipped modules."""
    if len(tensor.shape) != 2 or not tensor.name.endswith(".weight") or _EMBEDDING_NAMES.search(tensor.name):
        return False
    module = tensor.name[: -len(".weight")]
    patterns = skip_modules or ("lm_head",)
    return not any(skip_module_matches(module, p) for p in patterns)


def _expected_artifact_bytes(recipe: Recipe, tensors: tuple[TensorInfo, ...]) -> int:
    quantize = recipe.quantize
    if recipe.export is not None:
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
    described = {"resolve": Stage("resolve", "pin the source (commit sha or content digest) and read its config"),
                 "write": Stage("write", "manifest.json, recipe.lock.yaml, verify-report.json, README.md; then rename")}
    if recipe.export is not None:
        export = recipe.export
        what = [f"load the source as {recipe.source.dtype}, export to ONNX (opset {export.opset}, {export.dtype}, "
                f"exporter {export.exporter})"]
        peak = loaded_bytes * 2
        if export.optimize != "none":
            what.append(f"onnxruntime transformer optimizer {export.optimize}")
            peak = max(peak, artifact_bytes * 2)
        if export.quantize != "none":
            what.append("onnxruntime dynamic int8 quantization")
            peak = max(peak, artifact_bytes * 5)
        described["export"] = Stage("export", "; ".join(what), peak)
        verify_on = export.verify_on or export.provider
        described["verify"] = Stage("verify", f"compare with the PyTorch source on {verify_on}",
                                    loaded_bytes + artifact_bytes)
    else:
        method = recipe.quantize.method if recipe.quantize else "none"
        what = [f"quantize ({method}): streamed tensor by tensor when transformers' module selection allows it, else "
                "loaded and quantized by transformers", "write safetensors, config, tokenizer, generation config"]
        if recipe.quantize is not None and recipe.quantize.dequantize:
            what.append("write a dequantized checkpoint")
        described["quantize"] = Stage("quantize", "; ".join(what), loaded_bytes + artifact_bytes)
        described["verify"] = Stage("verify", "reload the artifact in a fresh process and compare with the source",
                                    loaded_bytes + artifact_bytes)
    return [described[name] for name in build_stages(recipe)]

