"""The `export` step: a transformers model -> an ONNX folder in optimum's layout, for one onnxruntime provider.

Layout and names follow optimum's exporter, so optimum's `ORTModelFor*` loads the folder: `model.onnx` (+
`model.onnx_data` past 2 GB), config.json, the tokenizer files and generation_config.json; inputs `input_ids`,
`attention_mask` (+ `token_type_ids` for BERT-like encoders, `position_ids` and `past_key_values.N.key/value` for
decoders), outputs `logits` or `last_hidden_state` (+ `present.N.key/value`).

Order: choose the exporter -> export (torch dynamo, or optimum-onnx's main_export) -> onnx.checker -> optimize ->
float16 -> dynamic int8 -> check that the provider really runs the graph -> copy config and tokenizer files. The
metrics the gate compares come from `builder.steps.verify_onnx`.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

from builder.artifact import Footprint
from builder.checkpoint import copy_sentence_transformers
from builder.context import BuildContext
from builder.errors import BuildError, MissingDependency
from builder.recipe import OnnxExport
from builder.steps import export_genai, ort
from builder.tasks import auto_class, family
from builder.tasks.causal_lm import decoder_shape
from builder.verification import OnnxRecord

# Tasks the torch exporter handles, with the graph's output name (optimum's names).
TORCH_TASKS = {
    "text-generation": "logits",
    "feature-extraction": "last_hidden_state",
    "text-classification": "logits",
    "token-classification": "logits",
    "fill-mask": "logits",
}
MIN_TORCH_OPSET = 18
# Files copied from the source folder as they are (optimum writes the same ones).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


def export(ctx: BuildContext) -> None:
    """Export `ctx.source_folder()` to ONNX in `ctx.workdir` as `ctx.loaded.recipe.export` asks.

    Fills `ctx.onnx` (exporter, task, opset, dtype, provider and where the graph was verified, input and
    output names, optimizer and quantization details, sub-step timings). Raises `BuildError` when the exporter
    cannot handle the task or architecture, the opset is too low, or the provider cannot run here (see
    `export.verify_on`); the work folder then holds no model."""
    recipe = ctx.loaded.recipe
    spec = recipe.export
    assert spec is not None  # the pipeline runs this step for export recipes only
    task = ctx.plan.task
    config = ctx.plan.source.config
    exporter = choose_exporter(spec, task, config)
    ort.preflight(spec.provider, spec.verify_on)
    if exporter == "genai":  # hook: onnxruntime-genai's model builder writes and places the graph itself
        ctx.onnx = OnnxRecord.model_validate(export_genai.export(ctx, task, spec, _copy_side_files))
        ctx.footprint = Footprint.of(ctx.plan.source_bytes, ctx.onnx.model_bytes)
        return
    # hook: why `auto` did not take the genai exporter for a language model (the manifest records it)
    genai_fallback = None
    if spec.exporter == "auto" and family(task).GRAPH == "decoder":
        genai_fallback = export_genai.genai_problem(spec, task, config)
    timings: dict[str, float] = {}
    model_path = Path(ctx.workdir) / ort.MODEL_FILE
    try:
        started = time.perf_counter()
        match exporter:
            case "torch":
                _export_torch(ctx, task, spec, model_path)
            case "optimum":
                _export_optimum(ctx, task, spec)
        timings["export"] = time.perf_counter() - started
        record = _finish(ctx, task, spec, exporter, model_path, timings)
        if genai_fallback:
            record.genai_fallback = genai_fallback
    except BaseException:
        _remove_model(Path(ctx.workdir))
        raise
    ctx.onnx = record
    ctx.footprint = Footprint.of(ctx.plan.source_bytes, record.model_bytes)


def choose_exporter(spec: OnnxExport, task: str, config: dict | None = None) -> str:
    """`torch`, `optimum` or `genai` for this recipe (`config`: the source's config.json); raises `BuildError` when
    the chosen one cannot export it. `auto` takes genai for a language model whose architecture and options
    onnxruntime-genai's model builder supports (`export_genai.genai_problem`), else optimum when importable, else
    torch."""
    has_optimum = optimum_onnx_available()
    exporter = spec.exporter
    if exporter == "genai":
        if problem := export_genai.genai_problem(spec, task, config or {}):
            raise BuildError(f"export.exporter genai: {problem}; use `exporter: torch`")
        return exporter
    if exporter == "auto":
        if family(task).GRAPH == "decoder" and export_genai.genai_problem(spec, task, config or {}) is None:
            return "genai"  # onnxruntime-genai's graphs decode ~3x faster than the torch exporter's (#29)
        exporter = "optimum" if has_optimum else "torch"
    if exporter == "optimum" and not has_optimum:
        raise BuildError(
            "export.exporter optimum needs optimum-onnx, which is not importable here (it needs "
            "transformers < 4.58): pip install optimum-onnx in an environment with transformers 4.57, "
            "or use `exporter: torch`"
        )
    if exporter == "torch":
        if spec.opset < MIN_TORCH_OPSET:
            raise BuildError(
                f"export.opset {spec.opset} is too low for the torch exporter "
                f"(torch.onnx.export(dynamo=True) needs opset {MIN_TORCH_OPSET} or newer); set "
                f"`export.opset: {MIN_TORCH_OPSET}`, or use `exporter: optimum` for older opsets"
            )
        if task not in TORCH_TASKS:
            raise BuildError(
                f"the torch exporter does not export task {task!r} (it exports "
                f"{', '.join(TORCH_TASKS)}); use `exporter: optimum` (optimum-onnx) for it"
            )
    return exporter


def optimum_onnx_available() -> bool:
    """True when optimum-onnx's exporter is importable (it needs transformers 4.57.x)."""
    try:
        return importlib.util.find_spec("optimum.exporters.onnx") is not None
    except ModuleNotFoundError:
        return False


def load_source(source_dir: Path, task: str, dtype, device: str = "cpu", attn_implementation: str | None = None):
    """Load the source model for `task` in `dtype`, in eval mode; `BuildError` when the architecture does not fit."""
    model_class = auto_class(task)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = model_class.from_pretrained(str(source_dir), **kwargs)
    except ValueError as error:  # "Unrecognized configuration class ... for this kind of AutoModel"
        raise BuildError(
            f"{source_dir.name} cannot be loaded for task {task!r}: {str(error).splitlines()[0]}; set "
            "`source.task` to a task its architecture supports"
        ) from None
    return model.to(device).eval()


# --- torch exporter ------------------------------------------------------------------------------------------------


def _export_torch(ctx: BuildContext, task: str, spec: OnnxExport, model_path: Path) -> None:
    import torch

    recipe = ctx.loaded.recipe
    try:
        import onnxscript  # noqa: F401  (torch's dynamo exporter translates through it)
    except ImportError:
        raise MissingDependency("onnxscript", "onnx") from None
    model = load_source(ctx.source_folder(), task, torch.float32, "cpu", recipe.load.attn_implementation)
    match family(task).GRAPH:
        case "decoder":
            module, args, dynamic, inputs, outputs = _decoder_graph(model, spec.with_past)
        case "encoder":
            module, args, dynamic, inputs, outputs = _encoder_graph(model, ctx.source_folder(), TORCH_TASKS[task])
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamic_shapes=dynamic,
                input_names=inputs,
                output_names=outputs,
                opset_version=spec.opset,
                dynamo=True,
                verbose=False,
            )
    except Exception as error:  # noqa: BLE001 (torch.export and onnxscript raise many unrelated types)
        first = str(error).strip().splitlines()[0][:400] if str(error).strip() else type(error).__name__
        raise BuildError(
            f"torch.onnx.export cannot export {type(model).__name__} ({model.config.model_type}) for "
            f"{task}: {first}. Try `exporter: optimum` (optimum-onnx) or "
            "`load.attn_implementation: eager`"
        ) from None
    if program is None:
        raise BuildError(f"torch.onnx.export returned no program for {type(model).__name__}; try `exporter: optimum`")
    ort.save(program.model_proto, model_path)


def _encoder_module(model, names: list[str], output: str):
    """forward(input_ids, attention_mask[, token_type_ids]) -> one output, in optimum's input order."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return getattr(self.model(**{n: tensors[n] for n in names}), output)

    return Graph().eval()  # a new module trains by default; the export would warn and trace training behaviour


def _encoder_graph(model, source_dir: Path, output: str):
    import inspect

    import torch
    from transformers import AutoTokenizer

    accepted = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]
    tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
    if "token_type_ids" not in tokenizer.model_input_names:
        names = [n for n in names if n != "token_type_ids"]
    # Two rows of different lengths, so the traced graph handles padding; batch and sequence stay dynamic.
    example = tokenizer(
        ["An example sentence to trace the graph with.", "Short one."], padding=True, return_tensors="pt"
    )
    args = tuple(example[n] if n in example else torch.zeros_like(example["input_ids"]) for n in names)
    batch, sequence = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    dynamic = {n: {0: batch, 1: sequence} for n in names}
    return _encoder_module(model, names, output), args, dynamic, names, [output]


def _decoder_module(model, with_past: bool):
    """forward(input_ids, attention_mask, position_ids, *past) -> logits, *present (optimum's decoder signature)."""
    import torch
    from transformers import DynamicCache

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            if not with_past:
                out = self.model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
                )
                return out.logits
            cache = DynamicCache(config=self.model.config)
            for layer in range(len(past) // 2):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return Graph().eval()  # as in _encoder_module


def _decoder_graph(model, with_past: bool):
    import torch

    layers, kv_heads, head_dim = decoder_shape(model.config)
    batch_size, length, past_length = 2, 3, 4
    batch, sequence = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    total = past_length + length if with_past else length
    input_ids = torch.randint(0, min(model.config.vocab_size, 1000), (batch_size, length))
    attention_mask = torch.ones(batch_size, total, dtype=torch.long)
    position_ids = torch.arange(total - length, total).expand(batch_size, length)
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    args: tuple = (input_ids, attention_mask, position_ids)
    mask_dim = torch.export.Dim("total_sequence_length") if with_past else sequence
    dynamic: tuple = ({0: batch, 1: sequence}, {0: batch, 1: mask_dim}, {0: batch, 1: sequence})
    if with_past:
        past = tuple(torch.randn(batch_size, kv_heads, past_length, head_dim) for _ in range(2 * layers))
        args += past
        past_dim = torch.export.Dim("past_sequence_length")
        dynamic += (tuple({0: batch, 2: past_dim} for _ in past),)
        names = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        inputs += [f"past_key_values.{n}" for n in names]
        outputs += [f"present.{n}" for n in names]
    return _decoder_module(model, with_past), args, dynamic, inputs, outputs


# --- optimum exporter ----------------------------------------------------------------------------------------------


def _export_optimum(ctx: BuildContext, task: str, spec: OnnxExport) -> None:
    from optimum.exporters.onnx import main_export
    from optimum.exporters.tasks import TasksManager

    config = ctx.plan.source.config
    model_type = config.get("model_type", "")
    try:
        supported = TasksManager.get_supported_tasks_for_model_type(
            model_type, exporter="onnx", library_name="transformers"
        )
    except (KeyError, ValueError):
        raise BuildError(f"optimum-onnx cannot export model type {model_type!r}; use `exporter: torch`") from None
    optimum_task = f"{task}-with-past" if spec.with_past else task
    if optimum_task not in supported:
        raise BuildError(
            f"optimum-onnx exports {model_type} for {', '.join(sorted(supported))}, not "
            f"{optimum_task}; change `source.task` or `export.with_past`, or use `exporter: torch`"
        )
    try:
        main_export(
            str(ctx.source_folder()),
            output=str(ctx.workdir),
            task=optimum_task,
            opset=spec.opset,
            device="cpu",
            dtype="fp32",
            no_post_process=True,
            do_validation=False,
            local_files_only=True,
        )
    except Exception as error:  # noqa: BLE001 (main_export raises whatever the model's tracing raises)
        raise BuildError(
            f"optimum-onnx main_export failed for {model_type} ({optimum_task}): {str(error).splitlines()[0][:400]}"
        ) from None


# --- after either exporter -----------------------------------------------------------------------------------------


def _finish(
    ctx: BuildContext, task: str, spec: OnnxExport, exporter: str, model_path: Path, timings: dict
) -> OnnxRecord:
    import onnx

    onnx.checker.check_model(str(model_path))  # the path form reads model.onnx_data and graphs past 2 GB
    optimization = None
    if spec.optimize != "none":
        started = time.perf_counter()
        optimization = ort.optimize(model_path, spec.optimize, ctx.plan.source.config)
        timings["optimize"] = time.perf_counter() - started
    if spec.dtype == "float16" and not (optimization and optimization["float16"]):
        started = time.perf_counter()
        ort.to_float16(model_path)
        timings["float16"] = time.perf_counter() - started
    quantization = None
    if spec.quantize != "none":
        started = time.perf_counter()
        if spec.quantize == "dynamic-int8":
            quantization = ort.quantize_dynamic_int8(model_path)
        else:
            quantization = ort.quantize_weight_only(
                model_path, spec.quantize, spec.block_size, spec.quant_algorithm, spec.accuracy_level
            )
        timings["quantize"] = time.perf_counter() - started
    onnx.checker.check_model(str(model_path))
    placement = ort.place(spec.provider, spec.verify_on, model_path)
    _copy_side_files(ctx.source_folder(), Path(ctx.workdir))
    graph = onnx.load(str(model_path), load_external_data=False).graph
    files = sorted(p.name for p in Path(ctx.workdir).iterdir() if p.name.startswith("model.onnx"))
    return OnnxRecord(
        exporter=exporter,
        task=task,
        with_past=spec.with_past,
        opset=spec.opset,
        dtype=spec.dtype,
        **placement.as_json(),
        optimization=optimization,
        quantization=quantization,
        inputs=[i.name for i in graph.input],
        outputs=[o.name for o in graph.output],
        files=files,
        model_bytes=sum((Path(ctx.workdir) / f).stat().st_size for f in files),
        timings={k: round(v, 2) for k, v in timings.items()},
    )


def _copy_side_files(source_dir: Path, workdir: Path) -> None:
    for name in SIDE_FILES:
        if (source_dir / name).is_file() and not (workdir / name).exists():
            shutil.copy2(source_dir / name, workdir / name)
    copy_sentence_transformers(source_dir, workdir)


def _remove_model(workdir: Path) -> None:
    for name in (ort.MODEL_FILE, ort.EXTERNAL_DATA_FILE):
        (workdir / name).unlink(missing_ok=True)
