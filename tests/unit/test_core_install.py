"""`validate`, `plan` and `schema` work with only the core packages (pydantic, pyyaml, huggingface_hub).

Each command runs in a subprocess whose Python refuses to import the heavy libraries, as on a machine where they
were never installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = (
    "torch",
    "transformers",
    "numpy",
    "accelerate",
    "bitsandbytes",
    "safetensors",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "optimum",
    "scipy",
    "pandas",
    "ray",
)
CORE_ONLY = f"""
import sys

class CoreInstallOnly:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {HEAVY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (core install)", name=name)
        return None

sys.meta_path.insert(0, CoreInstallOnly())
if sys.argv[1:] == ["--check-blocker"]:
    try:
        import numpy
    except ModuleNotFoundError:
        sys.exit(0)
    sys.exit(5)
from builder.cli import main
sys.exit(main(sys.argv[1:]))
"""


def core_builder(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CORE_ONLY, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_the_blocker_blocks():
    assert core_builder("--check-blocker").returncode == 0


def test_validate_needs_only_the_core_install():
    done = core_builder("validate", "--json", "recipes")
    assert done.returncode == 0, done.stderr + done.stdout
    done = core_builder("validate", "--json", "--schema-only", "recipes", "tests/recipes/valid")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["ok"] and len(payload["files"]) >= 10
    bad = core_builder("validate", "tests/recipes/invalid/enum-quant-type.yaml")
    assert bad.returncode == 1 and "quantize.quant_type: 'nf5' is not one of nf4, fp4" in bad.stdout


def test_plan_of_a_local_folder_recipe_needs_only_the_core_install():
    done = core_builder("plan", "--json", "tests/recipes/valid/local-tiny.yaml")
    assert done.returncode == 0, done.stderr
    (plan,) = json.loads(done.stdout)
    assert plan["parameter_count"] == 52 and plan["source"]["revision"].startswith("sha256:")
    assert plan["versions"]["builder"] and [w for w in plan["warnings"] if "not installed here" not in w] == []
    text = core_builder("plan", "tests/recipes/valid/local-tiny.yaml")
    assert text.returncode == 0 and text.stdout.startswith("# tiny-nf4\n"), text.stderr


def test_matrix_needs_only_the_core_install():
    done = core_builder("matrix", "tests/recipes/valid/variants.yaml")
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)["include"]
    assert len(entries) > 1 and all(e["variant"] and e["recipe"].endswith("variants.yaml") for e in entries)


def test_executor_ray_without_ray_says_which_extra_to_install():
    done = core_builder("build", "tests/recipes/valid/local-tiny.yaml", "--executor", "ray")
    assert done.returncode == 1 and "--executor ray needs Ray: pip install 'recipe-builder[ray]'" in done.stderr


def test_schema_needs_only_the_core_install():
    done = core_builder("schema")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads((REPO / "docs" / "recipe.schema.json").read_text())


@pytest.mark.parametrize("module", ["builder", "builder.cli", "builder.recipe", "builder.plan"])
def test_importing_the_core_modules_imports_no_heavy_library(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.partition('.')[0] in {HEAVY!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
