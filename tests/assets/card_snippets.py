"""Run every Python snippet of an artifact's card the way a reader would: pasted into a fresh interpreter with no
`builder` in it, loading the artifact folder where the card loads the Hub repo.

Shared by tests/unit/test_card_snippets.py, the integration builds and the conformance matrix's cell check.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_SNIPPET = re.compile(r"```python\n(.*?)```", re.S)
_BUILDER_IMPORT = re.compile(r"^\s*(import|from)\s+builder\b", re.M)
# Snippets for a library the main environment lacks: optimum's ORTModel classes (optimum-onnx), which
# `make test-interop` runs on these folders in its own environment.
ELSEWHERE = {"optimum.onnxruntime": "make test-interop"}


def card_snippets(folder: Path) -> list[str]:
    """The Python code blocks of `folder`/README.md, in order."""
    return _SNIPPET.findall((folder / "README.md").read_text(encoding="utf-8"))


def repo_id_of(folder: Path) -> str:
    """The repo the card's snippets load from, as `builder.card.render_card` names it."""
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return (manifest["recipe"].get("publish") or {}).get("repo") or f"<org>/{manifest['name']}"


def local_snippet(code: str, repo_id: str, folder: Path) -> str:
    """`code` loading `folder` where it loads `repo_id` (what the card tells a reader to do to run it from disk)."""
    path = repr(str(folder))
    local = code.replace(f'snapshot_download("{repo_id}")', path).replace(f'"{repo_id}"', path)
    assert local != code, f"the snippet never loads {repo_id!r}:\n{code}"
    return local


def runs_elsewhere(code: str) -> bool:
    """Whether `code` imports a module of `ELSEWHERE` that this interpreter cannot import."""
    return any(
        re.search(rf"^from {re.escape(module)} import", code, re.M) and importlib.util.find_spec(module) is None
        for module in ELSEWHERE
    )


def run_card_snippets(folder: Path, timeout: float = 300) -> list[str | None]:
    """Run each snippet of `folder`'s card in a new interpreter whose working directory is an empty temporary
    folder and whose environment has no PYTHONPATH (and the Hub offline); return each one's stdout (None for one
    that `runs_elsewhere`). Fails with the snippet and its stderr when one exits non-zero or imports builder."""
    repo_id = repo_id_of(folder)
    snippets = card_snippets(folder)
    assert snippets, f"{folder / 'README.md'} has no Python snippet"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    outputs: list[str | None] = []
    for code in snippets:
        assert not _BUILDER_IMPORT.search(code), f"a card snippet imports builder:\n{code}"
        if runs_elsewhere(code):
            outputs.append(None)
            continue
        with tempfile.TemporaryDirectory(prefix="card-snippet-") as cwd:
            done = subprocess.run(
                [sys.executable, "-c", local_snippet(code, repo_id, folder)],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=cwd,
                env=env,
            )
        assert done.returncode == 0, f"the card's snippet failed:\n{code}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    return outputs
