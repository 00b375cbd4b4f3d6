"""`builder demo` (what `make demo` runs): the whole job end to end on the embedded default, printing each stage.

build + verify recipes/smollm2/nf4.yaml -> start the local registry on 127.0.0.1 (a free port) -> publish the
artifact to it with `builder publish` -> in a fresh process with HF_ENDPOINT pointing at the registry, download it,
check every file's sha256 against the manifest, load it with stock `AutoModelForCausalLM.from_pretrained(repo)` and
generate text.

Publishing and loading run in subprocesses because huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET when it
is imported, exactly as a user's own process would.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from builder.errors import BuilderError
from builder.hub.server import start_in_thread
from builder.pipeline import build_file
from builder.report import write_report

DEFAULT_RECIPE = "recipes/smollm2/nf4.yaml"
PROMPT = "What is the capital of France?"

# Runs in the fresh process: download, check hashes, load with stock transformers, generate.
_LOAD_BACK = r"""
import hashlib, json, sys, time
from pathlib import Path
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer

repo, prompt = sys.argv[1], sys.argv[2]
start = time.perf_counter()
folder = Path(snapshot_download(repo))
manifest = json.loads((folder / "manifest.json").read_text())
for name, entry in manifest["files"].items():
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert digest == entry["sha256"], f"{name}: sha256 {digest} != manifest {entry['sha256']}"
print(f"downloaded {len(manifest['files']) + 1} files in {time.perf_counter() - start:.1f}s; every sha256 matches "
      "the manifest", flush=True)
tokenizer = AutoTokenizer.from_pretrained(repo)
model = AutoModelForCausalLM.from_pretrained(repo)
quantization = getattr(model.config, "quantization_config", None) or {}
quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
method = getattr(quantization.get("quant_method"), "value", quantization.get("quant_method"))
if quantization.get("load_in_4bit"):
    method = f"{method} 4-bit {quantization.get('bnb_4bit_quant_type')}"
elif quantization.get("load_in_8bit"):
    method = f"{method} 8-bit"
print(f"loaded {type(model).__name__} ({method}), {model.get_memory_footprint() / 2**20:.1f} MiB in memory",
      flush=True)
if tokenizer.chat_template:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
else:
    inputs = tokenizer(prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
answer = tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
print(f"generated: {prompt!r} -> {answer!r}")
"""


def run_demo(
    recipe: str | Path = DEFAULT_RECIPE,
    *,
    out: str | Path = "artifacts",
    root: Path | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Build, verify, serve, publish and load back (see the module docstring). Raises BuilderError on failure."""

    started = time.perf_counter()
    say(f"[1/4] build + verify {recipe}")
    result = build_file(recipe, out=out)[0]
    report = result.manifest.verification
    metrics = ", ".join(
        f"{k} {v:.3f}" for k, v in sorted((report.metrics if report else {}).items()) if isinstance(v, float)
    )
    say(
        f"      {result.name}: {result.status} at {result.path}; verification "
        f"{'passed' if result.manifest.passed else 'FAILED'} ({metrics})"
    )
    repo = (result.manifest.recipe.get("publish") or {}).get("repo") or f"demo/{result.name}"
    with tempfile.TemporaryDirectory(prefix="builder-demo-") as scratch:
        hub_root = root or Path(scratch) / "hub"
        token = "hf_demo_" + secrets.token_hex(8)
        server = start_in_thread(hub_root, host="127.0.0.1", port=0, token=token)
        try:
            say(
                f"[2/4] local registry at {server.url} (root {hub_root}); clients use "
                f"HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1"
            )
            env = {
                **os.environ,
                "HF_ENDPOINT": server.url,
                "HF_HUB_DISABLE_XET": "1",
                "HF_TOKEN": token,
                "HF_HOME": str(Path(scratch) / "hf-home"),
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            }
            say(f"[3/4] builder publish {result.path} --repo {repo}")
            _run([sys.executable, "-m", "builder", "publish", str(result.path), "--repo", repo], env, say, "publish")
            say(f"[4/4] load {repo} back in a fresh process with stock transformers")
            _run([sys.executable, "-c", _LOAD_BACK, repo, PROMPT], env, say, "load back")
        finally:
            server.shutdown()
            server.server_close()
    say(f"report of {out} (size vs quality, gates): {write_report([out], Path(out) / 'report.html')[0]}")
    say(f"demo done in {time.perf_counter() - started:.0f}s")


def _run(command: list[str], env: dict, say: Callable[[str], None], stage: str) -> None:
    process = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    for line in process.stdout.splitlines():
        if line.strip() and not line.startswith(("Loading weights", "Fetching")) and "\r" not in line:
            say(f"      {line}")
    if process.returncode != 0:
        raise BuilderError(f"demo stage '{stage}' failed (exit {process.returncode}); its output is above")
