"""The conformance matrix's shared state: every family's tiny model and every cell's recipe, made once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def conformance_root(tmp_path_factory, real_models) -> Path:
    from matrix import make_sources

    root = tmp_path_factory.mktemp("conformance")
    make_sources(root / "sources")
    return root
