"""The license an artifact's card inherits from a local source folder's README.md is checked as `publish.license` is,
by `builder validate` and `builder plan`, before any build: located at `source.model`, with the Hub's form and a
did-you-mean, and `publish.license` overrides it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_core_install import core_builder

from builder.cli import main

TINY = Path(__file__).resolve().parents[1] / "recipes" / "models" / "tiny"  # config.json + safetensors, 52 params
ALLOWED = (
    "write one of those listed at https://huggingface.co/docs/hub/repositories-licenses, or `other` and name the "
    "license in the card's text. Set `publish.license` in the recipe to override the source card's, or fix the "
    "source card"
)


def recipe(tmp_path: Path, card: str, publish: str = "") -> Path:
    """A recipe on a copy of the tiny local model whose README.md is `card`."""
    folder = tmp_path / "models" / "tiny"
    shutil.copytree(TINY, folder)
    (folder / "README.md").write_text(card)
    path = tmp_path / "r.yaml"
    path.write_text(
        "schema_version: 1\nname: tiny-nf4\nsource:\n  model: ./models/tiny\n  task: text-generation\n"
        f"quantize:\n  method: bnb-4bit\n{publish}"
    )
    return path


def inherited(path: Path, problem: str) -> str:
    card = path.parent / "models" / "tiny" / "README.md"
    return (
        f"{path}:4:10: source.model: the artifact's card would inherit `license` from the source card {card}: "
        f"{problem}; {ALLOWED}"
    )


@pytest.mark.parametrize(
    ("front", "problem"),
    [
        ("license: MIT License", "'MIT License' is not a Hub license identifier (did you mean 'mit'?)"),
        (
            "license:\n  name: MIT\n  url: https://opensource.org/licenses/MIT",
            "a mapping is not a Hub license identifier",
        ),
    ],
    ids=["prose", "mapping"],
)
def test_validate_and_plan_refuse_a_license_the_card_would_inherit_that_the_hub_does_not_know(
    tmp_path, capsys, front, problem
):
    path = recipe(tmp_path, f"---\n{front}\nlanguage: en\n---\n# tiny\n")
    assert main(["validate", str(path)]) == 1
    assert capsys.readouterr().out.strip() == inherited(path, problem)
    assert main(["plan", str(path)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {inherited(path, problem)}"


def test_a_hub_license_in_the_source_card_passes(tmp_path, capsys):
    path = recipe(tmp_path, '---\nlicense: mit\ndescription: "a --- in a quoted value"\n---\n# tiny\n')
    assert main(["validate", str(path)]) == 0
    assert main(["plan", str(path)]) == 0
    assert capsys.readouterr().err == ""


def test_publish_license_overrides_a_bad_inherited_license(tmp_path, capsys):
    path = recipe(tmp_path, "---\nlicense: MIT License\n---\n", publish="publish:\n  repo: org/tiny\n  license: mit\n")
    assert main(["validate", str(path)]) == 0
    assert main(["plan", str(path)]) == 0, capsys.readouterr().err


def test_a_recipe_the_schema_refuses_gets_its_inherited_license_checked_in_the_same_report(tmp_path, capsys):
    path = recipe(tmp_path, "---\nlicense: MIT License\n---\n", publish="verify:\n  max_new_tokns: 4\n")
    assert main(["validate", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        inherited(path, "'MIT License' is not a Hub license identifier (did you mean 'mit'?)"),
        f"{path}:9:3: verify.max_new_tokns: unknown key 'max_new_tokns' (did you mean 'max_new_tokens'?)",
    ]
    # A refused recipe that writes publish.license (here a bad one, which the schema reports) overrides the card's.
    written = "publish:\n  repo: org/tiny\n  license: MIT License\n"
    path = recipe(tmp_path / "override", "---\nlicense: MIT License\n---\n", publish=written)
    assert main(["validate", str(path)]) == 1
    [line] = capsys.readouterr().out.splitlines()
    assert "publish.license" in line and "source card" not in line, line


def test_the_license_after_a_quoted_dashes_value_is_checked_too(tmp_path, capsys):
    # The front matter ends at a `---` line, as on the Hub: one inside a quoted value does not end it.
    path = recipe(tmp_path, '---\ndescription: "a --- b"\nlicense: Apache 2.0\n---\n')
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "'Apache 2.0' is not a Hub license identifier (did you mean 'apache-2.0'?)" in out, out


def test_the_inherited_license_check_needs_only_the_core_install(tmp_path):
    path = recipe(tmp_path, "---\nlicense: MIT License\n---\n")
    for command in ("validate", "plan"):
        done = core_builder(command, str(path))
        assert done.returncode == 1, done.stderr
        assert inherited(path, "'MIT License' is not a Hub license identifier (did you mean 'mit'?)") in (
            done.stdout + done.stderr
        )
