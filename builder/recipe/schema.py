"""The recipe schema (schema_version 1): one pydantic model per block, every field described.

A recipe file is YAML; `builder.recipe.loader` reads it with line marks, resolves `extends` and `variants`, and
validates the result against `Recipe`. The JSON Schema that editors use comes from these models.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    create_model,
    field_validator,
    model_validator,
)

from builder.gates import GATES
from builder.recipe.licenses import license_problem
from builder.recipe.wording import not_one_of, show
from builder.tasks import FAMILIES, TASKS

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,95}$"
COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}$")
# huggingface_hub's repo id rule (validate_repo_id): optional namespace, then a name; each of letters, digits, '-',
# '_', '.', at most 96, not starting or ending with '-' or '.'; and never '--', '..' or a '.git' ending.
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID_PATTERN = re.compile(rf"^(?:{_REPO_PART}/)?{_REPO_PART}$")
LOCAL_PREFIXES = ("./", "../", "/", "~")

Dtype = Literal["float32", "float16", "bfloat16", "auto"]
ComputeDtype = Literal["float32", "float16", "bfloat16"]
Provider = Literal[
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "MIGraphXExecutionProvider",
    "ROCMExecutionProvider",
]
GPU_PROVIDERS = (
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "MIGraphXExecutionProvider",
    "ROCMExecutionProvider",
)
# onnxruntime's weight-only 4-bit operators (MatMulNBits for int4, MatMulBnb4 for nf4/fp4) have CPU and CUDA
# kernels; TensorRT and MIGraphX do not take these contrib ops.
WEIGHT_ONLY = ("int4", "int8", "nf4", "fp4")
WEIGHT_ONLY_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")


class RuleViolation(ValueError):
    """A cross-field rule failed; `path` (relative to the model that checks it) locates the offending key."""

    def __init__(self, path: tuple[str, ...], message: str):
        super().__init__(message)
        self.path = path


class Block(BaseModel):
    """Base of every recipe block: unknown keys are errors, numbers are finite and recipes are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def is_local_path(model: str) -> bool:
    """True when `source.model` names a local folder (starts with ./, ../, / or ~) rather than a Hub repo."""
    return model.startswith(LOCAL_PREFIXES)


class Source(Block):
    model: str = Field(
        description="A Hub repo id (`org/name`) or a local folder starting with `./`, `../`, `/` or `~` "
        "(a relative path is relative to the recipe file that writes it)."
    )
    revision: str | None = Field(
        default=None,
        min_length=1,
        description="Hub branch, tag or 40-hex commit (default `main`); a build records the resolved commit. "
        "Not allowed for a local folder.",
    )
    task: str | None = Field(
        default=None,
        description="An optimum task name (text-generation, feature-extraction, text-classification, ...); "
        "inferred from config.json's `architectures` when absent.",
    )
    dtype: Dtype = Field(
        default="auto", description="Weights dtype to load the source in; `auto` keeps the checkpoint's."
    )
    trust_remote_code: StrictBool = Field(
        default=False,
        description="Run the model repo's own Python code. A Hub source needs a 40-hex `revision` with it.",
    )
    allow_pickle: StrictBool = Field(
        default=False, description="Also read pickle (`.bin`) weights; by default only safetensors are read."
    )
    base_model: str | None = Field(
        default=None,
        description="The Hub repo id (`org/name`) the model card links as base_model; absent = the Hub source's "
        "id, or for a local folder the `base_model` of its README.md front matter (else none).",
    )

    @field_validator("model")
    @classmethod
    def _model_is_repo_or_path(cls, model: str) -> str:
        if "\\" in model:
            raise ValueError(f"'{model}' contains a backslash; write local paths with '/' (./models/x), on Windows too")
        if is_local_path(model):
            if any(ord(c) < 32 for c in model):
                raise ValueError(f"{show(model)} contains a control character; write the folder's path as plain text")
        elif not REPO_ID_PATTERN.fullmatch(model):
            raise ValueError(
                f"{show(model)} is neither a Hub repo id (org/name) nor a local path; "
                "start local folders with './', '../', '/' or '~'"
            )
        elif reason := _hub_forbids(model):
            raise ValueError(f"{show(model)} is not a valid Hub repo id: {reason}")
        return model

    @field_validator("base_model")
    @classmethod
    def _base_model_is_a_repo(cls, base_model: str | None) -> str | None:
        if base_model is not None and (
            "/" not in base_model or not REPO_ID_PATTERN.fullmatch(base_model) or _hub_forbids(base_model)
        ):
            raise ValueError(
                f"{show(base_model)} is not a Hub repo id; write the model the source derives from as org/name"
            )
        return base_model

    @field_validator("revision")
    @classmethod
    def _revision_is_a_ref(cls, revision: str | None) -> str | None:
        return revision if revision is None else _check_ref(revision)

    @field_validator("task")
    @classmethod
    def _task_is_known(cls, task: str | None) -> str | None:
        if task is not None and task not in TASKS:
            raise ValueError(not_one_of(task, TASKS))
        return task

    @model_validator(mode="after")
    def _revision_rules(self) -> Source:
        if self.revision is not None and is_local_path(self.model):
            raise RuleViolation(("revision",), "a local folder has no revision; remove `revision`")
        if self.trust_remote_code and not self.pinned:
            raise RuleViolation(
                ("trust_remote_code",),
                "trust_remote_code needs `revision` pinned to a 40-hex commit so the code that runs is the code "
                "you reviewed",
            )
        return self

    @property
    def is_local(self) -> bool:
        return is_local_path(self.model)

    @property
    def pinned(self) -> bool:
        """True when the source cannot change under the recipe: a local folder or a 40-hex commit."""
        return self.is_local or bool(self.revision and COMMIT_PATTERN.fullmatch(self.revision))


_DEVICE = re.compile(r"^(cpu|disk|cuda|cuda:\d+|\d+)$")
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


class Load(Block):
    attn_implementation: Literal["eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"] | None = (
        Field(default=None, description="Attention kernel; transformers picks `sdpa` when absent.")
    )
    device_map: str | dict[str, str | int] | None = Field(
        default=None,
        description="Where to load: auto, cpu, cuda, cuda:N, or {module: device} with devices cpu, disk, cuda, "
        "cuda:N or a GPU index N. Absent = CUDA when present, else CPU.",
    )
    max_memory: dict[str, str] | None = Field(
        default=None, description='Per-device memory caps, e.g. {"0": "20GiB", "cpu": "64GiB"}.'
    )

    @field_validator("device_map", mode="before")
    @classmethod
    def _device_map(cls, device_map: object) -> object:
        """One message per problem (not one per union branch); GPU indexes written as numbers become strings."""
        if device_map is None:
            return None
        if isinstance(device_map, str):
            if device_map not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device_map):
                raise ValueError(f"{show(device_map)} is not auto, cpu, cuda or cuda:N")
            return device_map
        if not isinstance(device_map, dict):
            raise ValueError("expected auto, cpu, cuda, cuda:N or a mapping {module: device}")
        if not device_map:
            raise ValueError("the mapping is empty; map module names to devices, e.g. {model: 0, lm_head: cpu}")
        normalized = {}
        for module, device in device_map.items():
            if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
                device = str(device)
            if not isinstance(device, str) or not _DEVICE.fullmatch(device):
                raise RuleViolation(
                    (str(module),), f"{_shown(device)} is not a device: use cpu, disk, cuda, cuda:N or N"
                )
            normalized[module] = device
        return normalized

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, max_memory: dict[str, str] | None) -> dict[str, str] | None:
        for device, amount in (max_memory or {}).items():
            if not re.fullmatch(r"\d+|cpu|disk", device):
                raise RuleViolation(
                    (device,), f'{show(device)} is not a device key: use a GPU index ("0"), cpu or disk'
                )
            if not _MEMORY.fullmatch(amount):
                raise RuleViolation((device,), f"{show(amount)} is not a memory size like 20GiB or 500MB")
        return max_memory


SkipModules = tuple[Annotated[str, Field(min_length=1)], ...]


class Bnb4Bit(Block):
    method: Literal["bnb-4bit"] = Field(description="bitsandbytes 4-bit (QLoRA's NF4/FP4) quantization.")
    quant_type: Literal["nf4", "fp4"] = Field(
        default="nf4", description="nf4 (normal-float, best for normally distributed weights) or fp4."
    )
    double_quant: StrictBool = Field(
        default=False, description="Quantize the quantization constants too (saves ~0.37 bits/param)."
    )
    compute_dtype: ComputeDtype = Field(
        default="float32", description="dtype of the matmuls; bfloat16 or float16 is faster on GPUs."
    )
    quant_storage: Literal["uint8", "float16", "bfloat16", "float32"] = Field(
        default="uint8", description="Storage dtype of the packed 4-bit weights (match it to FSDP's dtype)."
    )
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        default=64,
        description="Weights per block, each with its own float32 scale (absmax): smaller blocks follow the "
        "weights more closely and cost more scales (5 bits/param at 32, 4.5 at 64, before double_quant). It must "
        "divide every quantized layer's input size (`builder plan` names the sizes that do); a size other than 64 "
        "is written by the streaming quantizer only.",
    )
    skip_modules: SkipModules = Field(
        default=(), description="Module names (or name suffixes) kept unquantized, e.g. lm_head."
    )
    dequantize: StrictBool = Field(
        default=False, description="Also write a dequantized checkpoint in the source dtype under `dequantized/`."
    )


class Bnb8Bit(Block):
    method: Literal["bnb-8bit"] = Field(description="bitsandbytes LLM.int8() quantization.")
    threshold: StrictFloat = Field(
        default=6.0, gt=0, description="Outlier threshold: activations above it run in fp16 (LLM.int8's 6.0)."
    )
    skip_modules: SkipModules = Field(default=(), description="Module names (or name suffixes) kept unquantized.")
    fp32_cpu_offload: StrictBool = Field(
        default=False,
        description="Keep the modules that `load.device_map` puts on cpu in float32 (unquantized).",
    )
    has_fp16_weight: StrictBool = Field(
        default=False, description="Keep fp16 master weights beside the int8 ones (for training; 2x the size)."
    )
    dequantize: StrictBool = Field(
        default=False, description="Also write a dequantized checkpoint in the source dtype under `dequantized/`."
    )


Quantize = Annotated[Bnb4Bit | Bnb8Bit, Field(discriminator="method")]


class OnnxExport(Block):
    format: Literal["onnx"] = Field(description="The export format.")
    exporter: Literal["auto", "torch", "optimum", "genai"] = Field(
        default="auto",
        description="torch: torch.onnx.export(dynamo=True); optimum: optimum-onnx's main_export; genai: "
        "onnxruntime-genai's model builder (text-generation decoders: fused attention, always with the KV cache, "
        "a genai_config.json so onnxruntime_genai.Model loads the folder; it picks its own opset); auto: genai for "
        "a text-generation model whose architecture and options it supports (else the manifest's "
        "onnx.genai_fallback says why not), else optimum when importable, else torch.",
    )
    opset: StrictInt = Field(default=18, ge=7, le=23, description="ONNX opset; the torch exporter needs 18 or newer.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32",
        description="Precision of the exported graph; bfloat16 (and float16 without quantize) with the genai exporter "
        "is for CUDAExecutionProvider.",
    )
    provider: Provider = Field(default="CPUExecutionProvider", description="The execution provider the graph targets.")
    optimize: Literal["none", "O1", "O2", "O3", "O4"] = Field(
        default="none",
        description="onnxruntime transformer-optimizer level: O1 basic, O2 extended fusions, O3 + GELU "
        "approximation, O4 = O3 + float16 (GPU providers only).",
    )
    with_past: StrictBool = Field(
        default=False, description="text-generation only: export with the KV cache (past_key_values inputs)."
    )
    quantize: Literal["none", "dynamic-int8", "int4", "int8", "nf4", "fp4"] = Field(
        default="none",
        description="dynamic-int8: onnxruntime dynamic int8 (CPUExecutionProvider only); int4: block-wise 4-bit "
        "weight-only MatMulNBits; int8: block-wise 8-bit weight-only MatMulNBits (genai exporter only); nf4/fp4: "
        "MatMulBnb4 with bitsandbytes' 4-bit types (weight-only, CPU and CUDA).",
    )
    block_size: StrictInt | None = Field(
        default=None,
        ge=16,
        le=256,
        description="Weights per quantization block of int4/int8/nf4/fp4 (a power of two, 16-256; default 32 for "
        "int4 and int8, 64 for nf4/fp4).",
    )
    quant_algorithm: Literal["rtn", "hqq", "k_quant"] = Field(
        default="rtn",
        description="int4 only: round-to-nearest, HQQ or k-quant block quantization (the genai exporter: rtn or "
        "k_quant).",
    )
    accuracy_level: StrictInt | None = Field(
        default=None,
        ge=0,
        le=4,
        description="int4 only: MatMulNBits' minimum compute precision (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8).",
    )
    verify_on: Provider | None = Field(
        default=None,
        description="Provider to verify on when the target provider is absent on the build host; absent = the "
        "target itself.",
    )

    @model_validator(mode="after")
    def _provider_rules(self) -> OnnxExport:
        for key in ("provider", "verify_on"):
            if getattr(self, key) == "ROCMExecutionProvider":
                raise RuleViolation(
                    (key,),
                    "ROCMExecutionProvider is not in onnxruntime 1.32 and later; AMD GPUs run ONNX through "
                    "MIGraphXExecutionProvider: set it instead",
                )
        if self.quantize in WEIGHT_ONLY:
            if self.provider not in WEIGHT_ONLY_PROVIDERS:
                raise RuleViolation(
                    ("quantize",),
                    f"{self.quantize} graphs use onnxruntime's MatMulNBits/MatMulBnb4 operators, which "
                    f"{self.provider} does not run; target CPUExecutionProvider or CUDAExecutionProvider, or use "
                    "`dtype: float16` without quantize",
                )
            if self.dtype != "float32":
                raise RuleViolation(("quantize",), f"{self.quantize} quantizes a float32 graph; set `dtype: float32`")
            if self.optimize in ("O3", "O4"):
                raise RuleViolation(
                    ("optimize",),
                    f"{self.quantize} is applied to an O1/O2 graph (O3/O4 fuse the "
                    "MatMuls it quantizes); use optimize: O2 or none",
                )
        if self.block_size is not None:
            if self.quantize not in WEIGHT_ONLY:
                raise RuleViolation(("block_size",), "block_size is for quantize: int4, int8, nf4 or fp4")
            if self.block_size & (self.block_size - 1):
                raise RuleViolation(("block_size",), f"{self.block_size} is not a power of two (16, 32, 64, 128, 256)")
        if self.quantize != "int4":
            for key, default in (("quant_algorithm", "rtn"), ("accuracy_level", None)):
                if getattr(self, key) != default:
                    raise RuleViolation((key,), f"{key} is for quantize: int4")
        if self.exporter == "genai" and (misfit := self.genai_misfit()):
            raise misfit
        if self.exporter != "genai" and (self.quantize == "int8" or self.dtype == "bfloat16"):
            key = "quantize" if self.quantize == "int8" else "dtype"
            raise RuleViolation(
                (key,),
                f"{getattr(self, key)} is built by onnxruntime-genai's model builder; set `exporter: genai`",
            )
        if self.quantize == "dynamic-int8" and self.provider in GPU_PROVIDERS:
            raise RuleViolation(
                ("quantize",),
                f"dynamic-int8 graphs run on CPUExecutionProvider only, not {self.provider}; use `dtype: float16` "
                "for GPU providers or target CPUExecutionProvider",
            )
        if self.optimize == "O4" and self.provider not in GPU_PROVIDERS:
            raise RuleViolation(
                ("optimize",), "O4 (float16 fusions) is for GPU providers; use O3 for CPUExecutionProvider"
            )
        if self.dtype == "float16" and self.quantize == "dynamic-int8":
            raise RuleViolation(("quantize",), "dynamic-int8 quantizes a float32 graph; set `dtype: float32`")
        return self

    def genai_misfit(self) -> RuleViolation | None:
        """Why onnxruntime-genai's model builder cannot make this graph (CPU or CUDA; fp32, fp16, bf16, int4, int8),
        or None; a recipe with `exporter: genai` fails with it, `auto` takes another exporter for it."""
        if self.provider not in WEIGHT_ONLY_PROVIDERS:
            return RuleViolation(
                ("provider",),
                f"the genai exporter builds for CPUExecutionProvider or CUDAExecutionProvider, not {self.provider}; "
                "use `exporter: torch` for other providers",
            )
        if self.quantize not in ("none", "int4", "int8"):
            return RuleViolation(
                ("quantize",),
                f"the genai exporter quantizes to int4 or int8 (MatMulNBits), not {self.quantize}; use quantize: "
                "int4 or int8, or `exporter: torch`",
            )
        if self.quant_algorithm == "hqq":
            return RuleViolation(("quant_algorithm",), "the genai exporter quantizes with rtn or k_quant, not hqq")
        if self.optimize != "none":
            return RuleViolation(
                ("optimize",), "the genai exporter writes an already fused graph; remove `optimize` (or set none)"
            )
        if self.dtype != "float32" and self.quantize == "none" and self.provider != "CUDAExecutionProvider":
            return RuleViolation(
                ("dtype",),
                f"the genai exporter makes {self.dtype} graphs for CUDAExecutionProvider only; use float32 or "
                "quantize: int4 on the CPU",
            )
        return None


def _thresholds_model() -> type[Block]:
    """`verify.thresholds`: one optional field per gate a recipe may set, from the metric table (`builder.gates`),
    so a new gate is a new field without a second list to keep equal."""
    fields: dict = {
        key: (StrictFloat | None, Field(default=None, description=gate.description, ge=gate.ge, le=gate.le, gt=gate.gt))
        for key, gate in GATES.items()
        if gate.recipe
    }
    return create_model("Thresholds", __base__=Block, __module__=__name__, **fields)


if TYPE_CHECKING:

    class Thresholds(Block):
        """Overrides of the gate's default bounds (fields: `builder.gates.RECIPE_GATES`)."""

else:
    Thresholds = _thresholds_model()


class Verify(Block):
    prompts: tuple[Annotated[str, Field(min_length=1)], ...] = Field(
        default=(), description="Inputs to compare on; absent = the built-in evaluation text."
    )
    max_new_tokens: StrictInt = Field(default=16, ge=1, le=512, description="Greedy tokens generated per prompt (LMs).")
    thresholds: Thresholds = Field(
        default_factory=Thresholds, description="Overrides of the per-method default thresholds."
    )


class Publish(Block):
    repo: str = Field(description="Target Hub repo id, `org/name`.")
    revision: str = Field(default="main", min_length=1, description="Branch to push to; created when missing.")
    private: StrictBool = Field(default=False, description="Create the repo as private.")
    create_pr: StrictBool = Field(default=False, description="Open a pull request instead of pushing to the branch.")
    license: str | None = Field(
        default=None,
        description="The Hub's license identifier for the model card (apache-2.0, mit, llama3.2, "
        "other, ...); absent = the local source folder card's license.",
    )
    tags: tuple[Annotated[str, Field(min_length=1)], ...] = Field(default=(), description="Extra model-card tags.")
    card: str | None = Field(default=None, description="Markdown appended to the generated model card.")

    @field_validator("revision")
    @classmethod
    def _revision_is_a_ref(cls, revision: str) -> str:
        return _check_ref(revision)

    @field_validator("license")
    @classmethod
    def _license_is_the_hubs(cls, license: str | None) -> str | None:  # noqa: A002 - the card's field name
        if license is not None and (problem := license_problem(license)):
            raise ValueError(problem)
        return license

    @field_validator("repo")
    @classmethod
    def _repo_id(cls, repo: str) -> str:
        if "/" not in repo or not REPO_ID_PATTERN.fullmatch(repo):
            raise ValueError(f"{show(repo)} is not a Hub repo id; write it as org/name")
        if reason := _hub_forbids(repo):
            raise ValueError(f"{show(repo)} is not a valid Hub repo id: {reason}")
        return repo


class Recipe(Block):
    """A resolved recipe: what `builder` builds one artifact from (after `extends` and `variants`)."""

    schema_version: Literal[1] = Field(description="Recipe language version; always 1.")
    name: str = Field(pattern=NAME_PATTERN, description="Artifact name: lowercase letters, digits, '.', '_', '-'.")
    source: Source = Field(description="The model to build from.")
    load: Load = Field(default_factory=Load, description="How to load the source.")
    quantize: Quantize | None = Field(default=None, description="bitsandbytes quantization, by `method`.")
    export: OnnxExport | None = Field(default=None, description="ONNX export for an onnxruntime provider.")
    verify: Verify = Field(default_factory=Verify, description="What the verification gate compares.")
    publish: Publish | None = Field(default=None, description="Where `builder publish` pushes the artifact.")

    @field_validator("schema_version", mode="before")
    @classmethod
    def _schema_version(cls, version: object) -> object:
        if type(version) is not int or version != 1:  # `true` is not 1
            raise ValueError(f"{_shown(version)} is not a schema_version this builder reads; write schema_version: 1")
        return version

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Recipe:
        if self.quantize is None and self.export is None:
            raise RuleViolation(
                ("name",),
                f"recipe {self.name} has neither `quantize` nor `export`: there is nothing to build; add a `quantize` "
                "block (bitsandbytes) or an `export` block (ONNX)",
            )
        if self.quantize is not None and self.export is not None:
            raise RuleViolation(
                ("export",),
                "bitsandbytes weights cannot be exported to ONNX; use `export.quantize: dynamic-int8` instead of "
                "`quantize`, or write two recipes",
            )
        if (self.load.attn_implementation or "").startswith("flash_attention") and self.source.dtype == "float32":
            raise RuleViolation(
                ("load", "attn_implementation"),
                f"{self.load.attn_implementation} runs in float16/bfloat16 only; set `source.dtype: bfloat16` or use "
                "sdpa",
            )
        if isinstance(self.quantize, Bnb8Bit) and self.quantize.fp32_cpu_offload:
            devices = (
                {str(d) for d in self.load.device_map.values()} if isinstance(self.load.device_map, dict) else set()
            )
            on_gpu = any(d == "cuda" or d.startswith("cuda:") or d.isdigit() for d in devices)
            if "cpu" not in devices or not on_gpu:
                raise RuleViolation(
                    ("quantize", "fp32_cpu_offload"),
                    "fp32_cpu_offload needs `load.device_map` to put some modules on cpu and the rest on a GPU "
                    "(with everything on one device it quantizes nothing or offloads nothing)",
                )
        if self.export is not None and self.export.with_past and self.source.task is not None:
            decoders = [task for family in FAMILIES.values() if family.GRAPH == "decoder" for task in family.TASKS]
            if self.source.task not in decoders:
                raise RuleViolation(
                    ("export", "with_past"), f"with_past is for {', '.join(decoders)}, not {self.source.task}"
                )
        return self


_BAD_REF = re.compile(r"[\s~^:?*\[\\\x00-\x1f\x7f]|\.\.|@\{|^/|/$|\.lock$")


def _check_ref(revision: str) -> str:
    """`revision` if git could name a branch, tag or commit so; raises ValueError with the rule otherwise."""
    if _BAD_REF.search(revision):
        raise ValueError(
            f"{show(revision)} is not a branch, tag or commit name: git refs have no spaces, none of "
            "~ ^ : ? * [ \\, no '..' or '@{', do not start or end with '/' and do not end with '.lock'"
        )
    return revision


def _hub_forbids(repo_id: str) -> str | None:
    """What the Hub refuses in a repo id that the pattern lets through, or None."""
    if "--" in repo_id or ".." in repo_id:
        return "it cannot contain '--' or '..'"
    if repo_id.endswith(".git"):
        return "it cannot end with '.git'"
    return None


def _shown(value: object) -> str:
    """A value as the YAML author wrote it: true, null, a mapping, 'text', 3."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (dict, list, tuple)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)


SCHEMA_ID = "urn:builder:recipe:schema_version:1"  # no public URL hosts it; editors find it by the modeline
# The keys a block must have in a file that stands alone; a child (`extends`) may leave any of them to its parent.
_REQUIRED = {
    "Source": ["model"],
    "Bnb4Bit": ["method"],
    "Bnb8Bit": ["method"],
    "OnnxExport": ["format"],
    "Publish": ["repo"],
}


def json_schema() -> dict:
    """JSON Schema of a recipe file, for editors: the `Recipe` fields plus `extends` and `variants`.

    Unknown keys and bad values are errors in every file. What is required depends on `extends`: a file without it
    needs `schema_version` and each block it writes needs its key fields (`source.model`, `quantize.method`,
    `export.format`, `publish.repo`); a child may write any part of any block. Cross-field rules (quantize or
    export, not both) are for `builder validate`, which also resolves the parents.
    """
    schema = Recipe.model_json_schema()
    definitions = schema["$defs"]
    for model in definitions.values():
        model.pop("required", None)
    # A partial quantize block ({skip_modules: [...]}) fits both methods; `method`, when written, still picks one.
    quantize = schema["properties"]["quantize"]["anyOf"][0]
    quantize.pop("discriminator")
    quantize["anyOf"] = quantize.pop("oneOf")
    for name in ("Bnb4Bit", "Bnb8Bit"):
        definitions[name]["properties"]["method"].pop("default", None)
    standalone = {
        "required": ["schema_version"],
        "properties": {
            block: {"anyOf": [{"type": "null"}, *({"$ref": f"#/$defs/{d}", "required": _REQUIRED[d]} for d in defs)]}
            for block, defs in (
                ("source", ["Source"]),
                ("quantize", ["Bnb4Bit", "Bnb8Bit"]),
                ("export", ["OnnxExport"]),
                ("publish", ["Publish"]),
            )
        },
    }
    schema.pop("required", None)
    schema["if"] = {"not": {"required": ["extends"]}}
    schema["then"] = standalone
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "builder recipe (schema_version 1)"
    schema["properties"]["extends"] = {
        "type": "string",
        "description": "Relative path of a parent recipe; its keys are deep-merged under this file's (child wins).",
    }
    schema["properties"]["variants"] = {
        "type": "object",
        "description": "suffix: {overrides} (or nothing); each variant is its own artifact named <name>-<suffix>.",
        "propertyNames": {"pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"},
        "additionalProperties": {"type": ["object", "null"]},
    }
    return schema
