"""Which execution provider runs which nodes of an onnxruntime session, and the gate's rule on it.

onnxruntime assigns every node of the graph it optimized to one provider when the session is created; a node the
requested provider has no kernel for (that op, that opset, those input types) goes to CPUExecutionProvider without
an error, so a session whose first provider is CUDA can run half the graph on the CPU. The assignment is read from
onnxruntime's profiler: one profiled run lists each node it executed with `args.provider` and `args.op_name`, after
the session's own graph optimizations, so the counts are of what the session really runs (a fused `FusedMatMul`, a
TensorRT or MIGraphX subgraph as the one compiled node it became), not of the nodes in model.onnx.

`profiling_options` goes into the verification session, `measure` runs it once and returns the counts, `failures` is
the gate's rule. The shape of the record is `builder.artifact.NodePlacement`'s.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections import Counter
from pathlib import Path

from builder.recipe import GPU_PROVIDERS
from builder.steps import ort
from builder.verification import NodePlacement

CPU = "CPUExecutionProvider"
# The ops whose cost grows with the weights or with the sequence squared: matrix products (float, int8, 4-bit
# weight-only), convolutions, attention and recurrences. They hold nearly all of a model's arithmetic and weight
# bytes, so one of them on the CPU in a GPU session means the CPU does the model's work, or its weights cross the bus
# every run. Every other op that lands on the CPU is small and is reported without failing the gate: onnxruntime puts
# shape arithmetic (Shape, Gather and Concat of int64 dims, Range) on the CPU in a CUDA session on purpose.
COMPUTE_HEAVY = frozenset(
    {
        # ai.onnx
        "MatMul",
        "Gemm",
        "MatMulInteger",
        "QLinearMatMul",
        "Conv",
        "ConvTranspose",
        "ConvInteger",
        "QLinearConv",
        "Einsum",
        "Attention",
        "LSTM",
        "GRU",
        "RNN",
        # com.microsoft (onnxruntime's fusions and quantized operators)
        "FusedMatMul",
        "FusedGemm",
        "FusedConv",
        "MatMulNBits",
        "MatMulBnb4",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "QAttention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "PackedAttention",
        "PackedMultiHeadAttention",
        "DecoderMaskedMultiHeadAttention",
        "DecoderMaskedSelfAttention",
        "SparseAttention",
    }
)


def profiling_options():
    """Session options (quiet, as `ort.quiet_options`) that profile the session into a fresh temporary folder,
    which `measure` reads and deletes."""
    options = ort.quiet_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="builder-placement-")) / "profile")
    return options


def measure(session, feed: dict, provider: str) -> NodePlacement:
    """Run `session` (created with `profiling_options`, for `provider`) once on `feed` and count the nodes each
    provider executed, by op type. Ends the profiling, so later runs are not slowed by it."""
    session.run(None, feed)
    written = session.end_profiling()
    if not written:
        raise ValueError("placement.measure needs a session created with placement.profiling_options()")
    profile = Path(written)
    try:
        events = json.loads(profile.read_text(encoding="utf-8"))
    finally:
        profile.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            profile.parent.rmdir()  # the folder `profiling_options` made, empty now
    return NodePlacement(measured_on=provider, nodes=count_nodes(events))


def count_nodes(events: list[dict]) -> dict[str, dict[str, int]]:
    """Provider -> op type -> nodes, from onnxruntime profiling events. A node counts once however often it ran (the
    body of a Loop runs many times); providers and op types are sorted, for a stable manifest."""
    seen: dict[str, tuple[str, str]] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and "provider" in args:
            seen[event["name"]] = (args["provider"], args["op_name"])
    counts: dict[str, Counter] = {}
    for provider, op_type in seen.values():
        counts.setdefault(provider, Counter())[op_type] += 1
    return {provider: dict(sorted(counts[provider].items())) for provider in sorted(counts)}


def failures(placement: NodePlacement) -> list[dict]:
    """The gate's rule: a session for a GPU provider must not leave compute-heavy nodes to the CPU. One failure
    naming those op types and counts, or none. A session measured on the CPU provider never fails: a build that
    `export.verify_on: CPUExecutionProvider` verified on the CPU runs there by design."""
    if placement.measured_on not in GPU_PROVIDERS:
        return []
    on_cpu = {op: n for op, n in placement.nodes.get(CPU, {}).items() if op in COMPUTE_HEAVY}
    if not on_cpu:
        return []
    provider, total = placement.measured_on, sum(on_cpu.values())
    named = ", ".join(f"{op} x{n}" for op, n in sorted(on_cpu.items(), key=lambda item: (-item[1], item[0])))
    return [
        {
            "metric": "placement",
            "value": total,
            "threshold": 0,
            "message": f"placement: {total} compute-heavy node(s) ran on {CPU}, not {provider}: {named}. "
            f"onnxruntime's {provider} has no kernel for them at this opset and these types, and fell back to the "
            f"CPU silently, so the artifact would run partly on the CPU. Check onnxruntime's docs/OperatorKernels.md "
            f"for what {provider} implements and export so that the graph uses it (another `export.dtype`, "
            "`export.quantize` or `export.opset`), or target CPUExecutionProvider",
        }
    ]
