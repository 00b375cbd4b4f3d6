"""The interop environment (`make test-interop`): optimum-onnx with transformers 4.57 loads what the main
environment (transformers 5, torch exporter) built, and runs the `optimum` exporter backend itself.

Artifacts are built by the main environment's `builder build` into BUILDER_INTEROP_DIR (default
artifacts/.interop/); a build whose hash matches is reused ("up to date"), so CI builds each one once.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAIN_PYTHON = Path(os.environ.get("BUILDER_MAIN_PYTHON", REPO / ".venv" / "bin" / "python"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    folder = Path(os.environ.get("BUILDER_INTEROP_DIR", REPO / "artifacts" / ".interop"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def main_env_build(shared_dir):
    """recipe file -> the artifact folder the main environment built from it."""
    if not MAIN_PYTHON.is_file():
        pytest.fail(
            f"the main environment's python {MAIN_PYTHON} is missing; run `make test` (or set "
            "BUILDER_MAIN_PYTHON) first"
        )
    built: dict[str, Path] = {}

    def get(recipe: str) -> Path:
        if recipe not in built:
            process = subprocess.run(
                [
                    str(MAIN_PYTHON),
                    "-m",
                    "builder",
                    "build",
                    recipe,
                    "--out",
                    str(shared_dir),
                    "--device",
                    "cpu",
                    "--json",
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=False,
            )
            assert process.returncode == 0, process.stderr[-3000:]
            built[recipe] = Path(json.loads(process.stdout)[0]["path"])
        return built[recipe]

    return get
