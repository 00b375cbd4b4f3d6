"""Shared fixtures: real-weight model folders (built once from PyPI packages) and a tiny random Llama."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "assets"))


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip without CUDA; `slow` tests skip unless a marker expression is given (`make test-slow`,
    `make test-gpu`), on every host, so `make test` is the same lean tier on a GPU machine."""
    skips = []
    if not _cuda_available():
        skips.append(("gpu", pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on a GPU host)")))
    if not config.getoption("-m"):
        skips.append(("slow", pytest.mark.skip(reason="slow: run with `make test-slow`")))
    for item in items:
        for marker, skip in skips:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def real_models() -> dict[str, Path]:
    """SmolLM2-135M-Instruct (bf16 safetensors) and all-MiniLM-L6-v2 folders under models/."""
    from make_models import ensure_models

    return ensure_models(REPO / "models")


@pytest.fixture(scope="session")
def smollm2(real_models) -> Path:
    return real_models["smollm2-135m-instruct"]


@pytest.fixture(scope="session")
def minilm(real_models) -> Path:
    return real_models["all-minilm-l6-v2"]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 64) with SmolLM2's tokenizer, saved as safetensors: fast unit builds."""
    from make_models import tiny_llama as make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), REPO / "models")
