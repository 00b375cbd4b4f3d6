"""`builder validate` checks what it can of a local source without torch, at the recipe's line: the folder exists,
and every `quantize.skip_modules` entry names a module of the checkpoint (its safetensors header); those problems
come in one report with the schema's, even from a recipe the schema refused."""

from __future__ import annotations

import json

from test_core_install import core_builder

from builder.cli import main


def recipe(tmp_path, model: str, skip: str | None = None, variants: str = ""):
    text = f"schema_version: 1\nname: x\nsource:\n  model: {model}\nquantize:\n  method: bnb-4bit\n"
    if skip is not None:
        text += f"  skip_modules:\n    - lm_head\n    - {skip}\n"
    path = tmp_path / "r.yaml"
    path.write_text(text + variants)
    return path


def test_a_missing_local_source_folder_is_located_at_source_model(tmp_path, capsys):
    path = recipe(tmp_path, "./models/absent")
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(
        f"{path}:4:10: source.model: source folder {tmp_path / 'models' / 'absent'} does not "
        "exist; check `source.model`"
    ), out
    assert main(["validate", "--schema-only", str(path)]) == 0


def test_a_skip_module_matching_nothing_names_the_nearest_linear_modules(tiny_llama, tmp_path, capsys):
    path = recipe(tmp_path, str(tiny_llama), skip="mlp.down_projj")
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out.strip()
    assert out == (
        f"{path}:9:7: quantize.skip_modules.1: 'mlp.down_projj' matches no module of {tiny_llama}: the "
        "nearest quantizable Linear modules are mlp.down_proj, down_proj, layers.1.mlp.down_proj (did you mean "
        "'mlp.down_proj'?)"
    ), out
    assert "lm_head" not in out.split(":", 4)[4]  # the tied head exists: not flagged, and not offered as the fix


def test_validate_json_reports_the_problem_once_for_all_variants(tiny_llama, tmp_path, capsys):
    path = recipe(tmp_path, str(tiny_llama), skip="self_attn.qproj", variants="variants: {a: {}, b: {}}\n")
    assert main(["validate", "--json", str(path)]) == 1
    [entry] = json.loads(capsys.readouterr().out)["files"]
    assert entry["recipes"] == ["x-a", "x-b"] and not entry["ok"]
    [problem] = entry["problems"]
    assert (problem["line"], problem["path"]) == (9, "quantize.skip_modules.1")
    assert "did you mean 'self_attn.q_proj'?" in problem["message"]


def test_matching_skip_modules_and_hub_sources_pass(tiny_llama, tmp_path, capsys):
    assert main(["validate", str(recipe(tmp_path, str(tiny_llama), skip="model.layers.1.mlp"))]) == 0
    assert main(["validate", str(recipe(tmp_path, "org/model", skip="anything"))]) == 0  # no network in validate


def test_plan_refuses_the_same_skip_module_at_the_same_line(tiny_llama, tmp_path, capsys):
    path = recipe(tmp_path, str(tiny_llama), skip="mlp.down_projj")
    assert main(["plan", str(path)]) == 1
    assert f"{path}:9:7: quantize.skip_modules.1: 'mlp.down_projj' matches no module" in capsys.readouterr().err


def test_schema_errors_and_a_missing_source_folder_come_in_one_report_sorted_by_line(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(
        "schema_version: 1\nname: x\nsource:\n  model: ./models/absent\nquantize:\n  method: bnb-4bit\n"
        "  quant_type: nf5\nverify:\n  max_new_tokns: 4\n"
    )
    missing = f"{path}:4:10: source.model: source folder {tmp_path / 'models' / 'absent'} does not exist"
    assert main(["validate", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 2)[:2] for line in lines] == [
        [f"{path}:4:10", "source.model"],
        [f"{path}:7:15", "quantize.quant_type"],
        [f"{path}:9:3", "verify.max_new_tokns"],
    ], lines
    assert lines[0].startswith(missing), lines
    # plan (and build, which loads through the same check) reports the same problems at once, not in rounds
    assert main(["plan", str(path)]) == 1
    assert capsys.readouterr().err.removeprefix("error: ").splitlines() == lines


def test_a_schema_error_that_leaves_no_source_folder_to_check_is_reported_alone(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    for source, only in [
        ("source: {}\n", "source.model: "),  # no source.model at all
        ("source:\n  model: [./models/absent]\n", "source.model: "),  # not a folder name
    ]:
        path.write_text(f"schema_version: 1\nname: x\n{source}quantize:\n  method: bnb-4bit\n")
        assert main(["validate", str(path)]) == 1
        [line] = capsys.readouterr().out.splitlines()
        assert only in line and "does not exist" not in line, line


def test_a_home_folder_of_an_unknown_user_is_a_located_error_not_a_crash(tmp_path, capsys):
    for quantize in ("{method: bnb-4bit}", "{method: bnb-4bit, quant_type: nf5}"):  # accepted and refused
        path = tmp_path / "r.yaml"
        path.write_text(f"schema_version: 1\nname: x\nsource:\n  model: ~no-such-user-here/m\nquantize: {quantize}\n")
        assert main(["validate", str(path)]) == 1
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith(f"{path}:4:10: source.model: the folder starts with ~name/ but"), lines
    assert main(["plan", str(path)]) == 1


def test_a_variant_refused_by_the_schema_still_has_its_source_checked(tmp_path, capsys):
    path = recipe(tmp_path, "./models/absent", variants="variants:\n  a: {}\n  b:\n    quantize: {quant_type: nf5}\n")
    assert main(["validate", "--json", str(path)]) == 1
    [entry] = json.loads(capsys.readouterr().out)["files"]
    assert entry["recipes"] == []  # a file the schema refuses in part defines no artifact
    assert [(p["line"], p["path"]) for p in entry["problems"]] == [(4, "source.model"), (10, "quantize.quant_type")]


def test_the_source_checks_need_only_the_core_install(tiny_llama, tmp_path):
    done = core_builder("validate", str(recipe(tmp_path, str(tiny_llama), skip="mlp.down_projj")))
    assert done.returncode == 1, done.stderr
    assert "quantize.skip_modules.1: 'mlp.down_projj' matches no module" in done.stdout
