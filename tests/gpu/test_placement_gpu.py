"""Provider placement in a real CUDA session (`make test-gpu`, with the `onnx-gpu` extra): a node CUDA has no kernel
for is reported on the CPU while the MatMul beside it runs on CUDA, and a MatMul CUDA cannot run fails the gate.

onnxruntime's docs/OperatorKernels.md lists `Det` (opset 11+, float) for CPUExecutionProvider and not for
CUDAExecutionProvider, and CUDA's `MatMul` for float types only (CPU's also takes int32/int64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builder.steps import ort, placement

pytestmark = pytest.mark.gpu
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


@pytest.fixture(autouse=True)
def _cuda_onnxruntime():
    import onnxruntime

    if CUDA not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime with CUDA: pip install -e '.[onnx-gpu]' (instead of [onnx])")


def _graph(path: Path, dtype, ops: list[str]) -> Path:
    """x (4x4) -> MatMul with a constant weight -> each op of `ops` in turn -> y."""
    import onnx
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weight = numpy_helper.from_array((np.eye(4) * 2).astype(dtype), "weight")
    nodes, last = [helper.make_node("MatMul", ["x", "weight"], ["product"])], "product"
    for i, op in enumerate(ops):
        nodes.append(helper.make_node(op, [last], [f"out{i}"]))
        last = f"out{i}"
    out_shape = [] if ops and ops[-1] == "Det" else [4, 4]
    graph = helper.make_graph(
        nodes,
        "placement",
        [helper.make_tensor_value_info("x", elem, [4, 4])],
        [helper.make_tensor_value_info(last, elem, out_shape)],
        [weight],
    )
    # IR 10: onnx 1.23 writes IR 14 by default, which onnxruntime-gpu 1.31 refuses ("max supported IR version: 13")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _measure(model: Path, dtype):
    session = ort.session(model, CUDA, placement.profiling_options())
    return placement.measure(session, {"x": np.eye(4, dtype=dtype)}, CUDA)


def test_an_op_cuda_lacks_is_reported_on_the_cpu_while_matmul_runs_on_cuda(tmp_path):
    measured = _measure(_graph(tmp_path / "det.onnx", np.float32, ["Det"]), np.float32)
    assert measured.measured_on == CUDA
    assert measured.nodes[CPU] == {"Det": 1}
    assert measured.nodes[CUDA]["MatMul"] == 1
    assert "MatMul" not in measured.nodes[CPU]
    assert placement.failures(measured) == []  # Det is small: reported, not a failure


def test_a_matmul_cuda_cannot_run_fails_the_gate_naming_it(tmp_path):
    measured = _measure(_graph(tmp_path / "int32.onnx", np.int32, []), np.int32)
    assert measured.nodes[CPU].get("MatMul") == 1
    [failure] = placement.failures(measured)
    assert f"1 compute-heavy node(s) ran on {CPU}, not {CUDA}: MatMul x1" in failure["message"]
