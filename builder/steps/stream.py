"""The streaming quantizer: bitsandbytes 4-bit/8-bit builds straight from safetensors shards, one tensor at a time.

The transformers path (`from_pretrained(quantization_config=...)` then `save_pretrained`) materializes the whole
model. This step writes the same artifact without ever holding it: the same tensors (byte for byte on the same
device), the same keys, the same `config.json`. What gets quantized is decided by transformers itself: the model is
built on the meta device and transformers' bitsandbytes quantizer swaps its Linear modules exactly as
`from_pretrained` would; every module it swapped is quantized here with the bitsandbytes calls its parameters use.

Anything that cannot be matched exactly makes `streamable` return a reason, and the build takes the transformers
path instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.checkpoint import copy_sentence_transformers, has_tokenizer, local_weight_files, read_header
from builder.errors import BuildError
from builder.recipe import Bnb4Bit, Recipe
from builder.steps.bnb import bnb_config, skip_modules_keeping, small_output_layers, streaming_refusal
from builder.tasks import AUTO_CLASSES, infer_task

if TYPE_CHECKING:
    import torch

MAX_SHARD_SIZE = 50 * 10**9  # save_pretrained's default max_shard_size ("50GB")


@dataclass
class StreamPlan:
    """What the streaming build writes: per output key, where it comes from and how."""

    model: Any  # the meta model, after transformers' quantizer swapped its modules
    dtype: torch.dtype  # the load dtype (what from_pretrained casts the checkpoint to)
    sources: dict  # checkpoint key -> stream_io.SourceTensor
    keys: list[str]  # the keys save_pretrained writes, in state_dict order
    quantized: dict[str, Any]  # weight key -> its bitsandbytes module (Linear4bit / Linear8bitLt)
    params: dict[str, torch.Tensor]  # key -> the meta tensor (its dtype is the saved dtype)


def streamable(recipe: Recipe, source_dir: Path, task: str | None = None) -> str | None:
    """None when the streaming quantizer reproduces the transformers path for this recipe and model; otherwise
    the reason the build must take the transformers path (`stream_plan` without the plan)."""
    plan = stream_plan(recipe, Path(source_dir), task)
    return plan if isinstance(plan, str) else None


def _recipe_reason(recipe: Recipe, source_dir: Path, task: str | None) -> str | None:
    import json

    config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    return streaming_refusal(recipe, config, has_safetensors=bool(local_weight_files(source_dir)), task=task)


def stream_plan(recipe: Recipe, source_dir: Path, task: str | None = None) -> StreamPlan | str:
    """The meta model with transformers' own module swaps, and every output key's origin; or why the build cannot
    be streamed. `task`: the plan's (None, for a caller without one: the recipe's or the one config.json
    implies)."""
    reason = _recipe_reason(recipe, source_dir, task)
    if reason:
        return reason
    import torch
    import transformers
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers import AutoHfQuantizer

    from builder.steps.stream_io import (
        ST_DTYPES,
        read_source_tensors,  # deferred: stream_io imports torch
    )

    files = local_weight_files(source_dir)
    for info in (t for file in files for t in read_header(file)):
        if info.dtype not in ST_DTYPES:
            return f"tensor {info.name} has dtype {info.dtype}, which the streaming quantizer cannot read"
    sources = read_source_tensors(files)
    config = transformers.AutoConfig.from_pretrained(source_dir)
    spec = recipe.quantize
    assert spec is not None  # _recipe_reason refused a recipe without one
    task = task or recipe.source.task or infer_task(config.architectures)
    assert task is not None  # _recipe_reason refused an unknown task
    auto = getattr(transformers, AUTO_CLASSES[task])
    try:
        cls = transformers.models.auto.auto_factory._get_model_class(config, auto._model_mapping)
    except (KeyError, ValueError):
        return f"transformers has no {AUTO_CLASSES[task]} class for model type {config.model_type!r}"
    # update_dtype is from_pretrained's dtype rule for bitsandbytes (it does not depend on the skipped modules)
    dtype = AutoHfQuantizer.from_config(bnb_config(spec), pre_quantized=False).update_dtype(
        _load_dtype(recipe.source.dtype, config, sources)
    )

    def swapped(skip_modules: list[str]) -> Any:
        """The meta model with transformers' module swaps for `bnb_config(spec, skip_modules)`."""
        quantizer = AutoHfQuantizer.from_config(bnb_config(spec, skip_modules), pre_quantized=False)
        config.quantization_config = quantizer.quantization_config
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("meta"):  # what from_pretrained's init context does, then preprocess_model inside it
                model = cls(config)
                quantizer.preprocess_model(
                    model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None, use_kernels=False
                )
        finally:
            torch.set_default_dtype(previous)
        return model

    model = swapped([])
    if isinstance(spec, Bnb4Bit) and (kept := small_output_layers(model)):
        model = swapped(skip_modules_keeping(spec, model, kept))
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None):
        return f"{cls.__name__} keeps modules in float32 (`_keep_in_fp32_modules`)"
    import bitsandbytes as bnb

    quantized, params = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            if issubclass(getattr(module, "source_cls", torch.nn.Linear), Conv1D):
                return f"{name} is a Conv1D (transposed on quantization)"
            if isinstance(spec, Bnb4Bit):  # transformers' swap leaves the bitsandbytes default (64)
                module.weight.blocksize = spec.blocksize  # type: ignore[attr-defined]  # a Params4bit
            quantized[f"{name}.weight" if name else "weight"] = module
    if not quantized:
        return nothing_quantized(model)
    state = model.state_dict(keep_vars=True)
    ignored = set(getattr(model, "all_tied_weights_keys", {}) or {}) | set(model._keys_to_ignore_on_save or ())
    keys = [key for key in state if key not in ignored]
    for key in keys:
        params[key] = state[key]
    missing = [key for key in keys if key not in sources]
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    for key in (k for k in tied if k in sources and tied[k] in sources):
        if not _same_bytes(sources[key], sources[tied[key]]):
            return f"the checkpoint's {key} differs from {tied[key]}, which it is tied to"
    dropped = _dropped_on_load(model, state, ignored)
    unexpected = [key for key in sources if key not in params and not dropped(key)]
    if missing or unexpected:
        shown = ", ".join((missing or unexpected)[:3])
        what = "lacks" if missing else "has keys the model does not (renamed or dropped on load)"
        return f"the checkpoint {what}: {shown}"
    for key in keys:
        if sources[key].shape != tuple(params[key].shape):
            return f"{key} has shape {sources[key].shape} in the checkpoint, {tuple(params[key].shape)} in the model"
    return StreamPlan(model, dtype, sources, keys, quantized, params)


def _same_bytes(a: Any, b: Any) -> bool:
    """Whether two source tensors hold the same bytes (a tied head saved as a copy of the embeddings)."""
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    with open(a.file, "rb") as first, open(b.file, "rb") as second:
        first.seek(a.offset)
        second.seek(b.offset)
        done = 0
        while done < a.nbytes:
            size = min(1 << 24, a.nbytes - done)
            if first.read(size) != second.read(size):
                return False
            done += size
    return True


NOTHING_QUANTIZED = "no Linear layer would be quantized"


def nothing_quantized(model: Any) -> str:
    """Why transformers' module swap quantized nothing: settings that skip every layer, or linear layers of a
    torch.nn.Linear subclass, which its bitsandbytes integration does not convert (`type(module) is nn.Linear`)."""
    import torch

    subclasses = sorted(
        {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear}
    )
    if subclasses:
        return (
            f"{NOTHING_QUANTIZED}: {type(model).__name__}'s linear layers are {', '.join(subclasses)}, a "
            "subclass of torch.nn.Linear that transformers' bitsandbytes integration does not convert"
        )
    return f"{NOTHING_QUANTIZED} with these settings (all skipped); check `quantize.skip_modules`"


def _dropped_on_load(model: Any, state: dict, ignored: set[str]):
    """from_pretrained's rule for checkpoint keys the model does not load, which save_pretrained then does not
    write: non-persistent buffers (BERT's `embeddings.position_ids`), a tied head's copy of the embeddings (checked
    equal by the caller), and
    the model's `_keys_to_ignore_on_load_unexpected` patterns."""
    import re

    buffers = {name for name, _ in model.named_buffers()} - set(state)
    patterns = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    return lambda key: key in buffers or key in ignored or any(p.search(key) for p in patterns)


def _load_dtype(dtype: str, config: Any, sources: dict) -> torch.dtype:
    """from_pretrained's `dtype` rule: a named dtype, or for `auto` the config's, else the first floating
    checkpoint tensor's."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if found is not None:
        return getattr(torch, found) if isinstance(found, str) else found
    return next((s.dtype for s in sources.values() if s.dtype.is_floating_point), torch.get_default_dtype())


def stream_build(
    recipe: Recipe,
    source_dir: Path,
    workdir: Path,
    device: str = "cpu",
    *,
    max_shard_size: int = MAX_SHARD_SIZE,
    plan: StreamPlan | None = None,
) -> dict:
    """Quantize `source_dir` per `recipe` into `workdir` on `device`, tensor by tensor; returns counts and sizes.
    `plan`: the `stream_plan` already made for them (else made here). Raises `BuildError` when the build cannot be
    streamed (see `streamable`)."""
    import torch

    from builder.steps.stream_io import Engine, ShardWriter  # deferred: stream_io imports torch

    source_dir, workdir = Path(source_dir), Path(workdir)
    started = time.perf_counter()
    planned_or_reason = plan or stream_plan(recipe, source_dir)
    planned = time.perf_counter()
    if isinstance(planned_or_reason, str):
        raise BuildError(f"this build cannot be streamed: {planned_or_reason}; build it through the transformers path")
    plan = planned_or_reason
    outputs = {key: _outputs(plan, key) for key in plan.keys}
    shards = _split(plan.keys, outputs, max_shard_size)
    workdir.mkdir(parents=True, exist_ok=True)
    writers, shard_of = [], {}
    for filename, keys in shards:
        writers.append(ShardWriter(workdir / filename, [o for k in keys for o in outputs[k]], {"format": "pt"}))
        shard_of.update(dict.fromkeys(keys, writers[-1]))
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and torch_device.index is None:
        torch_device = torch.device("cuda", torch.cuda.current_device())
    largest = max((plan.sources[k].nbytes for k in plan.quantized), default=1)
    on_cuda = torch_device.type == "cuda"
    engine = Engine(
        torch_device,
        largest,
        buffers=6 if on_cuda else 3,
        readers=4 if on_cuda else 2,
        workers=2,
        writers=4 if on_cuda else 2,
    )
    try:
        try:
            order = sorted(plan.keys, key=lambda k: (k in plan.quantized, plan.sources[k].file, plan.sources[k].offset))
            for key in order:
                source, writer = plan.sources[key], shard_of[key]
                if key in plan.quantized:
                    engine.quantize(source, _quantize_fn(plan, key), _write_all(writer))
                elif source.dtype == plan.params[key].dtype:
                    engine.copy(writer, key, source)
                else:
                    engine.convert(writer, key, source, plan.params[key].dtype)
        finally:
            engine.wait()  # on failure too: no worker thread outlives the build
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    sizes = [writer.finish() for writer in writers]
    if len(shards) > 1:
        _write_index(workdir, plan, outputs, shards)
    streamed = time.perf_counter()
    _write_configs(plan, source_dir, workdir)
    timings = {"plan": planned - started, "tensors": streamed - planned, "configs": time.perf_counter() - streamed}
    state = set(plan.model.state_dict(keep_vars=True))
    footprint = sum(outputs[key][0].nbytes for key in plan.keys) + sum(
        b.numel() * b.element_size() for name, b in plan.model.named_buffers() if name not in state
    )
    return {
        "tensors": sum(len(o) for o in outputs.values()),
        "shards": len(shards),
        "weights_bytes": sum(sizes),
        "timings": {name: round(seconds, 3) for name, seconds in timings.items()},
        "memory_footprint": footprint,  # what get_memory_footprint() says of the loaded quantized model
        "layers": {key.removesuffix(".weight"): plan.params[key].numel() for key in plan.quantized},
    }


def _outputs(plan: StreamPlan, key: str) -> list:
    """The tensors save_pretrained writes for one state_dict key (several for a quantized weight)."""
    import torch

    from builder.steps.stream_io import OutTensor  # deferred: stream_io imports torch

    param = plan.params[key]
    module = plan.quantized.get(key)
    if module is None:
        return [OutTensor(key, param.dtype, tuple(param.shape))]
    n = param.numel()
    prefix = key.removesuffix("weight")
    if hasattr(module, "quant_state"):  # Linear4bit
        weight = module.weight
        blocks = -(n // -weight.blocksize)
        storage = weight.quant_storage
        result = [OutTensor(key, storage, ((n + 1) // (storage.itemsize * 2), 1))]
        if weight.compress_statistics:
            result += [
                OutTensor(f"{key}.absmax", torch.uint8, (blocks,)),
                OutTensor(f"{key}.quant_map", torch.float32, (16,)),
                OutTensor(f"{key}.nested_absmax", torch.float32, (-(blocks // -256),)),
                OutTensor(f"{key}.nested_quant_map", torch.float32, (256,)),
            ]
        else:
            result += [
                OutTensor(f"{key}.absmax", torch.float32, (blocks,)),
                OutTensor(f"{key}.quant_map", torch.float32, (16,)),
            ]
        return result + [OutTensor(f"{key}.quant_state.bitsandbytes__{weight.quant_type}", torch.uint8, None)]
    rows = param.shape[0]
    return [
        OutTensor(key, torch.int8, tuple(param.shape)),
        OutTensor(f"{prefix}SCB", torch.float32, (rows,)),
        OutTensor(f"{prefix}weight_format", torch.uint8, ()),
    ]


def _quantize_fn(plan: StreamPlan, key: str):
    """tensor on the device, in the checkpoint's dtype -> {output key: tensor}, with the exact bitsandbytes calls
    of Params4bit._quantize / Int8Params._quantize on a tensor loaded in the load dtype."""
    import bitsandbytes as bnb
    import torch

    module, dtype = plan.quantized[key], plan.dtype
    prefix = key.removesuffix("weight")
    if hasattr(module, "quant_state"):
        weight = module.weight

        def quantize_4bit(tensor: torch.Tensor) -> dict:
            packed, state = bnb.functional.quantize_4bit(
                tensor.to(dtype).contiguous(),
                blocksize=weight.blocksize,
                compress_statistics=weight.compress_statistics,
                quant_type=weight.quant_type,
                quant_storage=weight.quant_storage,
            )
            result = {key: packed}
            result.update({f"{key}.{name}": value for name, value in state.as_dict(packed=True).items()})
            return result

        return quantize_4bit

    def quantize_8bit(tensor: torch.Tensor) -> dict:
        scaled, scales, _ = bnb.functional.int8_vectorwise_quant(tensor.to(dtype).contiguous().to(torch.float16))
        return {key: scaled, f"{prefix}SCB": scales, f"{prefix}weight_format": torch.tensor(0, dtype=torch.uint8)}

    return quantize_8bit


def _write_all(writer):
    def write(tensors: dict) -> None:
        for name, tensor in tensors.items():
            writer.write(name, tensor)

    return write


def _split(keys: list[str], outputs: dict, max_shard_size: int) -> list[tuple[str, list[str]]]:
    """save_pretrained's sharding (huggingface_hub's split): fill a shard in state_dict order until the next
    key would pass `max_shard_size`; one file is model.safetensors, several are model-0000i-of-0000n."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = sum(o.nbytes if o.shape is not None else 256 for o in outputs[key])
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    if len(shards) == 1:
        return [("model.safetensors", shards[0])]
    return [(f"model-{i:05d}-of-{len(shards):05d}.safetensors", keys) for i, keys in enumerate(shards, 1)]


def _write_index(workdir: Path, plan: StreamPlan, outputs: dict, shards: list) -> None:
    import json

    from builder.steps.stream_io import read_source_tensors  # deferred: stream_io imports torch

    written = read_source_tensors(workdir / filename for filename, _ in shards)
    weight_map = {name: tensor.file.name for name, tensor in written.items()}
    parameters = sum(o.nbytes // o.dtype.itemsize for k in plan.keys for o in outputs[k][:1])
    index = {
        "metadata": {"total_parameters": parameters, "total_size": sum(t.nbytes for t in written.values())},
        "weight_map": weight_map,
    }
    (workdir / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _write_configs(plan: StreamPlan, source_dir: Path, workdir: Path) -> None:
    """config.json and generation_config.json as save_pretrained writes them, the tokenizer files and a
    sentence-transformers source's module files."""
    from transformers import GenerationConfig

    model = plan.model
    model.config.dtype = str(plan.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(workdir)
    if model.can_generate():
        # from_pretrained's rule (GenerationMixin.adjust_generation_fn): the file, else one built from config.json
        if (source_dir / "generation_config.json").is_file():
            generation = GenerationConfig.from_pretrained(source_dir)
        else:
            generation = GenerationConfig.from_pretrained(
                source_dir, config_file_name="config.json", _from_model_config=True
            )
        generation.save_pretrained(workdir)
    if has_tokenizer(source_dir):  # saved beside the weights, as the transformers path does
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source_dir).save_pretrained(workdir)
    copy_sentence_transformers(source_dir, workdir)
