"""Benchmark (#29): SmolLM2-135M-Instruct as an int4 ONNX language model on this CPU, three graphs in one run.

- builder-genai: `builder build recipes/smollm2/onnx-int4-genai.yaml` (exporter genai: onnxruntime-genai's model
  builder in a subprocess, then builder's gate);
- builder-torch: the same recipe with `exporter: torch, with_past: true` (torch.onnx.export + MatMulNBits int4, RTN,
  block 32);
- stock: `python -m onnxruntime_genai.models.builder -p int4 -e cpu` run directly (its defaults: RTN, block 32,
  accuracy level 4).
Each build runs in its own subprocess under a small wrapper that reports the peak RSS of everything it waited for
(RUSAGE_CHILDREN: the build and, for builder-genai, the model builder it starts). Build time: the whole command's wall
time; for builder's builds also the export step alone (the manifest's timings), since the stock command has no gate.

Speed, best of --runs rounds in which the three take turns (after one warm-up each), so that the shared host's load
falls on all of them alike: a 128-token prompt (the evaluation text's first 128 tokens), then 64 greedy tokens (EOS
ignored). The genai graphs run through onnxruntime_genai's Generator, as their users run them: prefill = the
`append_tokens` call, decode = 64 / the seconds of the 64 `generate_next_token` calls. The torch graph has no
genai_config.json, so it runs on plain onnxruntime with numpy in and out (builder's gate loop,
builder.tasks.causal_lm.OnnxDecoder). onnxruntime's default threads (all cores) everywhere.

Usage: python bench/onnx_llm.py --dir /tmp/onnx-llm --json /tmp/onnx-llm/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "models" / "smollm2-135m-instruct"
RECIPE = REPO / "recipes" / "smollm2" / "onnx-int4-genai.yaml"
GENAI_NAME = "smollm2-135m-instruct-onnx-int4-genai"
TORCH_NAME = "smollm2-135m-instruct-onnx-int4-torch"
PROMPT_TOKENS, NEW_TOKENS = 128, 64
# Runs a command and prints the largest RSS (KiB on Linux) among the processes it waited for.
_PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run_measured(command: list[str], log: Path) -> dict:
    started = time.perf_counter()
    with log.open("w") as out:
        finished = subprocess.run([sys.executable, "-c", _PEAK_RSS, *command], stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    peak = [line for line in log.read_text().splitlines() if line.startswith("PEAK_RSS_KIB")]
    if finished.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({finished.returncode}); see {log}")
    return {"build_seconds": round(seconds, 1), "peak_rss_mib": round(int(peak[-1].split()[1]) / 1024)}


def build_builder(recipe: Path, out: Path, name: str) -> tuple[Path, dict]:
    measured = run_measured(
        [sys.executable, "-m", "builder", "build", str(recipe), "--out", str(out), "--device", "cpu", "--force"],
        out.parent / f"{name}.log",
    )
    folder = out / name
    manifest = json.loads((folder / "manifest.json").read_text())
    measured["export_seconds"] = round(manifest["timings"]["export"], 1)
    measured["gate"] = {k: manifest["verification"]["metrics"][k] for k in ("top1_agreement", "kl_divergence_mean")}
    return folder, measured


def build_stock(out: Path) -> tuple[Path, dict]:
    folder = out / "stock"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(SOURCE), "-o", str(folder)]
    command += ["-p", "int4", "-e", "cpu", "-c", str(out / "stock-cache")]
    measured = run_measured(command, out / "stock.log")
    shutil.rmtree(out / "stock-cache", ignore_errors=True)
    return folder, measured


def graph_facts(folder: Path) -> dict:
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    size = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))
    return {"file_mb": round(size / 1e6, 1), "nodes": len(ops), "attention_nodes": ops.count("GroupQueryAttention")}


def prompt_ids() -> list[int]:
    from transformers import AutoTokenizer

    from builder.steps.gate import eval_sentences

    tokenizer = AutoTokenizer.from_pretrained(str(SOURCE))
    ids = tokenizer(" ".join(eval_sentences(64)))["input_ids"]
    assert len(ids) >= PROMPT_TOKENS, len(ids)
    return ids[:PROMPT_TOKENS]


class GenaiRun:
    """One greedy generation through onnxruntime_genai's Generator: (prefill s, decode s, tokens)."""

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(folder))

    def __call__(self, ids: list[int]) -> tuple[float, float, list[int]]:
        params = self.og.GeneratorParams(self.model)
        total = len(ids) + NEW_TOKENS
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = self.og.Generator(self.model, params)
        started = time.perf_counter()
        generator.append_tokens(ids)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        tokens = []
        for _ in range(NEW_TOKENS):
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return prefill, time.perf_counter() - started, tokens


class PlainOrtRun:
    """The same on plain onnxruntime with numpy in and out (builder's gate loop), for a graph without
    genai_config.json."""

    def __init__(self, folder: Path):
        from transformers import AutoConfig

        from builder.steps import ort
        from builder.tasks.causal_lm import OnnxDecoder

        session = ort.session(folder / "model.onnx", "CPUExecutionProvider")
        self.decoder = OnnxDecoder(session, AutoConfig.from_pretrained(str(folder)))

    def __call__(self, ids: list[int]) -> tuple[float, float, list[int]]:
        decoder = self.decoder
        started = time.perf_counter()
        out = decoder.run(ids)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        tokens = []
        for _ in range(NEW_TOKENS):
            token = int(out["logits"][0, -1].argmax())
            tokens.append(token)
            out = decoder.run([token], {n: out[n.replace("past_key_values.", "present.")] for n in decoder.past_names})
        return prefill, time.perf_counter() - started, tokens


def measure_speed(runs: dict, ids: list[int], rounds: int) -> dict[str, dict]:
    """Best prefill and decode of each contender over `rounds` rounds, the contenders taking turns within a round
    (so that the shared host's load falls on all of them alike); one warm-up each first."""
    best = {name: [float("inf"), float("inf"), []] for name in runs}
    for name, run in runs.items():
        best[name][2] = run(ids)[2]
    for _ in range(rounds):
        for name, run in runs.items():
            prefill, decode, _ = run(ids)
            best[name][0], best[name][1] = min(best[name][0], prefill), min(best[name][1], decode)
    return {name: _speed(prefill, decode, tokens) for name, (prefill, decode, tokens) in best.items()}


def _speed(prefill: float, decode: float, tokens: list[int]) -> dict:
    return {
        "prefill_ms": round(prefill * 1000, 1),
        "decode_tok_s": round(NEW_TOKENS / decode, 1),
        "first_tokens": tokens[:8],
    }


def versions() -> dict:
    names = ("onnxruntime", "onnxruntime-genai", "onnx", "torch", "transformers")
    return {n: metadata.version(n) for n in names} | {"python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="work folder (emptied)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    out = args.dir / "out"
    out.mkdir(parents=True)
    torch_recipe = args.dir / "onnx-int4-torch.yaml"
    torch_recipe.write_text(
        f"schema_version: 1\nname: {TORCH_NAME}\nsource:\n  model: {SOURCE}\n  task: text-generation\n"
        "  dtype: float32\nexport:\n  format: onnx\n  exporter: torch\n  with_past: true\n  quantize: int4\n"
        "  block_size: 32\n"
    )
    ids = prompt_ids()
    builds = {
        "builder-genai": (lambda: build_builder(RECIPE, out, GENAI_NAME), GenaiRun),
        "builder-torch": (lambda: build_builder(torch_recipe, out, TORCH_NAME), PlainOrtRun),
        "stock": (lambda: build_stock(out), GenaiRun),
    }
    results: dict[str, dict] = {}
    runs = {}
    for name, (build, runner) in builds.items():
        print(f"{name}: building", flush=True)
        folder, results[name] = build()
        results[name] |= graph_facts(folder)
        print(name, json.dumps(results[name]), flush=True)
        runs[name] = runner(folder)
    print("measuring", flush=True)
    for name, speed in measure_speed(runs, ids, args.runs).items():
        results[name] |= speed
    stock = results["stock"]
    ratios = {
        name: {
            "decode": round(r["decode_tok_s"] / stock["decode_tok_s"], 3),
            "file": round(r["file_mb"] / stock["file_mb"], 3),
            "build": round(r["build_seconds"] / stock["build_seconds"], 3),
            "export_step": round(r["export_seconds"] / stock["build_seconds"], 3),
        }
        for name, r in results.items()
        if name != "stock"
    }
    report = {"versions": versions(), "cpu_count": os.cpu_count(), "results": results, "vs_stock": ratios}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
