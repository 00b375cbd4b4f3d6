import json
from pathlib import Path

import pytest

from builder.cli import main

REPO_RECIPES = "recipes"


def test_validate_shipped_recipes_is_clean(capsys):
    assert main(["validate", REPO_RECIPES]) == 0
    assert "ok" in capsys.readouterr().out


def test_validate_json_lists_every_recipe(capsys):
    assert main(["validate", REPO_RECIPES, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    names = {name for f in payload["files"] for name in f["recipes"]}
    assert "smollm2-135m-instruct-nf4" in names
    assert {"smollm2-135m-instruct-4bit-nf4", "smollm2-135m-instruct-4bit-fp4-dq"} <= names


def test_validate_reports_located_error_and_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "schema_version: 1\nname: x\nsource:\n  model: a/b\nquantize:\n  method: bnb-4bit\n  quant_type: nf5\n"
    )
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:7:15: quantize.quant_type: 'nf5' is not one of nf4, fp4 (did you mean 'nf4'?)" in out


def test_usage_error_exits_2(capsys):
    assert main(["frobnicate"]) == 2


def test_schema_is_json_schema_with_descriptions(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["properties"]["quantize"]["description"]
    assert "extends" in schema["properties"] and "variants" in schema["properties"]


def test_committed_schema_file_is_current(capsys):
    from pathlib import Path

    main(["schema"])
    current = capsys.readouterr().out
    committed = (Path(__file__).resolve().parents[2] / "docs" / "recipe.schema.json").read_text()
    assert json.loads(committed) == json.loads(current), "run `make schema` and commit docs/recipe.schema.json"


def test_plan_smollm2_counts_parameters_from_headers(smollm2, capsys):
    assert main(["plan", "recipes/smollm2/nf4.yaml", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)[0]
    # SmolLM2-135M: 134,515,008 parameters (tied embeddings stored once).
    assert abs(plan["parameter_count"] - 134_515_008) / 134_515_008 < 0.01
    assert len(plan["build_hash"]) == 64
    assert plan["source"]["revision"].startswith("sha256:")


def test_plan_rejects_skip_module_that_matches_nothing(smollm2, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: x\nsource:\n  model: {smollm2}\nquantize:\n  method: bnb-8bit\n"
        "  skip_modules: [lm_haed]\n"
    )
    assert main(["plan", str(recipe)]) == 1
    assert "'lm_haed' matches no module" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["validate", "--help"], ["--version"]])
def test_help_and_version_exit_0(argv):
    assert main(argv) == 0


def _two_recipes_named_alike(folder) -> None:
    folder.mkdir()
    for file in ("a.yaml", "b.yaml"):
        (folder / file).write_text(
            "schema_version: 1\nsource:\n  model: org/m\nname: same\nquantize:\n  method: bnb-8bit\n"
        )


def test_two_recipes_building_one_artifact_are_refused(tmp_path, capsys):
    _two_recipes_named_alike(tmp_path / "recipes")
    assert main(["validate", str(tmp_path / "recipes")]) == 1
    expected = (
        f"{tmp_path}/recipes/b.yaml:4:7: name: artifact 'same' is also built by {tmp_path}/recipes/a.yaml; "
        "artifact names must be unique"
    )
    assert expected in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "recipes"), "--json"]) == 1
    files = {f["file"].rsplit("/", 1)[1]: f for f in json.loads(capsys.readouterr().out)["files"]}
    assert files["a.yaml"]["ok"] and not files["b.yaml"]["ok"]
    assert files["b.yaml"]["problems"][0]["line"] == 4
    assert main(["build", str(tmp_path / "recipes")]) == 1  # refused before anything is resolved or built
    assert expected in capsys.readouterr().err


def test_build_by_an_unknown_name_suggests_the_closest(capsys):
    assert main(["build", REPO_RECIPES, "--name", "smollm2-135m-instruct-nf5"]) == 1
    assert (
        "no recipe defines an artifact named 'smollm2-135m-instruct-nf5' (did you mean 'smollm2-135m-instruct-nf4'?)"
    ) in capsys.readouterr().err


def test_an_internal_error_logs_to_a_new_file_in_the_cache_and_follows_no_planted_symlink(
    tmp_path, monkeypatch, capsys
):
    """The traceback used to go to the fixed /tmp/builder-crash.log: anyone could plant a symlink there and have the
    next crash overwrite the file it names."""
    import tempfile

    import builder.cli

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir()
    (shared_tmp / "builder-crash.log").symlink_to(victim)
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def broken():
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(builder.cli, "json_schema", broken)
    logs = []
    for _ in range(2):
        assert main(["schema"]) == 3
        err = capsys.readouterr().err
        assert err.startswith("internal error: RuntimeError: simulated bug (traceback in ") and err.count("\n") == 1
        logs.append(Path(err.rsplit("traceback in ", 1)[1].rstrip(")\n")))
    assert victim.read_text() == "precious\n"
    assert logs[0] != logs[1]
    for log in logs:
        assert log.parent == tmp_path / "cache" / "builder" / "crash"
        assert "simulated bug" in log.read_text() and "Traceback" in log.read_text()


@pytest.mark.parametrize("jobs", ["0", "-3", "two", "99999999999999999999999"])
def test_build_jobs_must_be_a_positive_integer(jobs, capsys):
    assert main(["build", "--jobs", jobs, "recipes/smollm2/nf4.yaml"]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "--jobs" in err and ("positive integer" in err or "not an integer" in err)


@pytest.mark.parametrize("inside", [False, True])
def test_build_out_naming_a_file_exits_1_with_a_message(smollm2, tmp_path, capsys, inside):
    """It used to reach `mkdir` in the pipeline, after planning, and exit 3 with FileExistsError."""
    taken = tmp_path / "artifacts"
    taken.write_text("not a folder\n")
    out = taken / "sub" if inside else taken
    assert main(["build", "--out", str(out), "recipes/smollm2/nf4.yaml"]) == 1
    err = capsys.readouterr().err
    assert f"error: the artifacts folder {out} " in err and "is a file" in err and "--out" in err
    assert taken.read_text() == "not a folder\n"


@pytest.mark.parametrize("digits", [4_000, 100_000])
def test_a_huge_number_is_not_echoed_in_full(tmp_path, capsys, digits):
    recipe = tmp_path / "huge.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: huge\nsource: {{model: org/model}}\nverify: {{max_new_tokens: {'7' * digits}}}\n"
    )
    assert main(["validate", str(recipe)]) == 1
    out = capsys.readouterr().out
    assert f"{recipe}:4:26: verify.max_new_tokens: " in out and f"({digits:,} " in out
    assert len(out) < 400 and "7" * 61 not in out and "set_int_max_str_digits" not in out


def test_a_huge_string_is_not_echoed_in_full(tmp_path, capsys):
    recipe = tmp_path / "long.yaml"
    recipe.write_text(f"schema_version: 1\nname: {'x' * 500_000}\nsource: {{model: org/model}}\n")
    assert main(["validate", str(recipe)]) == 1
    out = capsys.readouterr().out
    assert "is not a valid artifact name" in out and "(500,000 characters)" in out and len(out) < 400


SHIPPED = sorted(str(p) for p in Path(REPO_RECIPES).rglob("*.yaml") if not p.name.startswith("_"))


@pytest.mark.parametrize("recipe", SHIPPED)
def test_every_shipped_recipe_plans(real_models, recipe, capsys):
    # recipes/smollm2/onnx-cpu.yaml exited 3 (KeyError: 'generation_match': cli kept its own copy of the gate signs)
    assert main(["plan", recipe]) == 0
    assert "gate:        " in capsys.readouterr().out


def test_plans_footprint_bound_is_the_one_the_build_gates_at(smollm2, capsys):
    from builder.kinds.base import footprint_threshold

    assert main(["plan", "recipes/smollm2/nf4.yaml", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)[0]
    bound = footprint_threshold(plan["expected_footprint_ratio"])
    assert plan["thresholds"]["footprint_ratio"] == bound < 0.99  # it printed 0.99 (no source folder given)
    assert main(["plan", "recipes/smollm2/nf4.yaml"]) == 0
    assert f"footprint_ratio <= {bound:g}" in capsys.readouterr().out.split("gate:")[1].splitlines()[0]


def _readme_tour() -> list[str]:
    """The shell lines of the README's 60-second tour (its one `bash` block), comments dropped."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    tour = readme.split("## 60-second tour", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in tour.splitlines() if line.split("#", 1)[0].strip()]


def test_the_readme_tour_activates_the_venv_and_every_builder_line_parses():
    import shlex

    from builder.cli import build_parser

    lines = _readme_tour()
    assert lines[0] == ". .venv/bin/activate"  # without it a fresh clone answers `builder: command not found`
    commands = [shlex.split(line.split(">", 1)[0]) for line in lines[1:]]
    assert commands and all(argv[0] == "builder" for argv in commands), lines
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv[1:])  # exits 2 (SystemExit) on a command or option the CLI no longer has
    assert ["builder", "report"] in commands


def test_the_readme_names_the_extras_the_makefile_installs():
    import re

    root = Path(__file__).resolve().parents[2]
    [installed] = re.findall(r"pip install -q -e '\.\[([a-z,-]+)\]'", (root / "Makefile").read_text())
    assert f"pip install -e '.[{installed}]'" in (root / "README.md").read_text()


def test_report_writes_under_artifacts_by_default(tmp_path, capsys, monkeypatch):
    from test_hub_publish import make_artifact

    make_artifact(tmp_path / "artifacts" / "tiny-nf4")
    monkeypatch.chdir(tmp_path)
    assert main(["report"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("wrote artifacts/report.html: 1 artifact(s)")
    assert (tmp_path / "artifacts" / "report.html").is_file() and not (tmp_path / "report.html").exists()
