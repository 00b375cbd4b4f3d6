"""The `genai` exporter: onnxruntime-genai's model builder turns a decoder's safetensors into the graph its runtime
runs (GroupQueryAttention, fused rotary and norms, MatMulNBits weights), with `genai_config.json`, so
`onnxruntime_genai.Model(folder)` loads the artifact.

The model builder runs in a subprocess (`python -m onnxruntime_genai.models.builder`): it loads the whole model with
transformers and keeps it until it exits, so a child process bounds that memory and gives it back before the gate
loads the reference; its many prints go to a log instead of the build's console; and its module-level state (torch
defaults, `@torch.no_grad`) stays out of the build process.

`genai_problem` says why a recipe cannot take this path (the exporter choice reports it); `export` builds;
`generate` runs greedy generation through onnxruntime-genai's Generator, as the artifact's users will.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from builder.context import BuildContext
from builder.errors import BuildError, MissingDependency
from builder.recipe import OnnxExport
from builder.steps import ort
from builder.tasks import family_of

# The text decoders of the model builder's `create_model` dispatch (onnxruntime-genai 0.18), by config.json's
# `architectures[0]`; its vision, audio and mixture-of-experts models are left out.
GENAI_ARCHITECTURES = frozenset(
    {
        "Ernie4_5ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "GraniteForCausalLM",
        "HunYuanDenseV1ForCausalLM",
        "Lfm2ForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "NemotronForCausalLM",
        "OlmoForCausalLM",
        "PhiForCausalLM",
        "Phi3ForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "SmolLM3ForCausalLM",
    }
)
GENAI_CONFIG = "genai_config.json"
EXTERNAL_DATA_FILE = "model.onnx.data"  # the model builder's name for the graph's weights
_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_PROVIDER = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}
_LOG = "model-builder.log"


def genai_available() -> bool:
    """True when onnxruntime-genai (its runtime and model builder) is importable."""
    try:
        return importlib.util.find_spec("onnxruntime_genai") is not None
    except ModuleNotFoundError:
        return False


def genai_problem(spec: OnnxExport, task: str, config: dict) -> str | None:
    """Why onnxruntime-genai's model builder cannot build this recipe (None when it can)."""
    if (found := family_of(task)) is None or found.GRAPH != "decoder":
        return f"the genai exporter builds decoder language models, not {task}"
    if misfit := spec.genai_misfit():
        return f"export.{'.'.join(misfit.path)}: {misfit}"
    architecture = (config.get("architectures") or ["(none)"])[0]
    if architecture not in GENAI_ARCHITECTURES:
        return f"onnxruntime-genai's model builder does not build {architecture}"
    if not genai_available():
        return "onnxruntime-genai is not installed (pip install 'recipe-builder[onnx]')"
    return None


def precision(spec: OnnxExport) -> str:
    """The model builder's --precision for the recipe: the weight quantization, else the graph's dtype."""
    return spec.quantize if spec.quantize in ("int4", "int8") else _PRECISION[spec.dtype]


def builder_options(spec: OnnxExport, trust_remote_code: bool) -> dict[str, str]:
    """The model builder's --extra_options for the recipe (its defaults elsewhere: accuracy level 4 on the CPU)."""
    options: dict[str, str] = {}
    if spec.quantize in ("int4", "int8"):
        options["block_size"] = str(spec.block_size or 32)
        if spec.accuracy_level is not None:
            options["accuracy_level"] = str(spec.accuracy_level)
        if spec.quant_algorithm == "k_quant":  # rtn is its default algorithm, as in the stock build
            options["algo_config"] = "k_quant"
    if trust_remote_code:
        options["hf_remote"] = "true"
    return options


def export(ctx: BuildContext, task: str, spec: OnnxExport, copy_side_files: Callable[[Path, Path], None]) -> dict:
    """Build `ctx.source_folder()` into `ctx.workdir` with the model builder; returns the export record (the keys
    the other exporters' records have, plus `model_builder` options, `nodes` and `attention_nodes`).

    `copy_side_files(source, workdir)` adds the files the model builder does not write (config.json,
    generation_config.json). Raises `BuildError` when the model builder fails; the work folder then holds no model."""
    workdir = Path(ctx.workdir)
    started = time.perf_counter()
    try:
        options = run_model_builder(ctx.source_folder(), workdir, spec, ctx.loaded.recipe.source.trust_remote_code)
        seconds = time.perf_counter() - started
        model_path = workdir / ort.MODEL_FILE
        placement = ort.place(spec.provider, spec.verify_on, model_path)
    except BaseException:
        remove_model(workdir)
        raise
    copy_side_files(ctx.source_folder(), workdir)
    files = model_files(workdir)
    quantization = None
    if spec.quantize != "none":
        quantization = {"method": spec.quantize, "block_size": spec.block_size or 32, "algorithm": spec.quant_algorithm}
    return {
        "exporter": "genai",
        "task": task,
        "with_past": True,
        "dtype": spec.dtype,
        **graph_summary(model_path),
        **placement.as_json(),
        "optimization": None,
        "quantization": quantization,
        "model_builder": options,
        "files": files,
        "model_bytes": sum((workdir / f).stat().st_size for f in files),
        "timings": {"export": round(seconds, 2)},
    }


def run_model_builder(source_dir: Path, workdir: Path, spec: OnnxExport, trust_remote_code: bool) -> dict:
    """Run the model builder on `source_dir` into `workdir` in a subprocess; returns its options (precision,
    provider, --extra_options). Raises `BuildError` with the model builder's last message when it fails."""
    if not genai_available():
        raise MissingDependency("onnxruntime-genai", "onnx")
    options = builder_options(spec, trust_remote_code)
    cache = workdir / ".model-builder-cache"
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "--input",
        str(source_dir),
        "--output",
        str(workdir),
        "--precision",
        precision(spec),
        "--execution_provider",
        _PROVIDER[spec.provider],
        "--cache_dir",
        str(cache),
    ]
    if options:
        command += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
    log = workdir / _LOG
    try:
        with log.open("w", encoding="utf-8") as out:
            finished = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
        if finished.returncode != 0:
            lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
            raise BuildError(
                f"onnxruntime-genai's model builder failed (exit {finished.returncode}): "
                f"{lines[-1][:400] if lines else 'no output'}; use `exporter: torch` for this model"
            )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        log.unlink(missing_ok=True)
    return {"precision": precision(spec), "execution_provider": _PROVIDER[spec.provider], **options}


def graph_summary(model_path: Path) -> dict:
    """Opset, node count and attention operators of the graph (the card and benchmarks compare them)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    ops = [node.op_type for node in model.graph.node]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "opset": opset,
        "nodes": len(ops),
        "attention_nodes": sum(op in ("GroupQueryAttention", "MultiHeadAttention", "Attention") for op in ops),
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
    }


def model_files(workdir: Path) -> list[str]:
    """The graph and its weights file."""
    return sorted(name for name in (ort.MODEL_FILE, EXTERNAL_DATA_FILE) if (workdir / name).is_file())


def remove_model(workdir: Path) -> None:
    """Remove what the model builder wrote, after a failure."""
    for name in (ort.MODEL_FILE, EXTERNAL_DATA_FILE, GENAI_CONFIG):
        (workdir / name).unlink(missing_ok=True)


def generate(model_dir: Path, prompts_ids: Sequence[list[int]], max_new_tokens: int, provider: str) -> list[list[int]]:
    """Greedy continuations of each prompt through onnxruntime-genai's Generator (`append_tokens`, then
    `generate_next_token`), on `provider`, stopping at the model's end-of-sequence token."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()
    if provider != "CPUExecutionProvider":
        config.append_provider(_PROVIDER[provider])
    model = og.Model(config)
    continuations = []
    for ids in prompts_ids:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens(list(ids))
        tokens: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        continuations.append(tokens)
    return continuations
