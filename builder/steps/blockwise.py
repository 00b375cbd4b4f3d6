"""Run a model larger than the GPU: each decoder block is put on the device just for its forward.

`load_by_blocks(load, model_class, folder, device)` loads everything but the decoder blocks (embeddings, final
norm, head, rotary tables) on `device` and leaves the blocks' tensors in the checkpoint's safetensors files (on the
meta device, transformers' disk offload, whose index names each tensor's file). Before a block's forward, its
tensors are read from the files (`safe_open`, memory-mapped), cast to the dtype transformers would load them in and
put on `device`; after it, the block is back on the meta device. Host memory holds one block plus the resident
modules at any depth, not the whole model.

A bitsandbytes checkpoint (the candidate of a 4-bit or 8-bit build) cannot load that way (transformers refuses disk
offload of quantized weights), so it is loaded on the host and `offload_blocks(model, device)` hooks its blocks:
before a forward, the block's host tensors are copied to `device`; after it, the host tensors are put back (nothing
is copied back). The tensors moved are the parameters and buffers, and bitsandbytes' extra ones: a 4-bit weight's
quant state (copied whole, as a CPU forward repacks it in place) and an 8-bit weight's CB/SCB, also where
`Linear8bitLt` keeps them in its matmul state after a first forward. Restoring exactly what was there before the
forward makes that first-forward conversion happen again each time, on the device.

Either way the model's own forward and `generate` run unchanged, so the outputs are the whole-model path's up to the
order of floating-point operations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Offload:
    """What `load_by_blocks` or `offload_blocks` did: where the blocks are read from (`files`: the safetensors
    files, `host`: host memory), the blocks hooked, bytes kept on the device, the largest block's bytes, how many
    times a block was onloaded, and the most bytes and blocks on the device at once."""

    blocks: int
    resident_bytes: int
    largest_block_bytes: int
    read_from: str
    onloads: int = 0
    peak_onloaded_bytes: int = 0
    peak_onloaded_blocks: int = 0
    _onloaded: int = field(default=0, repr=False)
    _onloaded_blocks: int = field(default=0, repr=False)

    def as_json(self) -> dict:
        return {
            "read_from": self.read_from,
            "blocks": self.blocks,
            "resident_bytes": self.resident_bytes,
            "largest_block_bytes": self.largest_block_bytes,
            "onloads": self.onloads,
            "peak_onloaded_bytes": self.peak_onloaded_bytes,
            "peak_onloaded_blocks": self.peak_onloaded_blocks,
        }

    def onloaded(self, size: int) -> None:
        self.onloads += 1
        self._onloaded += size
        self._onloaded_blocks += 1
        self.peak_onloaded_bytes = max(self.peak_onloaded_bytes, self._onloaded)
        self.peak_onloaded_blocks = max(self.peak_onloaded_blocks, self._onloaded_blocks)

    def offloaded(self, size: int) -> None:
        self._onloaded -= size
        self._onloaded_blocks -= 1


def decoder_blocks(model):
    """The model's decoder blocks: its longest ModuleList (model.layers, transformer.h, encoder.layer, ...)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of blocks to run one at a time")
    return max(lists, key=len)


def _slots(module, recurse: bool = True) -> list[tuple[object, str]]:
    """(holder, attribute) of every tensor `module` (and its children, with `recurse`) uses, bitsandbytes' state
    included."""
    slots: list[tuple[object, str]] = []
    for sub in module.modules() if recurse else (module,):
        for _name, param in sub.named_parameters(recurse=False):
            slots.append((param, "data"))
            if getattr(param, "quant_state", None) is not None:
                slots.append((param, "quant_state"))
            slots += [(param, a) for a in ("CB", "SCB") if getattr(param, a, None) is not None]
        for name in sub._buffers:
            if sub._buffers[name] is not None:
                slots.append((sub._buffers, name))
        matmul_state = getattr(sub, "state", None)
        if matmul_state is not None and hasattr(matmul_state, "CB"):
            slots += [(matmul_state, "CB"), (matmul_state, "SCB")]
    return slots


def _get(holder, name):
    return holder[name] if isinstance(holder, dict) else getattr(holder, name)


def _set(holder, name, value) -> None:
    if isinstance(holder, dict):
        holder[name] = value
    else:
        setattr(holder, name, value)


def _tensors(value) -> list:
    """A slot's tensors: itself, or a 4-bit quant state's statistics."""
    if value is None:
        return []
    if hasattr(value, "absmax"):
        nested = getattr(value, "state2", None)
        return [
            t
            for t in (
                value.absmax,
                value.code,
                getattr(value, "offset", None),
                getattr(nested, "absmax", None),
                getattr(nested, "code", None),
            )
            if t is not None
        ]
    return [value]


def _identity(holder, name, value) -> int:
    """Which object a slot holds: `param.data` is a new tensor at every access, so a parameter is its own identity
    (a tied weight is one parameter in two modules)."""
    return id(holder) if name == "data" else id(value)


def _nbytes(module, recurse: bool = True) -> int:
    seen, total = {}, 0
    for holder, name in _slots(module, recurse):
        value = _get(holder, name)
        if _identity(holder, name, value) not in seen:
            seen[_identity(holder, name, value)] = (holder, value)  # kept alive: ids stay unique
            total += sum(t.numel() * t.element_size() for t in _tensors(value))
    return total


def _copy_to(value, device, pin: bool):
    """A tensor (or a 4-bit quant state, copied whole: a CPU forward repacks it in place) on `device`."""
    import copy

    if hasattr(value, "absmax"):
        state = copy.deepcopy(value)
        state.to(device)
        return state
    target = value.to(device)
    return target.pin_memory() if pin and target.device.type == "cpu" and not target.is_pinned() else target


def _move(module, device, pin: bool, recurse: bool = True) -> None:
    """Move every slot of `module` to `device`; a tensor shared by two slots stays shared."""
    moved: dict[int, tuple] = {}
    for holder, name in _slots(module, recurse):
        value = _get(holder, name)
        if value is None:
            continue
        identity = _identity(holder, name, value)
        if identity not in moved:
            moved[identity] = (holder, value, _copy_to(value, device, pin))  # kept alive: ids stay unique
        _set(holder, name, moved[identity][2])


def offload_blocks(model, device: str) -> Offload:
    """Keep `model`'s decoder blocks on the host and onload each to `device` for its forward (see the module
    docstring); everything else moves to `device` now. The model must be on the CPU."""
    import torch

    blocks = decoder_blocks(model)
    on_cuda = torch.device(device).type == "cuda"
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    resident = [m for m in model.modules() if id(m) not in in_blocks and m is not blocks]
    for module in resident:
        _move(module, device, pin=False, recurse=False)
    for block in blocks:
        _move(block, "cpu", pin=on_cuda)  # pinned host memory: the copies to the GPU run at full speed
    record = Offload(
        blocks=len(blocks),
        resident_bytes=sum(_nbytes(m, recurse=False) for m in resident),
        largest_block_bytes=max(_nbytes(b) for b in blocks),
        read_from="host",
    )
    for block in blocks:
        _hook(block, device, record)
    return record


def _hook(block, device: str, record: Offload) -> None:
    saved: list = []

    def onload(module, args, kwargs):
        size = _nbytes(module)
        saved.append((size, [(holder, name, _get(holder, name)) for holder, name in _slots(module)]))
        _move(module, device, pin=False)
        record.onloaded(size)

    def offload(module, args, kwargs, output):
        size, slots = saved.pop()
        record.offloaded(size)
        for holder, name, tensor in slots:
            _set(holder, name, tensor)

    block.register_forward_pre_hook(onload, with_kwargs=True)
    block.register_forward_hook(offload, with_kwargs=True)


def load_by_blocks(
    load: Callable[..., object], model_class, folder: str, device: str, scratch: str | None
) -> tuple[object, Offload]:
    """(model, record): `folder` as `load(device_map, **from_pretrained_options)` loads it (`dtype` and all), run
    block by block on `device`: its blocks read from the safetensors files at each forward, or, for a bitsandbytes
    checkpoint, kept on the host (see the module docstring). A block weight that transformers converts on load
    (fused experts, ...) is read from a copy it writes under `scratch`, which must outlive the model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        model = load("cpu")
        return model, offload_blocks(model, device)
    with init_empty_weights():
        skeleton = model_class.from_config(config)
    model = load(_blocks_on_disk(skeleton, device), offload_folder=scratch)
    return model, _read_blocks_from_files(model, device)


def _blocks_on_disk(skeleton, device: str) -> dict[str, str]:
    """A device map that leaves the decoder blocks in the files ("disk") and puts every other module on `device`:
    the blocks' list, and the siblings of each module on the path to it."""
    blocks = decoder_blocks(skeleton)
    path = next(name for name, module in skeleton.named_modules() if module is blocks)
    device_map = {path: "disk"}
    parts = path.split(".")
    for depth, step in enumerate(parts):
        prefix = ".".join(parts[:depth])
        parent = skeleton.get_submodule(prefix)
        if next(parent.named_parameters(recurse=False), None) or any(b is not None for b in parent._buffers.values()):
            raise ValueError(f"{prefix or 'the model'} holds tensors beside its blocks: it cannot run block by block")
        for name, _child in parent.named_children():
            if name != step:
                device_map[f"{prefix}.{name}" if prefix else name] = device
    return device_map


def _read_blocks_from_files(model, device: str) -> Offload:
    """Replace accelerate's hooks on `model`'s blocks (left on the meta device by a disk device map) with ours:
    a block's tensors read from the files for its forward, the meta ones put back after it."""
    from accelerate.hooks import remove_hook_from_submodules

    # transformers' disk offload index (name -> file, key in it, dtype) is kept only by accelerate's hooks: each
    # offloaded module's weights map is a prefixed view of one loader holding it.
    index = next(
        (
            m._hf_hook.weights_map.dataset.index
            for m in model.modules()
            if getattr(m, "_hf_hook", None) is not None and getattr(m._hf_hook, "weights_map", None) is not None
        ),
        None,
    )
    if index is None:
        raise ValueError("transformers left no index of the blocks' weights in their files: they cannot be read")
    remove_hook_from_submodules(model)
    blocks = decoder_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    in_blocks = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    resident = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in in_blocks]
    if any(t.device.type == "meta" for t in resident):
        raise ValueError("some of the model's tensors outside its decoder blocks were not loaded")
    reads = [_block_reads(block, f"{prefix}.{number}.", index) for number, block in enumerate(blocks)]
    record = Offload(
        blocks=len(blocks),
        resident_bytes=sum(t.numel() * t.element_size() for t in resident),
        largest_block_bytes=max(sum(size for *_, size in block) for block in reads),
        read_from="files",
    )
    for block, block_reads in zip(blocks, reads, strict=True):
        _hook_reads(block, block_reads, device, record)
    return record


_Read = tuple[dict, str, str, str, int]
"""Where one of a block's tensors goes and comes from: (its module's `_parameters` or `_buffers`, its name there,
file, key in the file, bytes)."""


def _block_reads(block, prefix: str, index: dict) -> list[_Read]:
    reads = []
    for module_name, module in block.named_modules():
        for holder in (module._parameters, module._buffers):
            for name, tensor in holder.items():
                if tensor is None or tensor.device.type != "meta":
                    continue
                qualified = f"{prefix}{module_name}.{name}" if module_name else f"{prefix}{name}"
                if qualified not in index:
                    raise ValueError(f"{qualified} is in none of the checkpoint's safetensors files")
                entry = index[qualified]
                reads.append(
                    (
                        holder,
                        name,
                        entry["safetensors_file"],
                        entry.get("weight_name", qualified),
                        tensor.numel() * tensor.element_size(),
                    )
                )
    return reads


def _hook_reads(block, reads: list[_Read], device: str, record: Offload) -> None:
    import torch
    from safetensors import safe_open

    size = sum(read[-1] for read in reads)
    by_file: dict[str, list[_Read]] = {}
    for read in reads:
        by_file.setdefault(read[2], []).append(read)
    saved: list[list[tuple[dict, str, object]]] = []

    def onload(module, args, kwargs):
        meta = [(holder, name, holder[name]) for holder, name, *_ in reads]
        for file, file_reads in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as weights:  # mapped while open: the block's pages
                for holder, name, _file, key, _size in file_reads:
                    placeholder = holder[name]
                    tensor = weights.get_tensor(key).to(dtype=placeholder.dtype).to(device)
                    is_parameter = isinstance(placeholder, torch.nn.Parameter)
                    holder[name] = torch.nn.Parameter(tensor, requires_grad=False) if is_parameter else tensor
        saved.append(meta)
        record.onloaded(size)

    def offload(module, args, kwargs, output):
        for holder, name, placeholder in saved.pop():
            holder[name] = placeholder
        record.offloaded(size)

    block.register_forward_pre_hook(onload, with_kwargs=True)
    block.register_forward_hook(offload, with_kwargs=True)
