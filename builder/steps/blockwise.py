"""Run a model larger than the GPU: its decoder blocks stay in host memory and each is onloaded just for its forward.

`offload_blocks(model, device)` puts everything but the decoder blocks (embeddings, final norm, head, rotary tables)
on `device` and hooks every block: before its forward, its tensors are copied to `device`; after it, the host
tensors are put back (nothing is copied back). The model's own forward and `generate` run unchanged, so the outputs
are the whole-model path's up to the order of floating-point operations. The tensors moved are the parameters and
buffers, and bitsandbytes' extra ones: a 4-bit weight's quant state (copied whole, as a CPU forward repacks it in
place) and an 8-bit weight's CB/SCB, also where `Linear8bitLt` keeps them in its matmul state after a first
forward. Restoring exactly what was there before the forward makes that first-forward conversion happen again each
time, on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Offload:
    """What `offload_blocks` did: the blocks it hooks, bytes kept on the device, the largest block's bytes and how
    many times a block was onloaded."""

    blocks: int
    resident_bytes: int
    largest_block_bytes: int
    onloads: int = 0
    peak_onloaded_bytes: int = 0
    _onloaded: int = field(default=0, repr=False)

    def as_json(self) -> dict:
        return {
            "blocks": self.blocks,
            "resident_bytes": self.resident_bytes,
            "largest_block_bytes": self.largest_block_bytes,
            "onloads": self.onloads,
            "peak_onloaded_bytes": self.peak_onloaded_bytes,
        }


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
        record.onloads += 1
        record._onloaded += size
        record.peak_onloaded_bytes = max(record.peak_onloaded_bytes, record._onloaded)

    def offload(module, args, kwargs, output):
        size, slots = saved.pop()
        record._onloaded -= size
        for holder, name, tensor in slots:
            _set(holder, name, tensor)

    block.register_forward_pre_hook(onload, with_kwargs=True)
    block.register_forward_hook(offload, with_kwargs=True)
