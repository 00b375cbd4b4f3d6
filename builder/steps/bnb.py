"""A recipe's bitsandbytes `quantize` block in transformers' terms: the BitsAndBytesConfig, the device map and
`from_pretrained` arguments, and the device-map checks made before anything is written.

Shared by the quantize step (the transformers path) and the streaming quantizer, which reproduces what
transformers does with the same config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from builder.errors import BuildError
from builder.modules import is_quantizable
from builder.recipe import Bnb4Bit, Bnb8Bit, Recipe

if TYPE_CHECKING:
    from builder.plan import Plan


def bnb_config(spec: Bnb4Bit | Bnb8Bit):
    """`transformers.BitsAndBytesConfig` for the recipe's `quantize` block, field for field.

    An empty `skip_modules` passes None, which keeps transformers' default skips (the output head); a non-empty one
    replaces them."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = list(spec.skip_modules) or None
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
