"""onnxruntime side of the ONNX export: provider checks, the transformer optimizer, float16 and int8 conversion.

Every function here works on an ONNX file in the build's work folder and rewrites it in place. onnxruntime and onnx
are imported inside the functions (the core install has neither).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
from dataclasses import dataclass
from pathlib import Path

from builder.console import show_progress
from builder.errors import BuildError

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"
# protobuf's hard limit: a larger graph keeps its tensors in EXTERNAL_DATA_FILE (optimum's layout).
PROTOBUF_LIMIT = 2 * 1024**3
# Encoders whose graphs onnxruntime's BERT fusions understand; every other decoder uses the GPT-2 fusions (as
# optimum's ORTOptimizer does for Llama-like models).
_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet", "albert", "deberta")
_GPU_HINT = {
    "CUDAExecutionProvider": "pip install onnxruntime-gpu (instead of onnxruntime)",
    "TensorrtExecutionProvider": "pip install onnxruntime-gpu (instead of onnxruntime) and the TensorRT libraries",
    "ROCMExecutionProvider": "install onnxruntime's ROCm build (onnxruntime-rocm from AMD's package index)",
}


@dataclass(frozen=True)
class Placement:
    """Where the graph was checked: the target provider, the provider that really ran it, and why they differ."""

    target: str
    verified_on: str
    reason: str | None = None

    def as_json(self) -> dict:
        return {
            "provider": self.target,
            "verified_on": self.verified_on,
            "target_checked": self.target == self.verified_on,
            "fallback_reason": self.reason,
        }


def provider_problem(provider: str, model: Path) -> str | None:
    """Why `provider` cannot run `model` on this host, or None when a session's first provider is `provider`.

    onnxruntime-gpu lists CUDA as available on a host without a GPU and silently runs on the CPU; that counts as a
    problem here, so the check opens a real session and reads `get_providers()[0]`.
    """
    import onnxruntime as ort

    _load_cuda_libraries(ort, provider)
    if provider not in ort.get_available_providers():
        return f"this onnxruntime build ({_ort_package()}) lacks {provider}; {_GPU_HINT.get(provider, '')}".rstrip("; ")
    try:
        session = ort.InferenceSession(str(model), providers=[provider], sess_options=quiet_options())
    except Exception as error:  # noqa: BLE001 (onnxruntime's Fail/RuntimeException for missing libraries)
        return f"{provider} failed to start: {str(error).splitlines()[0][:300]}"
    ran_on = session.get_providers()[0]
    if ran_on == provider:
        return None
    if provider == "TensorrtExecutionProvider" and _cuda_visible():
        return (
            "the TensorRT libraries (libnvinfer) are missing, so onnxruntime fell back to "
            f"{ran_on}; install TensorRT matching onnxruntime-gpu"
        )
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return f"no CUDA GPU is visible, so onnxruntime fell back to {ran_on}"
    if provider == "ROCMExecutionProvider":
        return f"no ROCm GPU is visible, so onnxruntime fell back to {ran_on}"
    return f"onnxruntime ran the graph on {ran_on} instead"


def preflight(target: str, verify_on: str | None) -> None:
    """Before exporting: refuse a target this onnxruntime build does not even list, unless `verify_on` is set."""
    import onnxruntime as ort

    if verify_on is None and target not in ort.get_available_providers():
        raise BuildError(
            f"cannot verify on {target}: this onnxruntime build ({_ort_package()}) lacks {target}; "
            f"{_GPU_HINT.get(target, '')}. Build on a host that has it, or set "
            "`export.verify_on: CPUExecutionProvider` to verify there (the manifest records it)"
        )


def place(target: str, verify_on: str | None, model: Path) -> Placement:
    """The provider the graph is verified on: the target when it runs here, else `verify_on`.

    Raises `BuildError` with the reason when neither is possible."""
    problem = provider_problem(target, model)
    if problem is None:
        return Placement(target, target)
    if verify_on is None or verify_on == target:
        raise BuildError(
            f"cannot verify on {target}: {problem}. Build on a host that has it, or set "
            "`export.verify_on: CPUExecutionProvider` to verify there (the manifest records it)"
        )
    fallback = provider_problem(verify_on, model)
    if fallback is not None:
        raise BuildError(f"cannot verify on {target} ({problem}) nor on export.verify_on {verify_on} ({fallback})")
    return Placement(target, verify_on, problem)


def session(model: Path, provider: str, options=None):
    """An onnxruntime session that really runs on `provider` (checked), for verification; `options` are its
    SessionOptions (default `quiet_options()`)."""
    import onnxruntime as ort

    _load_cuda_libraries(ort, provider)
    created = ort.InferenceSession(str(model), providers=[provider], sess_options=options or quiet_options())
    if created.get_providers()[0] != provider:
        raise BuildError(
            f"onnxruntime ran {model.name} on {created.get_providers()[0]}, not {provider}; "
            f"{provider_problem(provider, model) or 'check the onnxruntime install'}"
        )
    return created


def _load_cuda_libraries(ort, provider: str) -> None:
    """onnxruntime-gpu finds the CUDA/cuDNN libraries that torch's wheels ship only after `preload_dlls()` (1.21+);
    without it the CUDA provider fails to start on hosts that have no system-wide CUDA install."""
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def quiet_options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


def _ort_package() -> str:
    for name in ("onnxruntime-gpu", "onnxruntime-rocm", "onnxruntime"):
        if _installed(name):
            return name
    return "onnxruntime"


def _installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def _cuda_visible() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def save(model, path: Path) -> None:
    """Write an onnx ModelProto as optimum does: one file, or `model.onnx_data` beside it past protobuf's 2 GB."""
    import onnx

    for stale in (path, path.with_name(EXTERNAL_DATA_FILE)):
        stale.unlink(missing_ok=True)
    large = model.ByteSize() > PROTOBUF_LIMIT if _fits_protobuf(model) else True
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_FILE,
        size_threshold=1024,
    )


def _fits_protobuf(model) -> bool:
    try:
        model.ByteSize()
        return True
    except ValueError:
        return False


def load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def fusion_model_type(model_type: str) -> str:
    """The onnxruntime.transformers optimizer model type for a transformers `model_type`."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    if model_type in MODEL_TYPES:
        return model_type
    return "bert" if model_type in _BERT_LIKE else "gpt2"


def optimize(path: Path, level: str, config: dict) -> dict:
    """Rewrite `path` with onnxruntime's transformer optimizer; returns what was applied.

    O1: onnxruntime's basic (provider-independent) graph optimizations only. O2: O1 + the transformer fusions
    (attention, layer norm, GELU, skip layer norm, ...): onnxscript's rewrites for torch.export graphs
    (`_fuse_for_ort`), then onnxruntime's optimizer, whose patterns are TorchScript exports'. O3: O2 + GELU
    approximation. O4: O3 + float16 with float32 inputs/outputs (GPU providers). Offline optimization stays at
    onnxruntime level 1, so the file runs on any provider; the provider applies its own level-99 fusions when it
    loads the graph.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    if level != "O1":
        _fuse_for_ort(path)
    model_type = fusion_model_type(config.get("model_type", ""))
    options = FusionOptions(model_type)
    options.enable_gelu_approximation = level in ("O3", "O4")
    num_heads = int(config.get("num_attention_heads") or 0)
    hidden_size = int(config.get("hidden_size") or 0)
    optimized = optimize_model(
        str(path),
        model_type=model_type,
        num_heads=num_heads,
        hidden_size=hidden_size,
        optimization_options=options,
        opt_level=1,
        use_gpu=False,
        only_onnxruntime=level == "O1",
    )
    if level == "O4":
        optimized.convert_float_to_float16(keep_io_types=True)
        optimized.topological_sort()  # the boundary casts are appended at the end of the node list
    fused = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    save(optimized.model, path)
    return {"level": level, "fusion_model_type": model_type, "fused_operators": fused, "float16": level == "O4"}


def _fuse_for_ort(path: Path) -> None:
    """Rewrite `path` with onnxscript's onnxruntime fusions (attention, GELU, skip and RMS normalization, rotary
    embedding): onnxruntime's optimizer finds no attention in a torch.export graph (a BERT-base shape ran unfused on
    an H200, 1.50x PyTorch at batch 32), these rules match it."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, _ = optimize_for_ort(ir.from_proto(load(path)))  # in memory: the file is rewritten
    save(ir.to_proto(model), path)


def to_float16(path: Path) -> None:
    """Convert a float32 graph to float16 weights and compute, keeping float32 inputs and outputs."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(load(path))
    model.convert_float_to_float16(keep_io_types=True)
    model.topological_sort()  # the boundary casts are appended at the end of the node list
    save(model.model, path)


def quantize_weight_only(
    path: Path, method: str, block_size: int | None, algorithm: str = "rtn", accuracy_level: int | None = None
) -> dict:
    """4-bit weight-only quantization of every MatMul with a constant weight: `int4` through onnxruntime's
    MatMulNBitsQuantizer (block-wise, asymmetric, RTN / HQQ / k-quant), `nf4` / `fp4` through MatMulBnb4Quantizer
    (bitsandbytes' 4-bit types, one absmax per block). Activations stay float32."""
    if method == "int4":
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        block = block_size or 32
        configs = {
            "rtn": lambda: nbits.RTNWeightOnlyQuantConfig(),
            "hqq": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=4),
            "k_quant": lambda: nbits.KQuantWeightOnlyQuantConfig(),
        }
        quantizer = nbits.MatMulNBitsQuantizer(
            load(path),
            bits=4,
            block_size=block,
            is_symmetric=False,
            accuracy_level=accuracy_level,
            algo_config=configs[algorithm](),
        )
        record = {
            "method": "int4",
            "operator": "MatMulNBits",
            "block_size": block,
            "algorithm": algorithm,
            "accuracy_level": accuracy_level,
        }
    else:
        from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

        block = block_size or 64
        quantizer = MatMulBnb4Quantizer(
            load(path), MatMulBnb4Quantizer.NF4 if method == "nf4" else MatMulBnb4Quantizer.FP4, block
        )
        record = {"method": method, "operator": "MatMulBnb4", "block_size": block}
    # onnxruntime's RTN (neural_compressor) prints a progress bar to stdout, which `builder build --json` owns; in a
    # log (no terminal, or --quiet) its carriage returns pile up into one long line, so it goes nowhere there.
    with contextlib.redirect_stdout(sys.stderr if show_progress() else io.StringIO()):
        quantizer.process()
    model = quantizer.model.model
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        import onnx  # deferred: with the quantizer

        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # where MatMulNBits/Bnb4 live
    record["quantized_nodes"] = sum(node.op_type == record["operator"] for node in model.graph.node)
    save(model, path)
    return record


def quantize_dynamic_int8(path: Path) -> dict:
    """onnxruntime dynamic quantization: int8 weights with one scale per output channel, activations quantized per
    batch at run time (CPU). Per-channel scales matter: on all-MiniLM-L6-v2 the embedding cosine is 0.987 with them
    and 0.929 with one scale per tensor."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".quantize.") as tmp:
        output = Path(tmp) / MODEL_FILE
        large = path.with_name(EXTERNAL_DATA_FILE).exists()
        quantize_dynamic(
            str(path), str(output), weight_type=QuantType.QInt8, per_channel=True, use_external_data_format=large
        )
        model = load(output)
    save(model, path)
    return {"method": "dynamic-int8", "weight_type": "QInt8", "per_channel": True}
