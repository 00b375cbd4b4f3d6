"""Benchmark: the gate worker's peak host memory when it runs a model block by block, by depth, before and after.

For each depth it saves a deep, narrow random Llama (hidden 1024 by default, deterministic weights, bfloat16
safetensors) and runs the gate's worker (`python -m builder.steps.metrics`, as the gate starts it under a device
memory cap) on it with a cap the weights pass, so the worker runs block by block, on this machine's CPU. It runs
the worker twice: with the code at `--before` (exported with `git archive`) and with this checkout's. Each worker's
peak RSS is its own (`ru_maxrss`, see `_PEAK_RSS`). It prints a Markdown table (peak RSS, and the ratio after/before)
and writes JSON.

Usage:
  python bench/blockwise_rss.py --layers 8,16,32 --dir /tmp/bench-rss [--before 8002e88] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "8002e88"
"""The last commit whose by-blocks path kept every decoder block in host memory."""
CAP = 64 << 20
"""The device memory cap the worker gets: far below the weights, so it runs block by block."""
_PEAK_RSS = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)
"""Run a command and print its peak RSS (KiB). Linux counts the image a process had before `exec` in its peak, so
a worker forked straight from this script would report this script's RSS (the models it built) whenever that is
larger: forked from this small process instead, its peak is its own."""


def _model(folder: Path, layers: int, hidden: int) -> Path:
    """A random Llama of `layers` blocks (seed 0) saved in bfloat16, unless `folder` holds it already."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def _spec(folder: Path, out: Path) -> Path:
    """The worker's spec (see `builder.steps.metrics`): short inputs, as the bench measures memory, not metrics."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (1, 96), generator=generator)
    spec = {
        "folder": str(folder),
        "task": "text-generation",
        "dtype": "bfloat16",
        "device": "cpu",
        "inputs": {"eval_chunks": [ids[:, :64]], "prompts": [ids[:, 64:80]], "latency_ids": ids[:, :32]},
        "max_new_tokens": 4,
        "max_device_memory": CAP,
    }
    path = out / f"spec-{folder.name}.pt"
    torch.save(spec, path)
    return path


def _export(revision: str, target: Path) -> Path:
    """`builder/` as it was at `revision`, under `target`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", revision, "builder"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def _worker(code: Path, folder: Path, spec: Path) -> dict:
    """Run the gate worker of the code at `code` on `spec` (through `_PEAK_RSS`): its peak RSS, wall time and
    offload record."""
    import torch

    out = spec.with_suffix(f".{code.name}.out.pt")
    env = dict(os.environ, PYTHONPATH=str(code))
    started = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _PEAK_RSS,
            sys.executable,
            "-m",
            # the gate worker's entry point (builder.steps.metrics before issue 27 moved it)
            "builder.steps.runs" if (code / "builder" / "steps" / "runs.py").is_file() else "builder.steps.metrics",
            str(folder),
            "text-generation",
            "cpu",
        ],
        cwd=code,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, tail = process.communicate(f"{spec}\n{out}\n")
    if process.returncode != 0:
        raise SystemExit(f"worker of {code} failed ({process.returncode}): {tail[-2000:]}")
    outputs = torch.load(out, weights_only=True)
    return {
        "peak_rss_bytes": int(stdout.split()[-1]) * 1024,  # Linux reports KiB
        "seconds": round(time.perf_counter() - started, 2),
        "forward": outputs.get("forward"),
        "offload": outputs.get("offload"),
    }


def _versions() -> dict:
    import accelerate
    import safetensors
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="8,16,32", help="comma-separated depths")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-blockwise-rss")
    parser.add_argument("--before", default=BEFORE, help="git revision of the code to compare with")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    args.dir.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(prefix="before-") as before_root:
        before = _export(args.before, Path(before_root) / "before")
        for layers in (int(n) for n in args.layers.split(",")):
            folder = _model(args.dir / f"llama-h{args.hidden}-l{layers}", layers, args.hidden)
            spec = _spec(folder, args.dir)
            weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            row = {"layers": layers, "weights_bytes": weights}
            row["before"], row["after"] = _worker(before, folder, spec), _worker(REPO, folder, spec)
            row["ratio"] = row["after"]["peak_rss_bytes"] / row["before"]["peak_rss_bytes"]
            rows.append(row)

    gib = 1 << 30
    print(f"Gate worker by blocks on {platform.machine()}, before {args.before}, after {head}:")
    print("| layers | weights GiB | peak RSS before GiB | peak RSS after GiB | after/before |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['layers']} | {row['weights_bytes'] / gib:.2f} | {row['before']['peak_rss_bytes'] / gib:.2f} | "
            f"{row['after']['peak_rss_bytes'] / gib:.2f} | {row['ratio']:.2f} |"
        )
    first, last = rows[0], rows[-1]
    for side in ("before", "after"):
        growth = last[side]["peak_rss_bytes"] / first[side]["peak_rss_bytes"]
        print(f"{side}: peak RSS x{growth:.2f} from {first['layers']} to {last['layers']} layers")
    if args.json:
        record = {"before": args.before, "after": head, "hidden": args.hidden, "versions": _versions(), "rows": rows}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
