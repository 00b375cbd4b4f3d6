"""What a build would do, decided before anything heavy runs: the build hash, the steps and a preflight (and
`validate`'s checks of a local source: `source_problems`).

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
from builder.checkpoint import DTYPE_BYTES, TORCH_DTYPE_BYTES, TensorInfo, local_weight_files, read_header
from builder.errors import Problem, RecipeError, SourceError
from builder.kinds import BuildKind, kind_of, thresholds
from builder.kinds.base import load_dtype
from builder.modules import unmatched_skip_modules
from builder.recipe import Bnb4Bit, LoadedRecipe, Recipe
from builder.source import ResolvedSource, resolve
from builder.steps.bnb import PACKED_ROWS, blocksize_problem, kept_layers
from builder.tasks import family_of, infer_task, unsupported

DISTRIBUTION = "recipe-builder"
"""This package's distribution name (pyproject's `name`); it is recorded as `builder` in manifests."""


def package_versions(kind: BuildKind) -> dict[str, str]:
    """Installed versions of the packages that can change the bytes of a `kind` build, plus builder's own."""
    versions = {"builder": _version(DISTRIBUTION)}
    for name in kind.VERSIONED:
        if (found := _version(name)) != "not installed":
            versions[name] = found
    return versions


def recorded_versions(kind: BuildKind, versions: dict[str, str]) -> dict[str, str]:
    """The part of a manifest's `versions` that went into its build hash (builder's and `kind`'s byte-relevant
    packages; the manifest also records others for information)."""
    return {name: version for name, version in versions.items() if name == "builder" or name in kind.VERSIONED}


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


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
    """The loaded artifact's memory over the source's that the build should give (its kind's
    `expected_footprint`; None where the kind predicts none, as for exports)."""
    warnings: list[str] = field(default_factory=list)

    @property
    def kind(self) -> BuildKind:
        """The recipe's build kind (`builder.kinds`)."""
        return kind_of(self.loaded.recipe)

    @functools.cached_property
    def thresholds(self) -> dict[str, float]:
        """The gate's bounds for this build: its task's and kind's defaults, then the recipe's overrides."""
        return thresholds(self.kind, self.loaded.recipe, self.task, self.expected_footprint_ratio)

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
    kind = kind_of(recipe)
    if family_of(task) is None:
        raise SourceError(f"{recipe.name}: {unsupported(task)}; see docs/support.md for what builder builds")
    if (refusal := kind.refusal(task, source.config)) is not None:
        raise SourceError(f"{recipe.name}: {refusal}; see docs/support.md for what builder builds")
    _check_skip_modules(recipe, source)
    if (problem := inherited_license_problem(loaded)) is not None:
        raise RecipeError([problem])
    if (message := blocksize_problem(recipe, source.tensors, source.config)) is not None:
        raise RecipeError([Problem(loaded.where(("quantize", "blocksize")), "quantize.blocksize", message)])
    versions = package_versions(kind)
    source_bytes = sum(t.nbytes for t in source.tensors)
    loaded_bytes = sum(t.numel * _loaded_bytes(t, recipe) for t in source.tensors)
    artifact = kind.expected_artifact_bytes(recipe, source.tensors)
    warnings = []
    if recipe.publish is not None and not recipe.source.pinned:
        warnings.append(
            f"source.revision {recipe.source.revision or 'main'!r} is not a 40-hex commit: the build "
            "records the commit it resolved, but `builder publish` will refuse until you pin it"
        )
    if (mismatch := compute_dtype_warning(recipe, source.config, source.tensors)) is not None:
        warnings.append(mismatch)
    if missing := [name for name in kind.REQUIRED if name not in versions]:
        warnings.append(
            f"{', '.join(missing)} not installed here: this environment cannot build the recipe, and its "
            "build hash differs from one made where they are; `builder list` compares artifacts by the "
            "versions their manifests record"
        )
    stages = _stages(kind, recipe, loaded_bytes, artifact)
    if isinstance(recipe.quantize, Bnb4Bit) and (kept := kept_layers(recipe.quantize, source.tensors, source.config)):
        next(stage for stage in stages if stage.name == "quantize").description += (
            f"; keep {', '.join(kept)} in full precision (output size not a multiple of {PACKED_ROWS}, which "
            "bitsandbytes' CPU 4-bit kernel needs)"
        )
    return Plan(
        loaded,
        source,
        task,
        versions,
        stages,
        source.parameter_count,
        source_bytes,
        artifact,
        kind.expected_footprint(recipe, source.tensors, source.config),
        warnings,
    )


def _check_skip_modules(recipe: Recipe, source: ResolvedSource) -> None:
    unmatched = unmatched_skip_modules(recipe, source.tensors, source.config)
    if unmatched:
        raise SourceError("; ".join(f"quantize.skip_modules: {message}" for _, message in unmatched))


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


def _loaded_bytes(tensor: TensorInfo, recipe: Recipe) -> int:
    dtype = recipe.source.dtype
    return TORCH_DTYPE_BYTES.get(dtype, DTYPE_BYTES.get(tensor.dtype, 4))


def build_stages(recipe: Recipe) -> tuple[str, ...]:
    """The stages of a build, in order: what `builder plan` lists and `builder build` counts ([1/4] ...)."""
    return ("resolve", kind_of(recipe).STAGE, "verify", "write")


def _stages(kind: BuildKind, recipe: Recipe, loaded_bytes: int, artifact_bytes: int) -> list[Stage]:
    """`build_stages` with what each does and the peak memory it needs (the kind says what its stage does)."""
    what, peak, verify = kind.describe(recipe, loaded_bytes, artifact_bytes)
    described = {
        "resolve": Stage("resolve", "pin the source (commit sha or content digest) and read its config"),
        kind.STAGE: Stage(kind.STAGE, what, peak),
        "verify": Stage("verify", verify, loaded_bytes + artifact_bytes),
        "write": Stage("write", "manifest.json, recipe.lock.yaml, verify-report.json, README.md; then rename"),
    }
    return [described[name] for name in build_stages(recipe)]


def source_problems(loaded: LoadedRecipe) -> list[Problem]:
    """What `validate` can check of a local source without torch, located in the recipe: the folder exists and
    is a model folder, its safetensors headers read, every `quantize.skip_modules` entry names a module, and the
    license the artifact's card would inherit from the folder's README.md is the Hub's."""
    import json

    folder = loaded.source_path
    if folder is None:
        return []  # a Hub source: checked by `plan`, which may reach the network
    where = loaded.where(("source", "model"))
    if not folder.is_dir():
        return [
            Problem(
                where,
                "source.model",
                f"source folder {folder} does not exist; check `source.model` "
                "(relative paths are relative to the recipe file)",
            )
        ]
    if not (folder / "config.json").is_file():
        return [
            Problem(
                where,
                "source.model",
                f"source folder {folder} has no config.json; point `source.model` at "
                "a Hugging Face model folder (the one save_pretrained writes)",
            )
        ]
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tensors = tuple(t for file in local_weight_files(folder) for t in read_header(file))
    except (SourceError, ValueError, OSError) as error:
        return [Problem(where, "source.model", str(error))]
    problems = [
        Problem(loaded.where(("quantize", "skip_modules", str(index))), f"quantize.skip_modules.{index}", message)
        for index, message in unmatched_skip_modules(loaded.recipe, tensors, config if isinstance(config, dict) else {})
    ]
    if (license_problem := inherited_license_problem(loaded)) is not None:
        problems.append(license_problem)
    return problems
