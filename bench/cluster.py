"""Benchmark: N tiny recipe builds on a two-node local Ray cluster (`--executor ray`) vs `builder build --jobs 2` on
one host, same run, same recipes, each contender with its own empty reference cache and --out.

The recipes are N bitsandbytes configurations (nf4, fp4, double quant, int8, ...) of one random 2-layer Llama
(hidden 64, SmolLM2's tokenizer and vocabulary), all with the same gate settings; every build runs the full gate on
CPU. The cluster (ray.cluster_utils.Cluster: a head and a second node, one CPU each) is started before the clock;
the submitter's connection is inside it. Both contenders are `builder build` subprocesses. It checks that both
built every artifact with the same build hashes, prints a Markdown table and writes JSON.

Usage: python bench/cluster.py [--builds 6] [--dir /tmp/bench-cluster] [--json bench/results/cpu-cluster-tiny.json]
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
sys.path[:0] = [str(REPO), str(REPO / "tests" / "assets")]

QUANTIZE = [
    "{method: bnb-4bit, quant_type: nf4, compute_dtype: bfloat16}",
    "{method: bnb-4bit, quant_type: fp4, compute_dtype: bfloat16}",
    "{method: bnb-4bit, quant_type: nf4, double_quant: true, compute_dtype: bfloat16}",
    "{method: bnb-4bit, quant_type: fp4, double_quant: true, compute_dtype: bfloat16}",
    "{method: bnb-8bit}",
    "{method: bnb-4bit, quant_type: nf4, compute_dtype: float32}",
    "{method: bnb-4bit, quant_type: fp4, compute_dtype: float32}",
    "{method: bnb-8bit, threshold: 4.0}",
]
VERIFY = 'verify:\n  prompts: ["Hello"]\n  max_new_tokens: 2\n  thresholds: {footprint_ratio: 1.0}\n'


def write_recipes(folder: Path, model: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for k, quantize in enumerate(QUANTIZE[:count]):
        (folder / f"tiny-{k}.yaml").write_text(
            f"schema_version: 1\nname: tiny-{k}\nsource:\n  model: {model}\n  dtype: bfloat16\n"
            f"quantize: {quantize}\n{VERIFY}"
        )
    return folder


def timed_build(recipes: Path, out: Path, cache: Path, *extra: str) -> tuple[float, list[dict]]:
    env = {**os.environ, "BUILDER_CACHE_DIR": str(cache), "BUILDER_QUIET": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "builder", "build", str(recipes), "--out", str(out), "--json", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"builder build {' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=6, help=f"recipes to build (at most {len(QUANTIZE)})")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-cluster"))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    from make_models import tiny_llama  # tests/assets/, on sys.path above

    model = tiny_llama(args.dir / "tiny-llama")
    recipes = write_recipes(args.dir / "recipes", model, args.builds)

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ["BUILDER_QUIET"] = "1"  # the nodes' workers start from this environment
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
    start = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    startup = time.perf_counter() - start
    try:
        local_s, local = timed_build(recipes, args.dir / "out-local", args.dir / "cache-local", "--jobs", "2")
        ray_s, on_ray = timed_build(
            recipes, args.dir / "out-ray", args.dir / "cache-ray", "--executor", "ray", "--ray-address", cluster.address
        )
    finally:
        cluster.shutdown()
    hashes = {row["name"]: row["build_hash"] for row in local}
    same = hashes == {row["name"]: row["build_hash"] for row in on_ray}
    verified = all(row["verification_passed"] for row in local + on_ray) and len(on_ray) == args.builds
    results = {
        "builds": args.builds,
        "local_jobs2_s": round(local_s, 1),
        "ray_2nodes_s": round(ray_s, 1),
        "ray_over_local": round(ray_s / local_s, 2),
        "cluster_startup_s": round(startup, 1),
        "same_build_hashes": same,
        "all_verified": verified,
        "nodes_used": len({row["node"] for row in on_ray}),
        "load_average": os.getloadavg(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}",
        "versions": {name: metadata.version(name) for name in ("ray", "torch", "transformers", "bitsandbytes")},
    }
    print("| contender | wall s | x --jobs 2 |\n|---|---|---|")
    print(f"| `builder build --jobs 2` (one host) | {local_s:.1f} | 1.00 |")
    print(f"| `--executor ray`, 2 nodes x 1 CPU | {ray_s:.1f} | {ray_s / local_s:.2f} |")
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not (same and verified):
        sys.exit("the two contenders disagree: see same_build_hashes / all_verified above")


if __name__ == "__main__":
    main()
