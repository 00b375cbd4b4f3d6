"""Benchmark: the hand-written transformers script vs the streaming builder vs plain file I/O, same run, same cache.

For each method (nf4+double quant, nf4, fp4, int8) it runs, each in its own subprocess so that peak host RSS and
peak GPU memory are the contender's own:
- transformers: `from_pretrained(quantization_config=BitsAndBytesConfig(...), dtype=bfloat16)` then
  `save_pretrained` (the seeds' script);
- stream: `builder.steps.stream.stream_build` on the equivalent recipe;
- floor: reading every checkpoint byte, then writing as many bytes as the streamed artifact, with plain file I/O;
- build: `builder build` end to end (resolve, stream, the verification gate, write) with an empty reference cache;
- build-warm: the same build again (--force) with the cache the first one filled, as a rebuild or a second variant
  of the source gets it.
Then it checks that both artifacts hold the same tensors byte for byte. It prints a Markdown table and writes JSON.
The builds' recipe relaxes the gate's thresholds (random weights) and `--max-gpu-memory` passes a cap to them.

Usage:
  python bench/run.py --shape llama3-8b --dir /tmp/bench --device cuda [--methods nf4-dq,int8] [--cap-gb 4,1]
  python bench/run.py --shape llama3-70b --layers 8 --device cuda --methods nf4-dq --max-gpu-memory 16GiB
  python bench/run.py --shape smollm2 --shape llama-1b --device cpu          (what `make bench` runs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

METHODS = {
    "nf4-dq": {"method": "bnb-4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
    "nf4": {"method": "bnb-4bit", "quant_type": "nf4", "compute_dtype": "bfloat16"},
    "fp4": {"method": "bnb-4bit", "quant_type": "fp4", "compute_dtype": "bfloat16"},
    "int8": {"method": "bnb-8bit"},
}
_CHUNK = 64 << 20
CONTENDERS = ("transformers", "stream", "floor", "build", "build-warm")
# Random weights agree with their quantized selves far less than a trained model does: the bench times the gate, it
# does not judge these weights.
_BENCH_THRESHOLDS = {"top1_agreement": 0.0, "kl_divergence": 100.0, "perplexity_ratio": 100.0, "footprint_ratio": 1.0}


def _recipe(source: Path, method: str):
    from builder.recipe import Recipe

    return Recipe.model_validate(
        {
            "schema_version": 1,
            "name": f"bench-{method}",
            "source": {"model": str(source), "dtype": "bfloat16"},
            "quantize": METHODS[method],
        }
    )


# --- contenders (each runs in a child process) -------------------------------------------------------------------


def contender(
    kind: str,
    source: Path,
    out: Path,
    method: str,
    device: str,
    cap_gb: float | None,
    artifact_bytes: int,
    max_gpu_memory: str | None = None,
) -> dict:
    import bitsandbytes  # noqa: F401  (imports are not what is timed: both contenders get them done first)
    import torch
    import transformers.modeling_utils  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.quantizers  # noqa: F401

    import builder.steps.stream  # noqa: F401

    if device.startswith("cuda"):
        torch.cuda.init()
        device = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device
        if cap_gb:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total), device)
    stages: dict[str, float] = {}
    start = time.perf_counter()
    error = None
    try:
        match kind:
            case "transformers":
                _transformers(source, out, method, device, stages)
            case "stream":
                _stream(source, out, method, device, stages)
            case "floor":
                _floor(source, out, artifact_bytes, stages)
            case "build" | "build-warm":
                error = _build(source, out, method, device, stages, max_gpu_memory)
    except torch.OutOfMemoryError as oom:
        error = f"out of GPU memory: {str(oom).splitlines()[0][:160]}"
    wall = time.perf_counter() - start
    gpu = torch.cuda.max_memory_reserved(device) if device.startswith("cuda") else None
    return {
        "kind": kind,
        "method": method,
        "wall_s": round(wall, 3),
        "stages": stages,
        "error": error,
        "gpu_peak_bytes": gpu,
        "rss_peak_bytes": _peak_rss(),
        "artifact_bytes": _size(out) if out.exists() else 0,
        "cap_gb": cap_gb,
    }


def _peak_rss() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(stages: dict, name: str, start: float) -> float:
    now = time.perf_counter()
    stages[name] = round(now - start, 3)
    return now


def _transformers(source: Path, out: Path, method: str, device: str, stages: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from builder.steps.bnb import bnb_config

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        source,
        quantization_config=bnb_config(_recipe(source, method).quantize),
        dtype=torch.bfloat16,
        device_map={"": device},
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = _timed(stages, "load+quantize", start)
    model.save_pretrained(out)
    _timed(stages, "save", start)


def _stream(source: Path, out: Path, method: str, device: str, stages: dict) -> None:
    from builder.steps.stream import stream_build

    stages.update(stream_build(_recipe(source, method), source, out, device)["timings"])


def _build(source: Path, out: Path, method: str, device: str, stages: dict, max_gpu_memory: str | None) -> str | None:
    """`builder build` in this process (imports done, like the others'). Its gate runs on this process's threads
    without a cap, else in worker processes of its own."""
    import yaml

    from builder.cli import main

    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = out.parent / f"recipe-{method}.yaml"
    spec = {
        "schema_version": 1,
        "name": out.name,
        "source": {"model": str(source), "dtype": "bfloat16"},
        "quantize": METHODS[method],
        "verify": {"thresholds": _BENCH_THRESHOLDS},
    }
    recipe.write_text(yaml.safe_dump(spec), encoding="utf-8")
    argv = ["build", str(recipe), "--out", str(out.parent), "--device", device, "--force", "--quiet"]
    code = main(argv + (["--max-gpu-memory", max_gpu_memory] if max_gpu_memory else []))
    if code != 0:
        return f"builder build exited {code}"
    manifest = json.loads((out / "manifest.json").read_text())
    stages.update(manifest["timings"])
    report = manifest["verification"]
    stages["reference_cached"] = report["reference"]["cached"]
    stages["forward"] = f"{report['reference']['forward']}/{report['candidate']['forward']}"
    stages["candidate_overlapped_reference"] = report["candidate"]["overlapped"]
    # Where the gate ran (`builder.steps.verify.runner`): the peaks of a build with "threads" include its models.
    stages["gate_runs"] = "processes" if max_gpu_memory else "threads"
    for who in ("reference", "candidate"):
        if "device_peak_bytes" in report[who]:
            stages[f"{who}_gpu_peak_gib"] = round(report[who]["device_peak_bytes"] / 2**30, 2)
        stages |= {f"{who} {stage}": seconds for stage, seconds in report[who]["stages"].items()}
    stages["compare"] = report["performance"]["compare_seconds"]
    return None


def _floor(source: Path, out: Path, artifact_bytes: int, stages: dict) -> None:
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    start = time.perf_counter()
    for file in sorted(source.glob("*.safetensors")):
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass
    start = _timed(stages, "read", start)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.safetensors", "wb", buffering=0) as handle:
        left = artifact_bytes
        while left > 0:
            left -= handle.write(view[: min(left, _CHUNK)])
    _timed(stages, "write", start)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


# --- the orchestrator --------------------------------------------------------------------------------------------


def _child(
    kind: str,
    source: Path,
    out: Path,
    method: str,
    device: str,
    cap: float | None = None,
    artifact_bytes: int = 0,
    max_gpu_memory: str | None = None,
    cache: Path | None = None,
) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # dropped before it is flushed: no writeback left for the next one
    command = [
        sys.executable,
        __file__,
        "--contender",
        kind,
        "--source",
        str(source),
        "--out",
        str(out),
        "--methods",
        method,
        "--device",
        device,
        "--artifact-bytes",
        str(artifact_bytes),
    ]
    if cap:
        command += ["--cap-gb", str(cap)]
    if max_gpu_memory:
        command += ["--max-gpu-memory", max_gpu_memory]
    env = {**os.environ, "TQDM_DISABLE": "1"} | ({"BUILDER_CACHE_DIR": str(cache)} if cache else {})
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"kind": kind, "method": method, "error": " | ".join(tail)[-300:], "cap_gb": cap}
    row = json.loads(lines[-1])
    if row.get("error") and done.stderr.strip():  # what the failed build said
        row["error"] += ": " + " | ".join(done.stderr.strip().splitlines()[-3:])[-600:]
    return row


def _same_tensors(a: Path, b: Path) -> str:
    """'identical' or the first difference: every tensor of both artifacts compared byte for byte."""
    from contextlib import ExitStack

    import torch
    from safetensors import safe_open

    with ExitStack() as stack:

        def index(folder: Path) -> dict:
            found = {}
            for file in sorted(folder.glob("*.safetensors")):
                handle = stack.enter_context(safe_open(file, "pt"))
                found.update(dict.fromkeys(handle.keys(), handle))
            return found

        ours, theirs = index(a), index(b)
        if set(ours) != set(theirs):
            return f"different keys: {sorted(set(ours) ^ set(theirs))[:3]}"
        for key in sorted(ours):
            s, t = ours[key].get_tensor(key), theirs[key].get_tensor(key)
            if (
                s.dtype != t.dtype
                or s.shape != t.shape
                or not torch.equal(s.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
            ):
                return f"{key} differs"
    for name in ("config.json", "generation_config.json"):
        if (a / name).read_bytes() != (b / name).read_bytes():
            return f"{name} differs"
    return "identical"


def _warm(source: Path) -> None:
    buffer = memoryview(bytearray(_CHUNK))
    for file in sorted(source.glob("*.safetensors")):
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def bench(
    shape: str,
    root: Path,
    device: str,
    methods: list[str],
    caps: list[float],
    hf_cap: float | None,
    verify: bool,
    save,
    *,
    contenders: tuple[str, ...] = CONTENDERS,
    layers: int | None = None,
    max_gpu_memory: str | None = None,
    clean: bool = False,
) -> dict:
    """Run the contenders for every method (then the capped runs), calling `save(result)` after each step."""
    from checkpoints import generate

    start = time.perf_counter()
    name = f"{shape}-{layers}l" if layers else shape
    source = generate(shape, root / name, layers=layers)
    result = {
        "shape": name,
        "device": device,
        "machine": _machine(device),
        "versions": _versions(),
        "source_bytes": sum(p.stat().st_size for p in source.glob("*.safetensors")),
        "generate_s": round(time.perf_counter() - start, 1),
        "rows": [],
        "equal": {},
    }
    _warm(source)
    outputs = {kind: root / f"out-{kind}" for kind in ("transformers", "stream", "floor")}
    outputs["build"] = outputs["build-warm"] = root / "out-build" / "bench"
    for method in methods:
        rows = {}
        for kind in ("transformers", "stream"):
            if kind in contenders:
                rows[kind] = _child(kind, source, outputs[kind], method, device)
        if verify and {"transformers", "stream"} <= set(rows) and not any(r.get("error") for r in rows.values()):
            result["equal"][method] = _same_tensors(outputs["stream"], outputs["transformers"])
        for folder in outputs.values():
            shutil.rmtree(folder, ignore_errors=True)
        if "floor" in contenders:
            written = rows.get("stream", {}).get("artifact_bytes") or source_bytes_estimate(source, method)
            rows["floor"] = _child("floor", source, outputs["floor"], method, device, artifact_bytes=written)
        cache = root / f"cache-{method}"
        shutil.rmtree(cache, ignore_errors=True)  # `build` starts cold; `build-warm` finds what it left
        for kind in ("build", "build-warm"):
            if kind in contenders:
                rows[kind] = _child(
                    kind, source, outputs[kind], method, device, max_gpu_memory=max_gpu_memory, cache=cache
                )
        shutil.rmtree(root / "out-build", ignore_errors=True)
        result["rows"] += list(rows.values())
        print(_table(list(rows.values())), flush=True)
        save(result)
    for cap in caps:
        for method in methods:
            result["rows"].append(_child("stream", source, outputs["stream"], method, device, cap))
            save(result)
    if hf_cap:
        result["rows"].append(_child("transformers", source, outputs["transformers"], methods[0], device, hf_cap))
    for folder in outputs.values():
        shutil.rmtree(folder, ignore_errors=True)
    if clean:
        for folder in [source, *(root / f"cache-{method}" for method in methods)]:
            shutil.rmtree(folder, ignore_errors=True)
    save(result)
    return result


def source_bytes_estimate(source: Path, method: str) -> int:
    """What the floor writes when the stream did not run: the checkpoint's bytes at the method's bits."""
    ratio = 0.56 if method == "int8" else 0.36
    return int(sum(p.stat().st_size for p in source.glob("*.safetensors")) * ratio)


def _machine(device: str) -> dict:
    import torch

    machine = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def _versions() -> dict:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("torch", "transformers", "bitsandbytes", "safetensors")}


def _table(rows: list[dict]) -> str:
    """Markdown: one line per contender, with ratios against the transformers script and the I/O floor."""
    by = {(r["method"], r["kind"]): r for r in rows if not r.get("cap_gb")}
    lines = [
        "| method | contender | wall s | stages s | GPU peak GiB | RSS peak GiB | artifact GB | x HF | x floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['method']} | {row['kind']}{_cap(row)} | failed: {row['error']} | | | | | | |")
            continue
        hf, floor = by.get((row["method"], "transformers")), by.get((row["method"], "floor"))

        def ratio(base, row=row):
            return f"{row['wall_s'] / base['wall_s']:.2f}" if base and not base.get("error") else ""

        stages = ", ".join(f"{k} {v}" for k, v in row["stages"].items())
        if row["kind"].startswith("build") and row.get("rss_peak_bytes") is not None:
            where = "with" if row["stages"].get("gate_runs") == "threads" else "not"
            stages += f" (peaks: the build's own process, {where} its gate's runs)"
        gpu = f"{row['gpu_peak_bytes'] / 2**30:.2f}" if row.get("gpu_peak_bytes") is not None else "-"
        lines.append(
            f"| {row['method']} | {row['kind']}{_cap(row)} | {row['wall_s']:.2f} | {stages} | {gpu} | "
            f"{row['rss_peak_bytes'] / 2**30:.2f} | {row['artifact_bytes'] / 1e9:.3f} | "
            f"{ratio(hf) if row['kind'] != 'transformers' else ''} | "
            f"{ratio(floor) if row['kind'] != 'floor' else ''} |"
        )
    return "\n".join(lines)


def _cap(row: dict) -> str:
    return f" (GPU capped at {row['cap_gb']} GiB)" if row.get("cap_gb") else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape", action="append", help="llama3-8b, llama3-70b, llama-1b, llama-0.3b, smollm2 (repeatable)"
    )
    parser.add_argument("--dir", default="/tmp/builder-bench", help="where checkpoints and outputs go")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--cap-gb", default="", help="GPU memory caps (GiB, comma-separated) to stream under")
    parser.add_argument(
        "--hf-cap-gb",
        type=float,
        default=None,
        help="GPU cap (GiB) to try the transformers script under, with the first method",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the byte-for-byte comparison")
    parser.add_argument(
        "--contenders", default=",".join(CONTENDERS), help="which to run, comma-separated (default: all of %(default)s)"
    )
    parser.add_argument(
        "--layers", default="", help="decoder layers to cut the shape to (comma-separated: one run each, e.g. 2,4,8)"
    )
    parser.add_argument("--clean", action="store_true", help="delete each generated checkpoint after its run (disk)")
    parser.add_argument(
        "--max-gpu-memory", default=None, help="passed to the builds (e.g. 16GiB): the gate runs block by block past it"
    )
    parser.add_argument("--json", default=None, help="write the results here (default: DIR/results-<device>.json)")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--artifact-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    caps = [float(c) for c in args.cap_gb.split(",") if c]
    if args.contender:
        print(
            json.dumps(
                contender(
                    args.contender,
                    Path(args.source),
                    Path(args.out),
                    methods[0],
                    args.device,
                    caps[0] if caps else None,
                    args.artifact_bytes,
                    args.max_gpu_memory,
                )
            )
        )
        return 0
    root = Path(args.dir)
    out = Path(args.json or root / f"results-{args.device.replace(':', '')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def save(result: dict) -> None:
        out.write_text(json.dumps([*results, result], indent=2), encoding="utf-8")

    contenders = tuple(args.contenders.split(","))
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(sorted(unknown))}; choose from {', '.join(CONTENDERS)}")
    for shape in args.shape or ["smollm2"]:
        for layers in [int(n) for n in args.layers.split(",") if n] or [None]:
            results.append(
                bench(
                    shape,
                    root,
                    args.device,
                    methods,
                    caps,
                    args.hf_cap_gb,
                    not args.no_verify,
                    save,
                    contenders=contenders,
                    layers=layers,
                    max_gpu_memory=args.max_gpu_memory,
                    clean=args.clean,
                )
            )
    for result in results:
        print(f"\n## {result['shape']} on {result['device']} ({result['machine']}, {result['versions']})\n")
        print(_table(result["rows"]))
        print(f"\nsource {result['source_bytes'] / 1e9:.2f} GB; streamed == transformers: {result['equal']}")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
