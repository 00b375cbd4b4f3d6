"""What a build prints: no library noise (bitsandbytes' per-forward casts, its missing optional kernels, an export
of a module in training mode), one line per outcome, stage lines in order, and with --quiet results only."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import write_recipe

from builder.console import library_noise_filtered

NOISE = ("MatMul8bitLt", "kernels-community", "training mode")


def _build(recipe: Path, out: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    """`builder build` in a fresh process, so bitsandbytes is first imported (and says its piece) inside it."""
    return subprocess.run(
        [sys.executable, "-m", "builder", "build", str(recipe), "--out", str(out), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "BUILDER_CACHE_DIR": str(cache)},
        timeout=600,
    )


def _assert_quiet_and_in_order(done: subprocess.CompletedProcess, name: str) -> None:
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stderr.splitlines() if any(n in line for n in NOISE)], done.stderr
    assert done.stdout.count(f"{name}: built") == 1 and "built" not in done.stderr
    stages = [line for line in done.stderr.splitlines() if line.startswith(f"{name}: ")]
    verify_at = stages.index(f"{name}: [3/4] verify")
    assert [int(m[1]) for line in stages if (m := re.search(r"\[(\d)/4\]", line))] == [1, 2, 3, 4]
    assert not [line for line in stages[:verify_at] if ": verify: " in line]  # gate runs start early, say late


def test_log_noise_is_dropped_inside_the_block_only(caplog):
    cast = logging.getLogger("bitsandbytes.autograd._functions")
    with library_noise_filtered():
        cast.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.bfloat16")
        cast.warning("something else")
    cast.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
    assert caplog.messages == [
        "something else",
        "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization",
    ]


@pytest.mark.slow
def test_an_int8_build_prints_no_library_noise_and_quiet_prints_results_only(tiny_llama, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llama, "tiny-int8", "  method: bnb-8bit\n")
    done = _build(recipe, tmp_path / "out", tmp_path / "cache")
    _assert_quiet_and_in_order(done, "tiny-int8")
    quiet = _build(recipe, tmp_path / "out", tmp_path / "cache", "--force", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and quiet.stdout.startswith(f"tiny-int8: built -> {tmp_path / 'out' / 'tiny-int8'}\n")


@pytest.mark.slow
def test_an_onnx_build_exports_in_eval_mode_quietly(tiny_llama, tmp_path):
    recipe = tmp_path / "tiny-onnx.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: tiny-onnx\nsource:\n  model: {tiny_llama}\n  task: text-generation\n"
        "export:\n  format: onnx\n  with_past: true\n"
    )
    _assert_quiet_and_in_order(_build(recipe, tmp_path / "out", tmp_path / "cache"), "tiny-onnx")


def test_warning_noise_is_dropped_and_other_warnings_print_once_per_message():
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()  # what a fresh interpreter has: no pytest filters
        with library_noise_filtered():
            for _ in range(3):
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
                warnings.warn("something a user may act on", UserWarning, stacklevel=1)
                warnings.simplefilter("default", ResourceWarning)  # a library changing filters resets the registry
    assert [str(w.message) for w in seen] == ["something a user may act on"]


def test_quiet_leaves_the_libraries_errors_only(caplog, monkeypatch):
    import warnings

    from builder.console import QUIET_ENV

    library = logging.getLogger("transformers.modeling_utils")
    monkeypatch.setenv(QUIET_ENV, "1")
    with warnings.catch_warnings(record=True) as seen, library_noise_filtered():
        warnings.warn("something a user may act on", UserWarning, stacklevel=1)
        library.warning("a library's warning")
        library.error("a library's error")
    monkeypatch.delenv(QUIET_ENV)
    library.warning("after the command")
    assert seen == [] and caplog.messages == ["a library's error", "after the command"]
