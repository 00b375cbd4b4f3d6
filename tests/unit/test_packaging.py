"""What a packager and a new user read: pyproject's build requirements and name, the CLI's environment help."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

from builder.cli import main

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_setuptools_is_new_enough_for_the_spdx_license_string():
    assert isinstance(PYPROJECT["project"]["license"], str)
    [setuptools] = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(re.search(r">=(\d+)", setuptools).group(1)) >= 77


def test_the_distribution_is_not_the_unrelated_pypi_builder_but_the_command_is_builder():
    assert PYPROJECT["project"]["name"] == "recipe-builder"
    assert PYPROJECT["project"]["scripts"]["builder"].startswith("builder.")
    from builder.plan import DISTRIBUTION

    assert DISTRIBUTION == PYPROJECT["project"]["name"]


def test_publish_help_names_the_environment_it_reads(capsys):
    assert main(["publish", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for variable in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_DISABLE_XET"):
        assert variable in text


def test_every_builder_variable_the_code_reads_is_documented():
    code = "".join(p.read_text() for p in (REPO / "builder").rglob("*.py"))
    variables = set(re.findall(r"\bBUILDER_[A-Z_]+\b", code))
    readme = (REPO / "README.md").read_text()
    assert variables and {v for v in variables if f"| `{v}` |" not in readme} == set()
