"""A recipe's bitsandbytes `quantize` block in transformers' terms: the BitsAndBytesConfig, the device map and
`from_pretrained` arguments, and the device-map checks made before anything is written; the layer-shape rules of
4-bit builds (which layers stay in full precision, which blocksizes a model takes) and the recipe settings that keep
a build off the streaming quantizer, which `plan` checks from the safetensors headers without torch.

Shared by the quantize step (the transformers path) and the streaming quantizer, which reproduces what
transformers does with the same config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, get_args

from builder.checkpoint import TensorInfo
from builder.errors import BuildError
from builder.modules import is_quantizable, left_alone_by_bnb
from builder.recipe import Bnb4Bit, Bnb8Bit, Recipe
from builder.tasks import AUTO_CLASSES, infer_task

if TYPE_CHECKING:
    from builder.plan import Plan

TRANSFORMERS_BLOCKSIZE = 64
"""The 4-bit blocksize of the transformers path: BitsAndBytesConfig has none, so bitsandbytes' default applies."""
BLOCKSIZES: tuple[int, ...] = get_args(Bnb4Bit.model_fields["blocksize"].annotation)

PACKED_ROWS = 32
"""bitsandbytes' CPU 4-bit kernel for CPUs with AVX512-BF16 repacks a weight of N output and K input features on
its first forward (`functional._convert_weight_packed_for_cpu`): into tiles of 32 output rows (it asserts `N must
be divisible by block_n`) and its absmax into N rows of K // blocksize (a view that fails, `shape '[576, 2]' is
invalid`, unless blocksize divides K). An artifact must load on such CPUs too, so both are rules of every build."""


def bnb_config(spec: Bnb4Bit | Bnb8Bit, skip_modules: Sequence[str] = ()):
    """`transformers.BitsAndBytesConfig` for the recipe's `quantize` block, field for field.

    An empty `skip_modules` (the recipe's unless given) passes None, which keeps transformers' default skips (the
    output head); a non-empty one replaces them."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = list(skip_modules or spec.skip_modules) or None
    match spec:
        case Bnb4Bit():
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=spec.quant_type,
                bnb_4bit_use_double_quant=spec.double_quant,
                bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype),
                bnb_4bit_quant_storage=getattr(torch, spec.quant_storage),
                llm_int8_skip_modules=skip,
            )
        case Bnb8Bit():
            return BitsAndBytesConfig(
                load_in_8bit=True,
                llm_int8_threshold=spec.threshold,
                llm_int8_skip_modules=skip,
                llm_int8_enable_fp32_cpu_offload=spec.fp32_cpu_offload,
                llm_int8_has_fp16_weight=spec.has_fp16_weight,
            )


def device_map_for(recipe: Recipe, device: str, pinned: bool) -> str | dict[str, str | int]:
    """The `device_map` a build loads with: the recipe's per-module map, its `auto` unless `--device` pinned a
    device, else everything on `device`."""
    device_map = recipe.load.device_map
    if isinstance(device_map, dict):
        return dict(device_map)
    if device_map == "auto" and not pinned:
        return "auto"
    return {"": device}


def load_kwargs(recipe: Recipe, device_map: str | dict[str, Any] | None) -> dict:
    """Keyword arguments of `from_pretrained` besides the quantization config (GPU indices become ints)."""
    import torch

    if isinstance(device_map, dict):
        device_map = {module: int(where) if str(where).isdigit() else where for module, where in device_map.items()}
    kwargs: dict = {
        "device_map": device_map,
        "dtype": "auto" if recipe.source.dtype == "auto" else getattr(torch, recipe.source.dtype),
        "trust_remote_code": recipe.source.trust_remote_code,
    }
    if recipe.load.attn_implementation is not None:
        kwargs["attn_implementation"] = recipe.load.attn_implementation
    if recipe.load.max_memory is not None:
        kwargs["max_memory"] = {int(k) if k.isdigit() else k: v for k, v in recipe.load.max_memory.items()}
    return kwargs


def preflight(plan: Plan, device_map: str | dict[str, str | int]) -> None:
    """Refuse, before anything is written, bitsandbytes settings that cannot work with `device_map`."""
    spec = plan.loaded.recipe.quantize
    if not isinstance(spec, Bnb8Bit) or not spec.fp32_cpu_offload:
        return
    if not isinstance(device_map, dict):
        return
    patterns = spec.skip_modules or ("lm_head",)
    on_gpu = [
        t.name
        for t in plan.source.tensors
        if is_quantizable(t, patterns) and _placement(t.name, device_map) not in ("cpu", "disk")
    ]
    if not on_gpu:
        raise BuildError(
            "quantize.fp32_cpu_offload: with this device map every quantizable layer is on cpu, so nothing would be "
            "quantized; put the transformer layers on a GPU in `load.device_map` (e.g. {model.layers: 0, lm_head: "
            "cpu}) and build on a CUDA host, or drop fp32_cpu_offload"
        )


def _placement(tensor: str, device_map: dict) -> object:
    """Where accelerate puts `tensor`: the device of the longest device-map key that is a module prefix of it."""
    best, where = -1, None
    for module, device in device_map.items():
        if (module == "" or tensor == module or tensor.startswith(module + ".")) and len(module) > best:
            best, where = len(module), device
    return where


def small_output_layers(model: Any) -> list[str]:
    """The 4-bit Linear modules of `model` (on the meta device, swapped by transformers' bitsandbytes quantizer)
    whose output size is not a multiple of PACKED_ROWS: a classifier head with a few labels, Qwen2-MoE's
    `shared_expert_gate` (Linear(hidden -> 1)). They stay in full precision."""
    import bitsandbytes as bnb

    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit) and module.out_features % PACKED_ROWS
    )


def skip_modules_keeping(spec: Bnb4Bit, model: Any, kept: list[str]) -> list[str]:
    """`llm_int8_skip_modules` that skips what `bnb_config(spec)` skipped in `model` and the `kept` modules too.
    The saved config.json names them, which is how stock `from_pretrained` knows they are not quantized."""
    from transformers.quantizers.base import get_keys_to_not_convert

    defaults = list(spec.skip_modules) or get_keys_to_not_convert(model)
    return sorted(set(defaults) | set(kept))


def streaming_refusal(recipe: Recipe, config: dict, has_safetensors: bool, task: str | None = None) -> str | None:
    """Why the recipe's settings or the source (its config.json, whether it has safetensors) keep a build off the
    streaming quantizer, which must then take the transformers path; None when they do not. `task`: the plan's
    (None: the recipe's or the one config.json implies)."""
    quantize = recipe.quantize
    if quantize is None:
        return "the recipe has no bitsandbytes `quantize` block"
    if quantize.dequantize:
        return "`dequantize: true` needs the quantized model in memory"
    if isinstance(quantize, Bnb8Bit) and quantize.has_fp16_weight:
        return "`has_fp16_weight: true` keeps fp16 master weights, which only the transformers path writes"
    if isinstance(quantize, Bnb8Bit) and quantize.fp32_cpu_offload:
        return "`fp32_cpu_offload` depends on the device map's placement"
    if isinstance(quantize, Bnb4Bit) and quantize.quant_storage != "uint8":
        return f"`quant_storage: {quantize.quant_storage}` is only written by the transformers path"
    if isinstance(recipe.load.device_map, dict) or recipe.load.max_memory:
        return "a custom `load.device_map`/`load.max_memory` can offload modules, which changes what is quantized"
    if recipe.source.trust_remote_code:
        return "remote code (`trust_remote_code`) defines its own modules"
    if not has_safetensors:
        return "the source has no model.safetensors (or model.safetensors.index.json)"
    if config.get("quantization_config"):
        return "the source is already quantized"
    if config.get("auto_map"):
        return "the model's config points at remote code (`auto_map`)"
    task = task or recipe.source.task or infer_task(config.get("architectures"))
    if task not in AUTO_CLASSES:
        return f"task {task!r} is not one the streaming quantizer knows ({', '.join(AUTO_CLASSES)})"
    return None


def four_bit_layers(spec: Bnb4Bit, tensors: tuple[TensorInfo, ...], config: dict) -> list[TensorInfo]:
    """From the safetensors headers, the weights a 4-bit build quantizes (an estimate, as the plan's sizes are:
    transformers decides on the model itself), the small-output layers kept aside."""
    return [
        t
        for t in tensors
        if is_quantizable(t, spec.skip_modules) and not left_alone_by_bnb(t, config) and not t.shape[0] % PACKED_ROWS
    ]


def kept_layers(spec: Bnb4Bit, tensors: tuple[TensorInfo, ...], config: dict) -> list[str]:
    """From the safetensors headers, the layers a 4-bit build keeps in full precision (see `small_output_layers`)."""
    return [
        t.name.removesuffix(".weight")
        for t in tensors
        if is_quantizable(t, spec.skip_modules) and not left_alone_by_bnb(t, config) and t.shape[0] % PACKED_ROWS
    ]


def blocksize_problem(recipe: Recipe, tensors: tuple[TensorInfo, ...], config: dict) -> str | None:
    """Why a 4-bit recipe's `quantize.blocksize` cannot be built for this model (a quantized layer's input size it
    does not divide, with the sizes that would do; or a build that the streaming quantizer cannot write); None
    when it can."""
    spec = recipe.quantize
    if not isinstance(spec, Bnb4Bit):
        return None
    inputs = {t.shape[1] for t in four_bit_layers(spec, tensors, config) if len(t.shape) == 2}
    if any(size % spec.blocksize for size in inputs):
        fitting = [size for size in BLOCKSIZES if not any(k % size for k in inputs)]
        odd = sorted(k for k in inputs if k % spec.blocksize)
        return (
            f"{spec.blocksize} does not divide the input size of every quantized layer of {recipe.source.model} "
            f"({', '.join(map(str, odd))}), and bitsandbytes' CPU kernel cannot load such an artifact; "
            + (
                f"use {' or '.join(map(str, fitting))}"
                if fitting
                else "no 4-bit blocksize divides them all: keep those layers in `skip_modules` or use bnb-8bit"
            )
        )
    if spec.blocksize != TRANSFORMERS_BLOCKSIZE and (
        refusal := streaming_refusal(recipe, config, has_safetensors=bool(tensors))
    ):
        return (
            f"only the streaming quantizer writes a blocksize other than {TRANSFORMERS_BLOCKSIZE} (transformers' "
            f"BitsAndBytesConfig has none), and this build cannot be streamed: {refusal}; use blocksize "
            f"{TRANSFORMERS_BLOCKSIZE} or change that"
        )
    return None
