"""The `quantize` step: load the source through transformers' bitsandbytes quantizer and save it, before any forward.

The recipe's `quantize` block maps one-to-one onto `transformers.BitsAndBytesConfig`; `load` and `source` give
`dtype`, `attn_implementation`, `device_map` and `max_memory`. The quantized model is saved (safetensors, config with
its quantization_config, tokenizer, generation config) before anything runs a forward pass: on some CPUs the first
4-bit forward repacks the weights in place and a save after it is lossy. The step records the memory footprint of
the quantized model and of the source (from the safetensors headers, so the source is not loaded twice) and the bits
per parameter of the quantized layers as serialized.
"""

from __future__ import annotations

import errno
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from builder.artifact import Dequantized, Footprint, QuantizedLayers
from builder.checkpoint import FLOAT_DTYPES, TORCH_DTYPE_BYTES, copy_sentence_transformers, has_tokenizer, read_header
from builder.console import say
from builder.context import BuildContext
from builder.errors import BuildError
from builder.recipe import Bnb4Bit, Bnb8Bit
from builder.steps.bnb import (
    TRANSFORMERS_BLOCKSIZE,
    bnb_config,
    load_kwargs,
    skip_modules_keeping,
    small_output_layers,
)
from builder.steps.stream import NOTHING_QUANTIZED, stream_build, stream_plan
from builder.tasks import auto_class

# A serialized tensor of a bitsandbytes Linear: `<module>.weight`, `.weight.absmax`, `.weight.quant_map`,
# `.weight.nested_*`, `.weight.quant_state.bitsandbytes__nf4` (4-bit); `.weight`, `.SCB`, `.weight_format` (8-bit).
_QUANTIZED_KEY = re.compile(r"^(?P<module>.+)\.(?:weight(?:\..+|_format)?|SCB)$")


def quantize(ctx: BuildContext) -> None:
    """Load and quantize the source, save it into `ctx.workdir`, record footprints and bits per parameter;
    with `dequantize: true` also write a dequantized checkpoint under `dequantized/`."""
    recipe = ctx.loaded.recipe
    spec = recipe.quantize
    assert spec is not None  # a quantize recipe
    model_class = auto_class(ctx.plan.task)
    for warning in ctx.plan.warnings:
        say(f"{recipe.name}: warning: {warning}")
    planned = stream_plan(recipe, ctx.source_folder(), ctx.plan.task)
    if not isinstance(planned, str):
        with _stage(ctx, "stream", "streaming the quantized weights"):
            result = stream_build(recipe, ctx.source_folder(), ctx.workdir, ctx.device, plan=planned)
        ctx.quantize_path = "stream"
        _record_sizes(ctx, result["memory_footprint"], result["layers"], model_class)
        return
    reason = planned
    if reason.startswith(NOTHING_QUANTIZED):  # the transformers path swaps the same modules: it would fail too
        raise BuildError(f"{recipe.name}: cannot quantize {recipe.source.model} with bitsandbytes: {reason}")
    if isinstance(spec, Bnb4Bit) and spec.blocksize != TRANSFORMERS_BLOCKSIZE:
        raise BuildError(
            f"{recipe.name}: quantize.blocksize {spec.blocksize} is written by the streaming quantizer only "
            f"(transformers' BitsAndBytesConfig has no 4-bit blocksize), and this build cannot be streamed: "
            f"{reason}; use blocksize {TRANSFORMERS_BLOCKSIZE} or change that"
        )
    say(f"{recipe.name}: quantizing through transformers (not streamed: {reason})")
    ctx.quantize_path = f"transformers ({reason})"
    kwargs = load_kwargs(recipe, ctx.device_map)
    config = _transformers_config(ctx, spec, model_class)
    with _stage(ctx, "load", "loading and quantizing"):
        model = model_class.from_pretrained(ctx.source_folder(), quantization_config=config, **kwargs)
    layers = _quantized_layers(model)
    if not layers:
        raise BuildError(
            f"{recipe.source.model} has no Linear layer that bitsandbytes quantized with these "
            "settings (all skipped or offloaded); check `quantize.skip_modules` and `load.device_map`"
        )
    _name_offloaded_layers(model, spec)
    with _stage(ctx, "save", "saving the quantized model"):
        model.save_pretrained(ctx.workdir)  # before any forward pass (CPU 4-bit repack pitfall)
        _save_preprocessor(ctx, ctx.workdir)
    _record_sizes(ctx, model.get_memory_footprint(), layers, model_class)
    if spec.dequantize:
        dtype = _source_dtype(ctx)
        with _stage(ctx, "dequantize", "dequantizing"):
            model = model.dequantize(dtype=dtype)  # explicit dtype: after a save the default one is unreliable
            model.save_pretrained(ctx.workdir / "dequantized")
            _save_preprocessor(ctx, ctx.workdir / "dequantized")
        ctx.dequantized = Dequantized(path="dequantized", dtype=str(dtype).removeprefix("torch."))


def _transformers_config(ctx: BuildContext, spec: Bnb4Bit | Bnb8Bit, model_class):
    """`bnb_config(spec)`, keeping in full precision the 4-bit layers that bitsandbytes' CPU kernel cannot pack
    (`small_output_layers`), found on an empty model swapped as from_pretrained would: the streaming quantizer's
    rule, so both paths write the same config.json."""
    config = bnb_config(spec)
    if not isinstance(spec, Bnb4Bit):
        return config
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    from transformers.quantizers import AutoHfQuantizer

    trust = ctx.loaded.recipe.source.trust_remote_code
    with init_empty_weights():
        model = model_class.from_config(
            AutoConfig.from_pretrained(ctx.source_folder(), trust_remote_code=trust), trust_remote_code=trust
        )
    AutoHfQuantizer.from_config(config, pre_quantized=False).preprocess_model(
        model=model, device_map={"": "cpu"}, checkpoint_files=None, use_kernels=False
    )
    kept = small_output_layers(model)
    return bnb_config(spec, skip_modules_keeping(spec, model, kept)) if kept else config


def _record_sizes(ctx: BuildContext, artifact_bytes: int, layers: dict[str, int], model_class) -> None:
    """The footprints and the quantized layers' serialized size, the same way for both paths."""
    ctx.footprint = Footprint.of(source_footprint(ctx, model_class), artifact_bytes, ctx.plan.expected_footprint_ratio)
    ctx.quantized_layers = serialized_layer_sizes(layers, ctx.workdir)


def _name_offloaded_layers(model, spec: Bnb4Bit | Bnb8Bit) -> None:
    """fp32 CPU offload leaves the cpu-placed Linear layers unquantized. The saved config must name them in
    `llm_int8_skip_modules`, or stock `from_pretrained(folder)` expects int8 weights there and fails to load
    (seen on an H100: `'Parameter' object has no attribute 'CB'`)."""
    import torch

    if not (isinstance(spec, Bnb8Bit) and spec.fp32_cpu_offload):
        return
    config = model.config.quantization_config
    plain = {name for name, module in model.named_modules() if type(module) is torch.nn.Linear}
    config.llm_int8_skip_modules = sorted(set(config.llm_int8_skip_modules or ()) | plain)


def _quantized_layers(model) -> dict[str, int]:
    """Module name -> weight element count of each bitsandbytes Linear in `model`."""
    import bitsandbytes as bnb

    return {
        name: module.in_features * module.out_features
        for name, module in model.named_modules()
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    }


def serialized_layer_sizes(layers: dict[str, int], folder: Path) -> QuantizedLayers:
    """Bytes the quantized layers' weights take in the safetensors files of `folder` (packed weights and their
    quantization state, not biases), and the bits per parameter that makes."""
    sizes: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        sizes.update({tensor.name: tensor.nbytes for tensor in read_header(file)})
    total = 0
    for key, size in sizes.items():
        match = _QUANTIZED_KEY.match(key)
        if match and match["module"] in layers:
            total += size
    parameters = sum(layers.values())
    return QuantizedLayers(
        count=len(layers), parameters=parameters, bytes=total, bits_per_param=round(total * 8 / parameters, 4)
    )


def source_footprint(ctx: BuildContext, model_class) -> int:
    """Memory the source takes loaded unquantized in the recipe's dtype: from the safetensors headers, or from
    an empty (meta-device) model when the source has pickle weights only."""
    dtype = ctx.loaded.recipe.source.dtype
    tensors = ctx.plan.source.tensors
    if tensors:
        wanted = TORCH_DTYPE_BYTES.get(dtype)
        return sum(t.numel * wanted if wanted and t.dtype in FLOAT_DTYPES else t.nbytes for t in tensors)
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        ctx.source_folder(), trust_remote_code=ctx.loaded.recipe.source.trust_remote_code
    )
    with init_empty_weights():
        empty = model_class.from_config(
            config, dtype=_source_dtype(ctx), trust_remote_code=ctx.loaded.recipe.source.trust_remote_code
        )
    return empty.get_memory_footprint()


def _source_dtype(ctx: BuildContext):
    """The source's dtype as torch.dtype: the recipe's, else config.json's, else float32."""
    import torch

    name = ctx.loaded.recipe.source.dtype
    if name == "auto":
        config = ctx.plan.source.config
        name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)


def _save_preprocessor(ctx: BuildContext, folder: Path) -> None:
    copy_sentence_transformers(ctx.source_folder(), folder)
    if not has_tokenizer(ctx.source_folder()):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        ctx.source_folder(), trust_remote_code=ctx.loaded.recipe.source.trust_remote_code
    )
    tokenizer.save_pretrained(folder)


@contextmanager
def _stage(ctx: BuildContext, name: str, doing: str) -> Iterator[None]:
    """Time a stage into `ctx.timings[name]`; turn out-of-memory and disk-full into errors that say what to change."""
    import torch

    start = time.perf_counter()
    try:
        yield
    except Exception as error:
        if isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error):
            raise BuildError(_out_of_memory(ctx, doing, error)) from None
        if not _is_disk_full(error):
            raise
        free = shutil.disk_usage(ctx.workdir).free if ctx.workdir.exists() else 0
        raise BuildError(
            f"disk full while {doing} into {ctx.workdir}: this build needs about "
            f"{_mib(ctx.plan.expected_artifact_bytes)} there and {_mib(free)} is free; free some space or pass "
            "--out with a folder on a disk with room"
        ) from None
    finally:
        ctx.timings[name] = round(time.perf_counter() - start, 3)


def _out_of_memory(ctx: BuildContext, doing: str, error: BaseException) -> str:
    """Which stage ran out of memory where, and what to change in the recipe."""
    first = (str(error).splitlines() or [type(error).__name__])[0]
    if ctx.device.startswith("cuda"):
        fix = (
            'offload part of the model: set `load.device_map: auto` with `load.max_memory` (e.g. {"0": "20GiB", '
            '"cpu": "64GiB"}), or build with --device cpu'
        )
    else:
        fix = (
            "free host memory or build on a host with more; `load.device_map: auto` with `load.max_memory` (e.g. "
            '{"cpu": "8GiB", "disk": "64GiB"}) offloads the rest to disk'
        )
    return f"out of memory while {doing} {ctx.loaded.recipe.source.model} on {ctx.device} ({first}); {fix}"


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC as an OSError, or as the message of a library error that wraps it (safetensors raises its own)."""
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
