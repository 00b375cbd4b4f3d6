"""The verification gate: an artifact proves, before anyone can publish it, that it still computes what its source
computes.

The reference is the source model at the recipe's dtype (float16 becomes float32 on a CPU); the candidate is the
artifact as a user loads it: the folder reloaded by stock transformers in a fresh process (`builder.steps.metrics`)
or, for an ONNX export, the onnxruntime session on the verification provider (`builder.steps.verify_onnx`). Both
see the same token ids: the recipe's prompts and the built-in evaluation text (builder/data/).

The metrics are compared with thresholds (the per-method defaults below, overridden by `verify.thresholds`); the
report goes to verify-report.json and the manifest. A miss raises `VerificationFailed` naming each metric and by how
much it missed. `reverify` re-runs the checks of an existing artifact against its recorded source (`builder
verify`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from builder.errors import BuildError, SourceError, VerificationFailed
from builder.recipe import Bnb4Bit, Bnb8Bit, Recipe
from builder.steps.metrics import LATENCY_TOKENS

if TYPE_CHECKING:
    from builder.pipeline import BuildContext

REPORT_FILE = "verify-report.json"
CHUNK_TOKENS = 512  # the evaluation text is scored in chunks of this many tokens (no overlap)
EVAL_TOKENS = 2048  # tokens of the evaluation text scored (SmolLM2: 3,126 in all); keeps a CPU verify under a minute
ENCODER_SENTENCES = 32  # sentences of the evaluation text embedded by encoders (plus the recipe's prompts)
ENCODER_MAX_TOKENS = 128

# Recipe threshold key -> (the metric it bounds, "min" or "max").
GATES: dict[str, tuple[str, str]] = {
    "top1_agreement": ("top1_agreement", "min"),
    "kl_divergence": ("kl_divergence_mean", "max"),
    "perplexity_ratio": ("perplexity_ratio", "max"),
    "max_abs_diff": ("max_abs_diff", "max"),
    "cosine": ("cosine_min", "min"),
    "footprint_ratio": ("footprint_ratio", "max"),
}

# Defaults, from measurements on SmolLM2-135M-Instruct and all-MiniLM-L6-v2 on CPU (docs/recipes.md, "verify", has
# the table): each allows about twice an honest build's distance from the reference (a 135M model loses a lot to
# 4-bit: nf4 agrees on 63% of next tokens), and sits far from a build with shuffled 4-bit blocks (top-1 0.016,
# KL 9.95 nats, perplexity x16,000). The footprint bound catches a build that quantized nothing (ratio 1.0).
_LM_DEFAULTS = {
    "nf4": {"top1_agreement": 0.45, "kl_divergence": 1.5, "perplexity_ratio": 2.5, "footprint_ratio": 0.60},
    "fp4": {"top1_agreement": 0.40, "kl_divergence": 2.0, "perplexity_ratio": 2.2, "footprint_ratio": 0.60},
    "int8": {"top1_agreement": 0.75, "kl_divergence": 0.15, "perplexity_ratio": 1.10, "footprint_ratio": 0.75},
}
_ENCODER_DEFAULTS = {
    "nf4": {"cosine": 0.90, "footprint_ratio": 0.75},
    "fp4": {"cosine": 0.85, "footprint_ratio": 0.75},
    "int8": {"cosine": 0.99, "footprint_ratio": 0.80},
}


def default_thresholds(recipe: Recipe, task: str) -> dict[str, float]:
    """The thresholds a recipe gets before its `verify.thresholds` apply, by method (and quant type) and task."""
    match recipe.quantize:
        case Bnb4Bit(quant_type=quant_type):
            scheme = quant_type
        case Bnb8Bit():
            scheme = "int8"
        case _:
            raise BuildError(f"recipe {recipe.name} has no bitsandbytes `quantize` block; ONNX exports are verified "
                             "by builder.steps.verify_onnx")
    table = _LM_DEFAULTS if task == "text-generation" else _ENCODER_DEFAULTS
    return dict(table[scheme])


def thresholds_for(recipe: Recipe, task: str) -> dict[str, float]:
    """Defaults overridden by the recipe's `verify.thresholds`; refuses a threshold the task has no metric for."""
    applicable = _LM_GATES if task == "text-generation" else _ENCODER_GATES
    return with_overrides(default_thresholds(recipe, task), recipe, applicable, f"a {task} model")


def with_overrides(defaults: dict[str, float], recipe: Recipe, applicable, what: str) -> dict[str, float]:
    """`defaults` with the recipe's `verify.thresholds` written over them; a threshold outside `applicable` (the
    gates of `what` is being verified) is refused."""
    thresholds = dict(defaults)
    for key, value in recipe.verify.thresholds.model_dump(exclude_none=True).items():
        if key not in applicable:
            raise BuildError(f"verify.thresholds.{key} does not apply to {what} (its gates: "
                             f"{', '.join(applicable)}); remove it from the recipe")
        thresholds[key] = value
    return thresholds


_LM_GATES = ("top1_agreement", "kl_divergence", "perplexity_ratio", "footprint_ratio")
_ENCODER_GATES = ("cosine", "max_abs_diff", "footprint_ratio")


def gate(metrics: dict, thresholds: dict[str, float]) -> list[dict]:
    """The failures of `metrics` against `thresholds`: one entry per missed threshold, with its message."""
    failures = []
    for key, bound in thresholds.items():
        metric, kind = GATES[key]
        value = metrics[metric]
        missed = bound - value if kind == "min" else value - bound
        if missed > 0:
            sign = "<" if kind == "min" else ">"
            failures.append({"metric": metric, "value": value, "threshold": bound,
                             "message": f"{metric} {_number(value)} {sign} {_number(bound)} "
                                        f"(missed by {_number(missed)})"})
    return failures


def _number(value: float) -> str:
    """Three decimals, or three significant digits for values too small for that (a KL of 0.000213)."""
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"


# --- the build step --------------------------------------------------------------------------------------------


def verify(ctx: BuildContext) -> dict:
    """Verify the artifact in `ctx.workdir` against `ctx.source_dir`; returns the report (also written to
    verify-report.json). Raises `VerificationFailed` naming each metric that missed, and by how much."""
    recipe = ctx.loaded.recipe
    if recipe.export is not None:
        from builder.steps.verify_onnx import onnx_report

        report = onnx_report(ctx)
    else:
        task = ctx.record.get("task") or recipe.source.task
        report = run_checks(recipe, task, Path(ctx.source_dir), Path(ctx.workdir), ctx.device)
    write_report(Path(ctx.workdir), report)
    if not report["passed"]:
        raise VerificationFailed(failure_message(recipe.name, report))
    return report


def failure_message(name: str, report: dict) -> str:
    """One line per missed metric, then what to do."""
    lines = [f"{name}: verification failed on {report['device']}:"]
    lines += [f"  {failure['message']}" for failure in report["failures"]]
    lines.append("The artifact was not installed (build with --keep-failed to keep it and its verify-report.json). "
                 "Check the quantization settings (e.g. skip_modules for sensitive layers, quant_type, double_quant), "
                 "or, if this loss is acceptable, relax the named thresholds under `verify.thresholds`.")
    return "\n".join(lines)


def write_report(folder: Path, report: dict) -> None:
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


# --- running the checks ----------------------------------------------------------------------------------------


def run_checks(recipe: Recipe, task: str, source_dir: Path, artifact_dir: Path, device: str) -> dict:
    """Reference (source, in this process) vs candidate (artifact, fresh process): the verification report."""
    from transformers import AutoConfig

    from builder.steps import metrics as probes

    started = time.perf_counter()
    thresholds = thresholds_for(recipe, task)
    dtype = reference_dtype(recipe.source.dtype, AutoConfig.from_pretrained(source_dir), device)
    inputs = tokenize_inputs(source_dir, task, recipe.verify.prompts)
    model = probes.load_model(str(source_dir), task, dtype, device)
    reference = probes.probe(model, inputs, task, recipe.verify.max_new_tokens, device)
    del model
    reference_seconds = time.perf_counter() - started
    report = {"passed": False, "task": task, "device": device, "provider": None, "metrics": {},
              "thresholds": thresholds, "failures": [], "performance": {}}
    try:
        candidate = run_candidate(artifact_dir, task, dtype, device, inputs, recipe.verify.max_new_tokens)
    except VerificationFailed as error:
        report["failures"] = [{"metric": "loads", "value": None, "threshold": None, "message": str(error)}]
        return report
    measured, details = probes.compare(task, inputs, reference, candidate)
    weight_bytes = sum(p.stat().st_size for p in artifact_dir.glob("*.safetensors"))
    measured |= {"artifact_bytes": weight_bytes, "bits_per_param": 8 * weight_bytes / reference["parameters"]}
    report["metrics"] = {k: _rounded(v) for k, v in measured.items()}
    report["failures"] = gate(measured, thresholds)
    report["passed"] = not report["failures"]
    report["performance"] = _performance(reference, candidate)
    report["performance"]["verification_seconds"] = round(time.perf_counter() - started, 2)
    report["performance"]["reference_seconds"] = round(reference_seconds, 2)
    report["reference"] = {"model": "source", "dtype": dtype}
    report["inputs"] = _describe_inputs(inputs, task, recipe, details)
    return report


def reference_dtype(dtype: str, config, device: str) -> str:
    """The dtype both models run in: the recipe's (`auto`: the checkpoint's), but float32 for float16 on a CPU,
    where float16 matmuls are emulated (slow) and some ops are missing. bfloat16 runs natively on CPUs with
    AVX512-BF16/AMX and correctly (if slower) elsewhere, so it stays."""
    if dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        dtype = str(found).removeprefix("torch.")
    if device == "cpu" and dtype == "float16":
        return "float32"
    return dtype


def run_candidate(artifact_dir: Path, task: str, dtype: str, device: str, inputs: dict,
                  max_new_tokens: int) -> dict:
    """Probe the artifact with stock transformers in a fresh Python process; raises `VerificationFailed` when it
    does not load or run there."""
    import torch

    with tempfile.TemporaryDirectory(prefix="builder-verify-") as tmp:
        spec, out = Path(tmp) / "spec.pt", Path(tmp) / "candidate.pt"
        torch.save({"folder": str(artifact_dir), "task": task, "dtype": dtype, "device": device, "inputs": inputs,
                    "max_new_tokens": max_new_tokens}, spec)
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        process = subprocess.run([sys.executable, "-m", "builder.steps.metrics", str(spec), str(out)],
                                 check=False, capture_output=True, text=True, env=env)
        if process.returncode != 0:
            tail = " | ".join(process.stderr.strip().splitlines()[-3:])
            raise VerificationFailed(f"the artifact does not load and run with stock transformers in a fresh process "
                                     f"(exit {process.returncode}): {tail}")
        return torch.load(out, weights_only=True)


def tokenize_inputs(source_dir: Path, task: str, prompts: tuple[str, ...]) -> dict:
    """Token ids for both runs, from the source's tokenizer: the evaluation text in CHUNK_TOKENS chunks and the
    prompts (LMs), or the prompts and ENCODER_SENTENCES sentences of the text, padded (encoders)."""
    from transformers import AutoTokenizer

    from builder.steps import metrics as probes

    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir)
    except (OSError, ValueError) as error:
        raise BuildError(f"cannot load the tokenizer of {source_dir} to verify the artifact ({error}); the source "
                         "folder needs its tokenizer files") from None
    text = eval_text()
    if task == "text-generation":
        ids = tokenizer(text, return_tensors="pt").input_ids
        latency_ids = ids[:, :probes.LATENCY_TOKENS]
        ids = ids[:, :EVAL_TOKENS]
        chunks = [ids[:, i:i + CHUNK_TOKENS] for i in range(0, ids.shape[1], CHUNK_TOKENS)]
        chunks = [chunk for chunk in chunks if chunk.shape[1] > 1]
        prompt_ids = [tokenizer(p, return_tensors="pt").input_ids for p in prompts or default_prompts()]
        return {"eval_chunks": chunks, "prompts": prompt_ids, "latency_ids": latency_ids}
    sentences = list(prompts) + eval_sentences(ENCODER_SENTENCES)
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=ENCODER_MAX_TOKENS, return_tensors="pt")
    latency_ids = tokenizer(text[:2000], truncation=True, max_length=probes.LATENCY_TOKENS, return_tensors="pt")
    return {"sentences": dict(batch), "latency_ids": latency_ids.input_ids}


def eval_text() -> str:
    """The built-in evaluation text (public-domain prose; builder/data/README.md says what and whence)."""
    return resources.files("builder").joinpath("data/eval_text.txt").read_text(encoding="utf-8")


def default_prompts() -> list[str]:
    """The greedy-continuation prompts used when a recipe gives none."""
    text = resources.files("builder").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def eval_sentences(count: int) -> list[str]:
    """`count` sentences of at least five words, spread evenly over the evaluation text."""
    flat = re.sub(r"\s+", " ", eval_text())
    sentences = [s for s in re.split(r"(?<=[.!?:;])\s+", flat) if len(s.split()) >= 5]
    step = max(len(sentences) // count, 1)
    return sentences[::step][:count]


def _performance(reference: dict, candidate: dict) -> dict:
    return {
        "reference_latency_ms": round(reference["latency_ms"], 2),
        "candidate_latency_ms": round(candidate["latency_ms"], 2),
        "reference_throughput_tokens_per_s": round(reference["throughput_tokens_per_s"], 1),
        "candidate_throughput_tokens_per_s": round(candidate["throughput_tokens_per_s"], 1),
        "reference_footprint_bytes": reference["footprint_bytes"],
        "candidate_footprint_bytes": candidate["footprint_bytes"],
        "latency_tokens": LATENCY_TOKENS,
    }


def _describe_inputs(inputs: dict, task: str, recipe: Recipe, details: dict) -> dict:
    described = {"eval_text_sha256": hashlib.sha256(eval_text().encode("utf-8")).hexdigest(), **details}
    if task == "text-generation":
        described |= {"eval_tokens": sum(c.shape[1] for c in inputs["eval_chunks"]), "chunk_tokens": CHUNK_TOKENS,
                      "prompts": list(recipe.verify.prompts) or default_prompts(),
                      "max_new_tokens": recipe.verify.max_new_tokens}
    else:
        described |= {"sentences": int(inputs["sentences"]["input_ids"].shape[0]),
                      "prompts": list(recipe.verify.prompts)}
    return described


def _rounded(value):
    return round(value, 6) if isinstance(value, float) else value


# --- re-verifying an existing artifact (`builder verify`) ----------------------------------------------------------


def reverify(artifact_dir: Path, *, write: bool = False, device: str | None = None) -> dict:
    """Re-run the checks of the artifact in `artifact_dir` against the source its manifest records; returns the
    report. Refuses (`SourceError`) when that source is gone or its content changed. With `write`, rewrites
    verify-report.json and the manifest's `verification` and file hashes; otherwise changes nothing."""
    import torch

    artifact_dir = Path(artifact_dir)
    manifest = _read_manifest(artifact_dir)
    recipe = Recipe.model_validate(manifest["recipe"])
    source_dir = recorded_source(artifact_dir, manifest, recipe)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    task = (manifest.get("source") or {}).get("task") or recipe.source.task
    if recipe.export is not None:
        report = _reverify_onnx(artifact_dir, manifest, recipe, source_dir, device, task)
    else:
        report = run_checks(recipe, task, source_dir, artifact_dir, device)
    if write:
        _rewrite(artifact_dir, manifest, report)
    return report


def _reverify_onnx(artifact_dir: Path, manifest: dict, recipe: Recipe, source_dir: Path, device: str,
                   task: str) -> dict:
    """An export's checks, on the provider its manifest says it was verified on (builder.steps.verify_onnx)."""
    from builder.recipe import LoadedRecipe
    from builder.pipeline import BuildContext
    from builder.steps.verify_onnx import onnx_report

    if "onnx" not in manifest:
        raise BuildError(f"{artifact_dir}/manifest.json has no `onnx` record of the export; rebuild the artifact")
    loaded = LoadedRecipe(recipe, artifact_dir / "recipe.lock.yaml", ())
    # onnx_report reads the recipe, the export record and the folders; the build's plan is not needed again.
    ctx = BuildContext(loaded, None, source_dir, artifact_dir, device, record={"onnx": manifest["onnx"], "task": task})
    return onnx_report(ctx)


def _read_manifest(artifact_dir: Path) -> dict:
    try:
        return json.loads((artifact_dir / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{artifact_dir} has no manifest.json; point `builder verify` at a folder that `builder "
                         "build` wrote (artifacts/<name>)") from None
    except json.JSONDecodeError as error:
        raise BuildError(f"{artifact_dir}/manifest.json is not valid JSON ({error}); rebuild the artifact") from None


def recorded_source(artifact_dir: Path, manifest: dict, recipe: Recipe) -> Path:
    """The local folder holding the source at the revision the manifest records. A local source must still have
    the recorded content digest; a Hub source is fetched at the recorded commit."""
    from builder.source import folder_digest
    from builder.steps.load import download

    revision = manifest["source"]["revision"]
    if not revision.startswith("sha256:"):
        return download(recipe.source.model, revision, allow_pickle=recipe.source.allow_pickle,
                        remote_code=recipe.source.trust_remote_code)
    folder = _local_source_folder(artifact_dir, manifest, recipe)
    digest = f"sha256:{folder_digest(folder)}"
    if digest != revision:
        raise SourceError(f"the source folder {folder} changed since {artifact_dir} was built (recorded {revision}, "
                          f"now {digest}); verifying against other weights would prove nothing. Restore the source, "
                          "or rebuild the artifact from the current one (builder build RECIPE --force)")
    return folder


def _local_source_folder(artifact_dir: Path, manifest: dict, recipe: Recipe) -> Path:
    """recipe.lock.yaml's absolute `source.model`, else the recipe's path taken from its recorded recipe file."""
    import yaml

    candidates = []
    lock = artifact_dir / "recipe.lock.yaml"
    if lock.is_file():
        candidates.append(Path(yaml.safe_load(lock.read_text(encoding="utf-8"))["source"]["model"]))
    for recipe_file in manifest.get("recipe_files", [])[:1]:
        candidates.append(Path(recipe_file).parent / Path(recipe.source.model).expanduser())
    for folder in candidates:
        if folder.is_dir():
            return folder.resolve()
    raise SourceError(f"the source of {artifact_dir} ({recipe.source.model}) is not at "
                      f"{' nor '.join(map(str, candidates)) or 'a recorded path'}; run `builder verify` from the "
                      "folder the artifact was built in, or restore the source folder")


def _rewrite(artifact_dir: Path, manifest: dict, report: dict) -> None:
    from builder.steps.write import file_table

    write_report(artifact_dir, report)
    manifest["verification"] = report
    manifest["files"] = file_table(artifact_dir)
    temporary = artifact_dir / ".manifest.json.tmp"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    temporary.replace(artifact_dir / "manifest.json")


def format_report(report: dict) -> str:
    """The report as a few human-readable lines (what `builder verify` prints)."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [f"verification {verdict} ({report['task']} on {report['device']})"]
    for name, value in report["metrics"].items():
        gated = next((key for key, (metric, _) in GATES.items() if metric == name and key in report["thresholds"]),
                     None)
        bound = f"  (threshold {report['thresholds'][gated]})" if gated else ""
        lines.append(f"  {name:<28} {value:.6g}{bound}" if isinstance(value, float) else f"  {name:<28} {value}")
    for name, value in report["performance"].items():
        lines.append(f"  {name:<34} {value}")
    lines += [f"missed: {failure['message']}" for failure in report["failures"]]
    return "\n".join(lines)
