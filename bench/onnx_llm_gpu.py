"""Benchmark (#29, GPU): int4 ONNX language models through onnxruntime-genai on CUDA against the bitsandbytes nf4
model in PyTorch, on a synthetic checkpoint with a real model's shape, three contenders in one run.

The checkpoint: bench/checkpoints.py's `--shape` (random bf16 weights, its byte-level BPE tokenizer), with `--layers`
decoder layers instead of the shape's when given (decode time per token grows with the layers; the embedding and
`lm_head` stay whole).
- builder-genai: `builder build` of a recipe the bench writes: `exporter: genai`, provider CUDAExecutionProvider
  (CPUExecutionProvider with --device cpu), int4, block 32, RTN. The gate runs on the device, with its top-1 and KL
  bounds relaxed (random weights agree with their 4-bit selves far less than trained ones; the bench times the graph,
  it does not judge these weights);
- stock: `python -m onnxruntime_genai.models.builder -p int4 -e cuda` (-e cpu with --device cpu) on the same folder;
- bnb-nf4: `from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant, bfloat16 compute),
  dtype=bfloat16)` on the device, greedy `generate`.
Builds run in subprocesses, as in bench/onnx_llm.py (which this reuses): build time and peak RSS of the command.

Speed, best of --runs rounds in which the three take turns (after one warm-up each): the checkpoint tokenizer's first
128 tokens of the gate's evaluation text, then 64 greedy tokens (EOS ignored). onnxruntime-genai: prefill = the
`append_tokens` call, decode = 64 / the seconds of the 64 `generate_next_token` calls (63 forwards). PyTorch: prefill
= `generate(max_new_tokens=1)`, decode = 64 / (the seconds of `generate(64)` minus that prefill), the same 63
forwards; `torch.cuda.synchronize()` after each.

On CUDA the bench refuses to measure a fallback: onnxruntime must be the GPU build with CUDAExecutionProvider
(`onnxruntime.preload_dlls()` first), onnxruntime-genai must report CUDA, each genai model's `device_type` must be
cuda, and loading it must take GPU memory (recorded, with the library onnxruntime-genai loaded).

Usage:
  python bench/onnx_llm_gpu.py --shape llama3-8b --layers 8 --device cuda --dir /tmp/onnx-llm-gpu --json r.json
  python bench/onnx_llm_gpu.py --shape llama-tiny --device cpu --dir /tmp/onnx-llm-tiny       (a CPU smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from onnx_llm import NEW_TOKENS, PROMPT_TOKENS, GenaiRun, build_builder, build_stock, graph_facts, measure_speed  # noqa: E402

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
# Random weights: the bench measures speed, it does not judge these weights' 4-bit agreement (as bench/onnx_gpu.py).
RELAXED = {"top1_agreement": 0.0, "kl_divergence": 100.0}
_STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def genai_recipe(source: Path, name: str, device: str) -> str:
    return (
        f"schema_version: 1\nname: {name}\nsource:\n  model: {source}\n  task: text-generation\n"
        f"export:\n  format: onnx\n  exporter: genai\n  provider: {PROVIDERS[device]}\n  quantize: int4\n"
        f"  block_size: 32\nverify:\n  thresholds: {json.dumps(RELAXED)}\n"
    )


def gate_facts(folder: Path) -> dict:
    """Where builder's gate ran the graph (a stock folder has no manifest)."""
    if not (folder / "manifest.json").is_file():
        return {}
    report = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["verification"]
    return {"gate_passed": report["passed"], "gate_provider": report["provider"]}


def prompt_ids(source: Path) -> list[int]:
    from transformers import AutoTokenizer

    from builder.steps.gate import eval_sentences

    ids = AutoTokenizer.from_pretrained(str(source))(" ".join(eval_sentences(64)))["input_ids"]
    assert len(ids) >= PROMPT_TOKENS, len(ids)
    return ids[:PROMPT_TOKENS]


def check_onnxruntime(device: str) -> dict:
    """Which onnxruntime and onnxruntime-genai this process runs; on CUDA, refuses a CPU-only one."""
    import onnxruntime
    import onnxruntime_genai as og

    if device == "cuda":
        onnxruntime.preload_dlls()
    facts = {
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_file": onnxruntime.__file__,
        "onnxruntime_device": onnxruntime.get_device(),
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "onnxruntime_genai": f"{og.__id__} {og.__version__}",
        "onnxruntime_genai_loaded": os.environ.get("ORT_LIB_PATH"),  # set by onnxruntime_genai's import
        "genai_cuda_available": og.is_cuda_available(),
    }
    if device == "cuda" and not (
        facts["onnxruntime_device"] == "GPU"
        and "CUDAExecutionProvider" in facts["onnxruntime_providers"]
        and facts["genai_cuda_available"]
    ):
        raise SystemExit(f"onnxruntime or onnxruntime-genai cannot run on CUDA here: {facts}")
    return facts


class CheckedGenaiRun(GenaiRun):
    """GenaiRun that records where its model went: `device_type`, and on CUDA the GPU memory its load took."""

    def __init__(self, folder: Path, device: str):
        used_before = _gpu_used() if device == "cuda" else 0
        super().__init__(folder)
        self.device_type = self.model.device_type
        self.gpu_mib = round((_gpu_used() - used_before) / 2**20) if device == "cuda" else None
        if device == "cuda" and (self.device_type.lower() != "cuda" or self.gpu_mib < 100):
            raise SystemExit(f"{folder}: onnxruntime-genai loaded it on {self.device_type}, {self.gpu_mib} MiB of GPU")


def _gpu_used() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()  # the whole device's, so it sees onnxruntime's allocations too
    return total - free


class BnbRun:
    """The bitsandbytes nf4 model (double quant, bf16 compute) in PyTorch, greedy `generate`."""

    def __init__(self, source: Path, device: str):
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        self.torch, self.device = torch, device
        self.model = AutoModelForCausalLM.from_pretrained(
            str(source), quantization_config=config, dtype=torch.bfloat16, device_map={"": device}
        )
        self.footprint_mb = round(self.model.get_memory_footprint() / 1e6, 1)

    def _generate(self, ids, new_tokens: int) -> tuple[float, list[int]]:
        torch = self.torch
        self._sync()
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
        self._sync()
        return time.perf_counter() - started, out[0, ids.shape[1] :].tolist()

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def __call__(self, ids: list[int]) -> tuple[float, float, list[int]]:
        tensor = self.torch.tensor([ids], device=self.device)
        prefill, _ = self._generate(tensor, 1)
        whole, tokens = self._generate(tensor, NEW_TOKENS)
        return prefill, whole - prefill, tokens


def ratios(results: dict[str, dict]) -> dict:
    """builder's graph against the stock one and each graph against bitsandbytes, from what was measured."""
    measured = {name: r for name, r in results.items() if "decode_tok_s" in r}
    found = {}
    if {"builder-genai", "stock"} <= measured.keys():
        genai, stock = measured["builder-genai"], measured["stock"]
        found["builder_genai_vs_stock"] = {
            "decode": round(genai["decode_tok_s"] / stock["decode_tok_s"], 3),
            "prefill_ms": round(genai["prefill_ms"] / stock["prefill_ms"], 3),
            "file": round(genai["file_mb"] / stock["file_mb"], 3),
        }
    for name in ("builder-genai", "stock"):
        if {name, "bnb-nf4"} <= measured.keys():
            decode = measured[name]["decode_tok_s"] / measured["bnb-nf4"]["decode_tok_s"]
            found[f"{name.replace('-', '_')}_vs_bnb_nf4_decode"] = round(decode, 3)
    return found


def versions(device: str) -> dict:
    import bitsandbytes
    import onnx
    import torch
    import transformers

    found = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "onnx": onnx.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    if device == "cuda":
        found["gpu"] = torch.cuda.get_device_name()
    return found


def main(argv: list[str] | None = None) -> int:
    from checkpoints import SHAPES, generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--device", choices=sorted(PROVIDERS), default="cuda")
    parser.add_argument("--dir", type=Path, required=True, help="work folder (emptied)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    facts = check_onnxruntime(args.device)
    log(json.dumps(facts))
    shutil.rmtree(args.dir, ignore_errors=True)
    out = args.dir / "out"
    out.mkdir(parents=True)
    source = generate(args.shape, args.dir / "source", device=args.device, layers=args.layers)
    log(f"checkpoint {args.shape} ({args.layers or SHAPES[args.shape]['num_hidden_layers']} layers) in {source}")
    name = f"{args.shape}-onnx-int4-genai"
    recipe = args.dir / f"{name}.yaml"
    recipe.write_text(genai_recipe(source, name, args.device), encoding="utf-8")
    ids = prompt_ids(source)
    results: dict[str, dict] = {}
    runs = {}
    for contender, build in (
        ("builder-genai", lambda: build_builder(recipe, out, name, args.device)),
        ("stock", lambda: build_stock(out, source, args.device)),
    ):
        log(f"{contender}: building")
        try:
            folder, results[contender] = build()
        except RuntimeError as error:  # a failed build; the other contenders still run
            results[contender] = {"error": str(error)}
            log(f"{contender}: {error}")
            continue
        results[contender] |= graph_facts(folder) | gate_facts(folder)
        run = CheckedGenaiRun(folder, args.device)
        results[contender] |= {"device_type": run.device_type, "gpu_mib_on_load": run.gpu_mib}
        log(f"{contender}: {json.dumps(results[contender])}")
        runs[contender] = run
    log("bnb-nf4: loading")
    started = time.perf_counter()
    bnb = BnbRun(source, args.device)
    results["bnb-nf4"] = {
        "load_quantize_seconds": round(time.perf_counter() - started, 1),
        "footprint_mb": bnb.footprint_mb,
    }
    runs["bnb-nf4"] = bnb
    log("measuring")
    for contender, speed in measure_speed(runs, ids, args.runs).items():
        results[contender] |= speed
    report = {
        "shape": args.shape,
        "layers": args.layers or SHAPES[args.shape]["num_hidden_layers"],
        "device": args.device,
        "runs": args.runs,
        "versions": versions(args.device),
        "onnxruntime": facts,
        "results": results,
        "ratios": ratios(results),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
