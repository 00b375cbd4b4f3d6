"""Benchmark (#15): builder's ONNX graphs on onnxruntime's CUDA provider vs PyTorch on the same GPU, same run.

Each part writes a model folder with deterministic random weights (torch.manual_seed(0)) and a tokenizer (the export
traces with it and the gate tokenizes with it), writes a recipe and runs `python -m builder build RECIPE --device D
--keep-failed --keep-temp --json` in a subprocess, into an emptied --out: the graph measured is the one builder
ships, after its whole gate on the same device. The gate's node placement (builder.steps.placement) says which
provider ran which nodes; a build that fails its gate (a placement failure, say) is kept by --keep-failed, one that
breaks after its export by --keep-temp, and either is still measured, with the build's error recorded.

encoder: BERT-base's shape (BertConfig defaults: hidden 768, 12 layers, 12 heads, intermediate 3072, vocab 30522),
  float32 weights; recipe `export: {provider: CUDAExecutionProvider, dtype: float16, optimize: O4}`. Random token ids,
  sequence 128, no padding, at batch 1 and 32:
  - torch: AutoModel.from_pretrained(dtype=float16, attn_implementation="sdpa") on the device, under
    torch.inference_mode (BertModel also runs its pooler: one hidden x hidden product per row);
  - ort: builder's graph in builder.steps.ort.session, which refuses a session whose first provider is not the one
    asked for (onnxruntime-gpu falls back to the CPU silently) and calls onnxruntime.preload_dlls() first; io-binding
    with the inputs uploaded once and the output left on the device, as PyTorch leaves its own.
  Median ms of --runs runs after 5 warm-ups, torch.cuda.synchronize() before and after each (a device-wide wait, so it
  covers onnxruntime's streams too); speedup = torch ms / ort ms. Check: at batch 1 the mean-pooled outputs' cosine
  is at least MIN_COSINE.
decoder: SmolLM2-135M's shape (bench/checkpoints.SHAPES["smollm2"]), bfloat16 weights; recipe `export: {provider:
  CUDAExecutionProvider, with_past: true, quantize: int4}` (MatMulNBits, block 32, RTN; builder quantizes a float32
  graph). A random 128-token prompt at batch 1:
  - bnb: from_pretrained(quantization_config=BitsAndBytesConfig(nf4, compute dtype bfloat16), dtype=bfloat16), saved
    with save_pretrained before its first forward (its artifact size);
  - ort: the int4 graph with io-binding: the KV cache stays on the device from step to step, the logits of each step
    come to the host for the greedy argmax;
  - ort_gate_loop: the same graph through the gate's own loop (builder.tasks.causal_lm.OnnxDecoder.generate: numpy
    in and out, so the whole cache crosses the bus twice a step).
  Checks of ort's loop: its tokens equal the gate loop's, and its last logits equal (within CACHE_TOLERANCE) those of
  one forward of the whole sequence with an empty cache.
  prefill: median ms of one forward of the prompt with an empty cache (outputs left on the device); decode: tokens/s
  over the 63 single-token steps after the prefill, and the wall time of the 64 greedy tokens (prefill included),
  median of --decode-runs generations after one warm-up; EOS is ignored. PyTorch's loop keeps each token on the GPU
  (no host wait per step); onnxruntime's Run waits for its stream at every step.
The decoder's gate bounds on top-1 and KL are relaxed (random weights agree with their 4-bit selves far less than
trained ones; bench/run.py does the same); the encoder's are builder's defaults.

A contender that fails records its error and the others still run; the exit code is then 1. --small shrinks both
shapes (2 layers, hidden 64, vocab 1000) for a CPU smoke test on CPUExecutionProvider through the same code; with
--device cpu the recipes keep the CUDA target and add `verify_on: CPUExecutionProvider`, so the graph is the same.

Usage:
  python bench/onnx_gpu.py --device cuda --dir /tmp/onnx-gpu --json /tmp/onnx-gpu/h200.json
  python bench/onnx_gpu.py --small --device cpu --runs 3          (tests/unit/test_bench_onnx_gpu.py)
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

SEQUENCE = 128
BATCHES = (1, 32)
NEW_TOKENS = 64
WARMUP = 5
BUILD_TIMEOUT_S = 420
PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
SMALL_ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000)
SMALL_DECODER = SMALL_ENCODER | dict(num_key_value_heads=2)
# Random weights: the bench measures speed, it does not judge these weights' 4-bit agreement.
_RELAXED = {"top1_agreement": 0.0, "kl_divergence": 100.0}
# Sanity bounds on a contender's own outputs (a wrongly fed graph misses them by far): the io-binding decoder's last
# logits against a full forward, relative to the largest logit; the encoder's mean-pooled cosine against PyTorch's.
CACHE_TOLERANCE = 0.05
MIN_COSINE = 0.99
_STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


# --- sources -------------------------------------------------------------------------------------------------------


def bert_source(folder: Path, small: bool) -> dict:
    """BERT-base (or the small shape) with seed-0 weights and a WordPiece tokenizer; returns the shape."""
    import string

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from builder.evaluation import eval_text

    config = BertConfig(**(SMALL_ENCODER if small else {}))
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    # Single characters of the gate's evaluation text and their continuations, padded with BERT's [unused] fillers.
    chars = sorted(set(eval_text().lower()) - set(string.whitespace))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    vocab += [f"[unused{i}]" for i in range(config.vocab_size - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return _shape(config, "num_attention_heads")


def llama_source(folder: Path, small: bool) -> dict:
    """SmolLM2-135M's shape (or the small one) with seed-0 weights in bfloat16 and a byte-level BPE tokenizer."""
    import torch
    from checkpoints import SHAPES, _tokenizer  # the shape and the tokenizer the other benches' checkpoints use
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(SHAPES["smollm2"] | (SMALL_DECODER if small else {})))
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    _tokenizer(folder, config.vocab_size)
    return _shape(config, "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")


def _shape(config, *extra: str) -> dict:
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", *extra)
    return {key: getattr(config, key) for key in keys}


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


# --- builder build -------------------------------------------------------------------------------------------------


def build(recipe: dict, root: Path, device: str) -> dict:
    """`builder build` of `recipe` in a subprocess: where the graph is (built, or kept after a failed gate), the gate's
    verdict and node placement, and the export's record."""
    import yaml

    from builder.artifact import FAILED_DIR
    from builder.steps.gate import REPORT_FILE
    from builder.steps.placement import COMPUTE_HEAVY, CPU

    name = recipe["name"]
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    out = _fresh(root / "artifacts" / name)  # nothing from an earlier run can stand in for this build's output
    command = [sys.executable, "-m", "builder", "build", str(path), "--out", str(out), "--device", device]
    command += ["--keep-failed", "--keep-temp", "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log(f"{name}: {' '.join(command[1:])}")
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, timeout=BUILD_TIMEOUT_S)
        exit_code, stdout = done.returncode, done.stdout
    except subprocess.TimeoutExpired as expired:
        exit_code, stdout = None, f"timed out after {BUILD_TIMEOUT_S} s: {expired.stdout!r}"
    record: dict = {"recipe": recipe, "exit_code": exit_code, "wall_s": round(time.perf_counter() - started, 1)}
    try:
        rows = json.loads(stdout)
    except json.JSONDecodeError:
        rows = [{"status": "failed", "error": f"no JSON on stdout: {stdout[-500:]!r}"}]
    record["error"] = next((row["error"] for row in rows if row.get("status") == "failed"), None)
    # Built; else kept by --keep-failed (the gate failed); else kept by --keep-temp (the build broke after the export).
    kept = [out / name, out / FAILED_DIR / name, *sorted(out.glob(f".tmp-{name}-*"))]
    folder = next((f for f in kept if (f / "model.onnx").is_file()), None)
    record["folder"] = str(folder) if folder else None
    log(f"{name}: builder build exit {exit_code} in {record['wall_s']} s; graph: {record['folder']}")
    if folder is None:
        return record
    record["graph_bytes"] = _bytes(folder, "model.onnx*")
    if not (folder / REPORT_FILE).is_file():
        return record
    report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
    nodes = report["placement"]["nodes"]
    record["gate"] = {
        "passed": report["passed"],
        "failures": [failure["message"] for failure in report["failures"]],
        "provider": report["provider"],
        "target_provider": report["target_provider"],
        "placement": report["placement"],
        "compute_heavy_on_cpu": {op: n for op, n in nodes.get(CPU, {}).items() if op in COMPUTE_HEAVY},
        "metrics": report["metrics"],
        "performance": report["performance"],
    }
    if (folder / "manifest.json").is_file():
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        onnx = manifest["onnx"]
        record["export"] = {key: onnx[key] for key in ("exporter", "opset", "dtype", "optimization", "quantization")}
        record["timings"] = {**manifest["timings"], **{f"export.{k}": v for k, v in onnx["timings"].items()}}
    return record


def _export_recipe(name: str, source: Path, task: str, device: str, export: dict, verify: dict) -> dict:
    export = {"format": "onnx", "exporter": "torch", "opset": 18, "provider": PROVIDERS["cuda"], **export}
    if device == "cpu":  # the same CUDA-target graph, verified (and here measured) on the CPU provider
        export["verify_on"] = PROVIDERS["cpu"]
    return {
        "schema_version": 1,
        "name": name,
        "source": {"model": str(source), "task": task, "dtype": "float32"},
        "export": export,
        "verify": verify,
    }


# --- timing --------------------------------------------------------------------------------------------------------


def _timed(run, runs: int, sync) -> dict:
    """Median (and spread) in ms of `runs` calls of `run` after WARMUP untimed ones, each between two `sync()`s."""
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(runs):
        sync()
        started = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return {
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(min(times), 3),
        "max_ms": round(max(times), 3),
        "runs": runs,
    }


def _generations(generate, runs: int) -> dict:
    """`generate()` -> (NEW_TOKENS greedy tokens, seconds of the decode steps or None): one warm-up, then `runs`."""
    generate()
    totals, steps = [], []
    for _ in range(runs):
        started = time.perf_counter()
        tokens, decode_s = generate()
        totals.append(time.perf_counter() - started)
        steps.append(decode_s)
    result = {"generate_s": round(statistics.median(totals), 4), "generations": runs, "tokens": tokens}
    if steps[0] is not None:
        result["decode_tokens_per_s"] = round((NEW_TOKENS - 1) / statistics.median(steps), 2)
    return result


def _contender(name: str, run) -> dict:
    """`run()`'s result with `error: None`, or only the error: one contender's failure does not stop the others."""
    log(f"{name}: start")
    try:
        result = run()
    except Exception as error:  # noqa: BLE001 (any failure is that contender's result)
        traceback.print_exc()
        message = str(error).strip() or type(error).__name__
        log(f"ERROR {name}: {message.splitlines()[0][:300]}")
        return {"error": f"{type(error).__name__}: {message[:2000]}"}
    finally:
        gc.collect()
        _empty_cache()
    log(f"{name}: done" + (f", ERROR {result['error']}" if result.get("error") else ""))
    return {"error": None} | result


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else lambda: None


def _session(folder: str | None, provider: str, build_error: str | None):
    from builder.steps import ort

    if folder is None:
        raise RuntimeError(f"builder build made no graph: {build_error}")
    return ort.session(Path(folder) / ort.MODEL_FILE, provider)  # refuses a session that fell back to another provider


# --- encoder -------------------------------------------------------------------------------------------------------


def _encoder_inputs(vocab: int, batch: int) -> dict:
    import torch

    ids = torch.randint(0, vocab, (batch, SEQUENCE), generator=torch.Generator().manual_seed(batch))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def torch_encoder(source: Path, device: str, runs: int, vocab: int) -> dict:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(source), dtype=torch.float16, attn_implementation="sdpa").to(device).eval()
    result: dict = {"dtype": "float16", "attn_implementation": model.config._attn_implementation}
    with torch.inference_mode():
        for batch in BATCHES:
            inputs = {k: v.to(device) for k, v in _encoder_inputs(vocab, batch).items()}
            result[f"batch_{batch}"] = _timed(lambda inputs=inputs: model(**inputs), runs, _sync(device))
            if batch == 1:
                result["_output"] = model(**inputs).last_hidden_state.float().cpu().numpy()
    return result


def ort_encoder(build_record: dict, device: str, runs: int, vocab: int) -> dict:
    from onnxruntime import OrtValue

    session = _session(build_record["folder"], PROVIDERS[device], build_record["error"])
    names = {i.name for i in session.get_inputs()}
    output = session.get_outputs()[0].name
    result: dict = {"provider": session.get_providers()[0], "io_binding": True, "output_on": device}
    for batch in BATCHES:
        # Kept referenced while the binding is used: on the CPU an OrtValue wraps its numpy array's memory.
        inputs = {
            name: OrtValue.ortvalue_from_numpy(value.numpy(), device, 0)
            for name, value in _encoder_inputs(vocab, batch).items()
            if name in names
        }
        binding = session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(output, device, 0)

        def run(binding=binding):
            session.run_with_iobinding(binding)

        result[f"batch_{batch}"] = _timed(run, runs, _sync(device))
        if batch == 1:
            result["_output"] = binding.copy_outputs_to_cpu()[0]
    return result


def encoder(root: Path, device: str, runs: int, small: bool) -> dict:
    import numpy as np

    log("encoder: writing the source")
    source = _fresh(root / "sources" / "bert")
    shape = bert_source(source, small)
    recipe = _export_recipe(
        "bench-bert-onnx-fp16-o4",
        source,
        "feature-extraction",
        device,
        {"dtype": "float16", "optimize": "O4"},
        {},
    )
    built = build(recipe, root, device)
    vocab = shape["vocab_size"]
    contenders = {
        "torch": _contender("encoder torch fp16", lambda: torch_encoder(source, device, runs, vocab)),
        "ort": _contender("encoder ort fp16 O4", lambda: ort_encoder(built, device, runs, vocab)),
    }
    result = {
        "shape": shape,
        "sequence": SEQUENCE,
        "source_bytes": _bytes(source, "*.safetensors"),
        "build": built,
        "contenders": contenders,
    }
    outputs = [c.pop("_output", None) for c in contenders.values()]
    if all(o is not None for o in outputs):
        expected, actual = (o.astype(np.float32) for o in outputs)
        pooled = expected.mean(1), actual.mean(1)
        cosine = float((pooled[0] * pooled[1]).sum() / (np.linalg.norm(pooled[0]) * np.linalg.norm(pooled[1])))
        result["ort_vs_torch_batch_1"] = {"max_abs_diff": float(np.abs(actual - expected).max()), "cosine": cosine}
        if cosine < MIN_COSINE:
            contenders["ort"]["error"] = f"its output differs from PyTorch's: {result['ort_vs_torch_batch_1']}"
            log(f"ERROR encoder ort: {contenders['ort']['error']}")
    if not any(c["error"] for c in contenders.values()):
        torch_ms, ort_ms = (contenders[k] for k in ("torch", "ort"))
        result["speedup"] = {
            f"batch_{b}": round(torch_ms[f"batch_{b}"]["median_ms"] / ort_ms[f"batch_{b}"]["median_ms"], 3)
            for b in BATCHES
        }
    return result


# --- decoder -------------------------------------------------------------------------------------------------------


def _prompt(vocab: int):
    import torch

    return torch.randint(0, vocab, (1, SEQUENCE), generator=torch.Generator().manual_seed(0))


def bnb_decoder(source: Path, out: Path, device: str, runs: int, decode_runs: int, vocab: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(source), quantization_config=quantization, dtype=torch.bfloat16, device_map=device
    ).eval()
    # Saved before any forward: on some CPUs the first 4-bit forward repacks the weights in place (docs/recipes.md).
    model.save_pretrained(_fresh(out))
    result: dict = {
        "quantization": {"quant_type": "nf4", "double_quant": False, "compute_dtype": "bfloat16"},
        "weights_bytes": _bytes(out, "*.safetensors"),
        "memory_footprint_bytes": model.get_memory_footprint(),
    }
    ids, sync = _prompt(vocab).to(device), _sync(device)

    def generate():
        output = model(input_ids=ids, use_cache=True)
        cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
        tokens = [token]
        sync()
        started = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            output = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = output.logits[:, -1:].argmax(-1)
            tokens.append(token)
        sync()
        decode_s = time.perf_counter() - started
        return torch.cat(tokens, 1)[0].tolist(), decode_s

    with torch.inference_mode():
        result["prefill"] = _timed(lambda: model(input_ids=ids, use_cache=True), runs, sync)
        result |= _generations(generate, decode_runs)
    return result


def _bind(session, decoder, feed: dict, past: dict, device: str, logits_on: str):
    """An io-binding of `feed` (host arrays) and `past` (OrtValues, left where they are); outputs on `device` but
    the logits on `logits_on`."""
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_cpu_input(name, value)
    for name, value in past.items():
        binding.bind_ortvalue_input(name, value)
    for name in decoder.output_names:
        binding.bind_output(name, logits_on if name == "logits" else device, 0)
    return binding


def _ort_generate(session, decoder, prompt: list[int], device: str):
    """Greedy NEW_TOKENS tokens with the KV cache kept on `device`: the present outputs of one step are bound as the
    next step's past inputs; only the logits come to the host. Returns the tokens, the seconds of the steps after the
    prefill and the last step's logits."""
    import numpy as np

    def step(feed: dict, past: dict):
        binding = _bind(session, decoder, feed, past, device, "cpu")
        session.run_with_iobinding(binding)
        outputs = dict(zip(decoder.output_names, binding.get_outputs(), strict=True))
        logits = outputs["logits"].numpy()[0, -1]
        return int(logits.argmax()), logits, outputs

    token, logits, outputs = step(decoder.feed(prompt), {})
    tokens = [token]
    started = time.perf_counter()
    for _ in range(NEW_TOKENS - 1):
        total = len(prompt) + len(tokens)
        feed = {"input_ids": np.array([[tokens[-1]]], np.int64), "attention_mask": np.ones((1, total), np.int64)}
        if "position_ids" in decoder.names:
            feed["position_ids"] = np.array([[total - 1]], np.int64)
        past = {name: outputs[name.replace("past_key_values.", "present.")] for name in decoder.past_names}
        token, logits, outputs = step(feed, past)
        tokens.append(token)
    return tokens, time.perf_counter() - started, logits


def ort_decoder(build_record: dict, device: str, runs: int, decode_runs: int, vocab: int, gate_loop: bool) -> dict:
    """The int4 graph: with io-binding (prefill and generation), or through the gate's numpy loop (`gate_loop`)."""
    from transformers import AutoConfig

    from builder.tasks.causal_lm import OnnxDecoder

    session = _session(build_record["folder"], PROVIDERS[device], build_record["error"])
    decoder = OnnxDecoder(session, AutoConfig.from_pretrained(build_record["folder"]))
    prompt = _prompt(vocab)[0].tolist()
    result: dict = {"provider": session.get_providers()[0], "io_binding": not gate_loop}
    if gate_loop:
        return result | _generations(lambda: (decoder.generate(prompt, NEW_TOKENS, set()), None), decode_runs)
    feed = decoder.feed(prompt)  # referenced while the binding is used
    binding = _bind(session, decoder, feed, {}, device, device)
    result["prefill"] = _timed(lambda: session.run_with_iobinding(binding), runs, _sync(device))
    last: dict = {}

    def generate():
        tokens, decode_s, last["logits"] = _ort_generate(session, decoder, prompt, device)
        return tokens, decode_s

    result |= _generations(generate, decode_runs)
    # The loop's last logits against one forward of the whole sequence with an empty cache: a cache not fed, or one
    # step stale, moves them by a fifth to a third of the largest logit on the small shape (random weights barely
    # see positions, so a shifted position moves them by 3e-4 of it: below the numerical noise this must allow).
    expected = decoder.run(prompt + result["tokens"][:-1])["logits"][0, -1]
    result["cache_check"] = {
        "max_abs_diff": float(abs(expected - last["logits"]).max()),
        "max_abs_logit": float(abs(expected).max()),
    }
    if result["cache_check"]["max_abs_diff"] > CACHE_TOLERANCE * result["cache_check"]["max_abs_logit"]:
        result["error"] = f"the io-binding loop's last logits differ from a full forward's: {result['cache_check']}"
    return result


def decoder(root: Path, device: str, runs: int, decode_runs: int, small: bool) -> dict:
    log("decoder: writing the source")
    source = _fresh(root / "sources" / "llama")
    shape = llama_source(source, small)
    recipe = _export_recipe(
        "bench-llama-onnx-int4",
        source,
        "text-generation",
        device,
        {"exporter": "torch", "with_past": True, "quantize": "int4"},  # position_ids and its own cache loop
        {"prompts": ["The capital of France is"], "max_new_tokens": 8, "thresholds": _RELAXED},
    )
    built = build(recipe, root, device)
    vocab = shape["vocab_size"]
    contenders = {
        "bnb": _contender(
            "decoder bnb nf4", lambda: bnb_decoder(source, root / "bnb-nf4", device, runs, decode_runs, vocab)
        ),
        "ort": _contender(
            "decoder ort int4", lambda: ort_decoder(built, device, runs, decode_runs, vocab, gate_loop=False)
        ),
        "ort_gate_loop": _contender(
            "decoder ort int4, gate loop",
            lambda: ort_decoder(built, device, runs, decode_runs, vocab, gate_loop=True),
        ),
    }
    ort_run, gate_run = contenders["ort"], contenders["ort_gate_loop"]
    if not ort_run["error"] and not gate_run["error"] and ort_run["tokens"] != gate_run["tokens"]:
        ort_run["error"] = "its greedy tokens differ from the gate loop's (builder.steps.verify_onnx) on the same graph"
        log(f"ERROR decoder ort int4: {ort_run['error']}")
    result = {
        "shape": shape,
        "prompt_tokens": SEQUENCE,
        "new_tokens": NEW_TOKENS,
        "source_bytes": _bytes(source, "*.safetensors"),
        "build": built,
        "contenders": contenders,
    }
    bnb = contenders["bnb"]
    if not bnb["error"]:
        result["speedup"] = {
            name: _decoder_speedup(bnb, contender)
            for name, contender in contenders.items()
            if name != "bnb" and not contender["error"]
        }
    return result


def _decoder_speedup(base: dict, other: dict) -> dict:
    speedup = {"generate": round(base["generate_s"] / other["generate_s"], 3)}
    if "prefill" in other:
        speedup["prefill"] = round(base["prefill"]["median_ms"] / other["prefill"]["median_ms"], 3)
    if "decode_tokens_per_s" in other:
        speedup["decode"] = round(other["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
    return speedup


# --- report --------------------------------------------------------------------------------------------------------


def _machine(device: str) -> dict:
    import torch

    machine = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    return machine


def _versions() -> dict:
    """Versions from the imported modules: onnxruntime-gpu installed with --target beside an image's onnxruntime
    has two distributions' metadata, and only the module says which one runs."""
    versions: dict = {"python": platform.python_version()}
    for name in ("torch", "transformers", "onnxruntime", "bitsandbytes", "onnx", "onnxscript"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError as error:
            versions[name] = f"not importable: {error}"
    try:
        import onnxruntime

        versions["onnxruntime_location"] = str(Path(onnxruntime.__file__).parent)
        versions["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    import torch

    versions["torch_cuda"] = torch.version.cuda
    return versions


def _ms(contender: dict, key: str) -> str:
    return f"{contender[key]['median_ms']:.3f}" if key in contender else ""


def _build_line(built: dict) -> str:
    if built.get("folder") is None:
        return f"builder build failed (exit {built['exit_code']}): {built['error']}"
    line = f"builder build {built['wall_s']} s (exit {built['exit_code']}), graph {built['graph_bytes'] / 1e6:.1f} MB"
    gate = built.get("gate")
    if gate is None:
        return f"{line}, no gate report: {built['error']}"
    verdict = "passed" if gate["passed"] else "FAILED: " + "; ".join(gate["failures"])
    line += f", gate on {gate['provider']} {verdict}"
    if gate["provider"] != PROVIDERS["cpu"]:
        on_cpu = ", ".join(f"{op} x{n}" for op, n in gate["compute_heavy_on_cpu"].items()) or "none"
        line += f"; compute-heavy nodes on the CPU: {on_cpu}"
    return line


_ENCODER_LABELS = {"torch": "PyTorch fp16 eager (sdpa)", "ort": "onnxruntime, builder's fp16 O4 graph, io-binding"}
_DECODER_LABELS = {
    "bnb": "bitsandbytes nf4 (bf16 compute), PyTorch",
    "ort": "onnxruntime, builder's int4 graph (MatMulNBits), io-binding",
    "ort_gate_loop": "onnxruntime, the same graph in the gate's numpy loop",
}


def _encoder_rows(part: dict) -> list[str]:
    rows = ["| contender | batch 1 ms | batch 32 ms | speedup b1 | speedup b32 |", "|---|---|---|---|---|"]
    speedup = part.get("speedup", {})
    for name, contender in part["contenders"].items():
        ratios = ["1.00"] * len(BATCHES) if name == "torch" else [str(speedup.get(f"batch_{b}", "")) for b in BATCHES]
        times = [_ms(contender, f"batch_{b}") for b in BATCHES]
        rows.append(f"| {_ENCODER_LABELS[name]} | {' | '.join(times)} | {' | '.join(ratios)} |")
    return rows


def _decoder_rows(part: dict) -> list[str]:
    rows = [
        "| contender | weights MB | prefill ms | decode tok/s | 64 tokens s | x prefill | x decode | x 64 tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, contender in part["contenders"].items():
        size = contender.get("weights_bytes") if name == "bnb" else part["build"].get("graph_bytes")
        ratio = dict.fromkeys(("prefill", "decode", "generate"), "1.00") if name == "bnb" else {}
        ratio |= part.get("speedup", {}).get(name, {})
        generate = f"{contender['generate_s']:.3f}" if "generate_s" in contender else ""
        rows.append(
            f"| {_DECODER_LABELS[name]} | {f'{size / 1e6:.1f}' if size else ''} | {_ms(contender, 'prefill')} | "
            f"{contender.get('decode_tokens_per_s', '')} | {generate} | "
            f"{' | '.join(str(ratio.get(k, '')) for k in ('prefill', 'decode', 'generate'))} |"
        )
    return rows


def table(results: dict) -> str:
    """Markdown: per part, the build's line, one row per contender, then each contender's error."""
    where = results["machine"].get("gpu") or results["machine"]["cpu"]
    provider = PROVIDERS[results["device"]]
    titles = {
        "encoder": f"encoder: BERT-base shape, sequence {SEQUENCE}, {provider}, on {where}",
        "decoder": f"decoder: SmolLM2-135M shape, prompt {SEQUENCE}, {NEW_TOKENS} new tokens, {provider}, on {where}",
    }
    lines: list[str] = []
    for name, rows in (("encoder", _encoder_rows), ("decoder", _decoder_rows)):
        part = results.get(name)
        if part is None:
            continue
        lines += [f"## {titles[name]}", ""]
        if part.get("error"):
            lines += [f"failed: {part['error']}", ""]
            continue
        lines += [f"shape {part['shape']}", "", _build_line(part["build"]), "", *rows(part), ""]
        lines += [f"- {who}: ERROR {c['error']}" for who, c in part["contenders"].items() if c["error"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dir", default="/tmp/builder-bench-onnx-gpu", help="sources, recipes, artifacts, JSON")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per latency (median)")
    parser.add_argument("--decode-runs", type=int, default=5, help="timed 64-token generations per contender")
    parser.add_argument("--only", choices=("encoder", "decoder"))
    parser.add_argument("--small", action="store_true", help="2 layers, hidden 64, vocab 1000: a CPU smoke test")
    parser.add_argument("--json", default=None, help="results file (default DIR/results-DEVICE[-small].json)")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    out = Path(args.json or root / f"results-{args.device}{'-small' if args.small else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "device": args.device,
        "small": args.small,
        "runs": args.runs,
        "decode_runs": args.decode_runs,
        "warmup": WARMUP,
        "machine": _machine(args.device),
        "versions": _versions(),
    }
    log(f"{results['machine']}, {results['versions']}")
    for part in ("encoder", "decoder"):
        if args.only not in (None, part):
            continue
        try:
            if part == "encoder":
                results[part] = encoder(root, args.device, args.runs, args.small)
            else:
                results[part] = decoder(root, args.device, args.runs, args.decode_runs, args.small)
        except Exception as error:  # noqa: BLE001 (a part that breaks outside its contenders: the other still runs)
            traceback.print_exc()
            log(f"ERROR {part}: {error}")
            results[part] = {"error": f"{type(error).__name__}: {str(error)[:2000]}"}
        results["elapsed_s"] = round(time.perf_counter() - _STARTED, 1)
        out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(table(results))
    print(f"\nJSON: {out} ({results['elapsed_s']} s)")
    failed = [part for part in ("encoder", "decoder") if results.get(part, {}).get("error")]
    failed += [
        f"{part} {name}"
        for part in ("encoder", "decoder")
        for name, contender in results.get(part, {}).get("contenders", {}).items()
        if contender["error"]
    ]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
