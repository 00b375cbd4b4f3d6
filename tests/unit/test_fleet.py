"""`builder matrix`: one GitHub Actions matrix entry per artifact (variants included) with the device it wants, an
error past GitHub's 256 jobs; and the `--executor` flags `builder build` refuses before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.cli import main

HEAD = "schema_version: 1\nsource:\n  model: org/m\n  revision: main\n"


def write(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"{HEAD}name: {name}\n{body}")
    return path


def matrix(capsys, *argv: str) -> dict:
    assert main(["matrix", *argv]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_one_entry_per_artifact_with_its_variant_and_device(tmp_path, capsys):
    write(
        tmp_path,
        "a",
        "quantize: {method: bnb-4bit}\nvariants:\n  cpu:\n    load: {device_map: cpu}\n  int8:\n"
        "    quantize: {method: bnb-8bit}\n",
    )
    write(tmp_path, "b", "export: {format: onnx, provider: CPUExecutionProvider}\n")
    write(tmp_path, "c", "export: {format: onnx, provider: CUDAExecutionProvider}\n")
    a, b, c = (str(tmp_path / f"{n}.yaml") for n in "abc")
    assert matrix(capsys, str(tmp_path)) == {
        "include": [
            {"recipe": a, "variant": "cpu", "artifact": "a-cpu", "device": "cpu"},
            {"recipe": a, "variant": "int8", "artifact": "a-int8", "device": "cuda"},
            {"recipe": b, "variant": None, "artifact": "b", "device": "cpu"},
            {"recipe": c, "variant": None, "artifact": "c", "device": "cuda"},
        ]
    }
    assert matrix(capsys, str(tmp_path), "--name", "a-int8")["include"] == [
        {"recipe": a, "variant": "int8", "artifact": "a-int8", "device": "cuda"}
    ]


def test_more_artifacts_than_github_runs_is_an_error_that_says_what_to_do(tmp_path, capsys):
    variants = "".join(f"  v{k}: {{}}\n" for k in range(257))
    write(tmp_path, "many", f"quantize: {{method: bnb-4bit}}\nvariants:\n{variants}")
    assert main(["matrix", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "257 artifacts, but a GitHub Actions matrix runs at most 256 jobs" in err and "--executor ray" in err


def test_a_broken_recipe_fails_the_matrix_with_its_location(tmp_path, capsys):
    write(tmp_path, "bad", "quantize: {method: bnb-5bit}\n")
    assert main(["matrix", str(tmp_path)]) == 1
    assert "bad.yaml:6:20: quantize.method: 'bnb-5bit' is not one of" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--executor", "ray", "--jobs", "2"], "--jobs is for --executor local"),
        (["--ray-address", "10.0.0.1:6379"], "--ray-address is for --executor ray"),
    ],
)
def test_executor_flags_that_do_not_go_together_are_refused(tmp_path, capsys, argv, message):
    write(tmp_path, "a", "quantize: {method: bnb-4bit}\n")
    assert main(["build", str(tmp_path), *argv]) == 1
    assert message in capsys.readouterr().err
