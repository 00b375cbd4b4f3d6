"""extends and variants semantics, recipe discovery, the error format and the `validate`/`plan` output shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.cli import main
from builder.errors import Location, Problem, RecipeError
from builder.recipe import find_recipe_files, load_recipes, loader

REPO = Path(__file__).resolve().parents[2]
VALID = REPO / "tests" / "recipes" / "valid"


def write(folder: Path, name: str, text: str) -> Path:
    file = folder / name
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
    return file


def problems(path: Path | str) -> list[str]:
    with pytest.raises(RecipeError) as error:
        load_recipes(path)
    return [str(p) for p in error.value.problems]


# --- extends -----------------------------------------------------------------------------------------------------


def test_parent_name_is_never_inherited(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "_base.yaml", "schema_version: 1\nname: base\nsource: {model: org/m}\n")
    write(tmp_path, "child.yaml", "# a comment\nextends: _base.yaml\n")
    assert problems("child.yaml") == ["child.yaml:2:1: name: required key is missing"]


def test_extends_is_relative_to_the_extending_file_and_files_lists_the_chain(tmp_path):
    base = write(tmp_path, "shared/_base.yaml", "schema_version: 1\nsource: {model: org/m, dtype: float16}\n")
    middle = write(tmp_path, "shared/_quant.yaml", "extends: _base.yaml\nquantize: {method: bnb-8bit}\n")
    child = write(tmp_path, "family/a/child.yaml", "extends: ../../shared/_quant.yaml\nname: child\n")
    (loaded,) = load_recipes(child)
    assert loaded.files == (child, middle.resolve(), base.resolve())
    assert (loaded.recipe.source.dtype, loaded.recipe.quantize.method) == ("float16", "bnb-8bit")
    assert loaded.source_path is None  # a Hub source


def test_null_replaces_and_lists_are_replaced(tmp_path):
    write(
        tmp_path,
        "_base.yaml",
        "schema_version: 1\nsource: {model: org/m, task: fill-mask, revision: v1}\n"
        "quantize: {method: bnb-4bit, skip_modules: [a, b]}\nverify: {prompts: [x, y]}\n",
    )
    child = write(
        tmp_path,
        "c.yaml",
        "extends: _base.yaml\nname: c\nsource: {task: null, revision: null}\n"
        "quantize: {skip_modules: [c]}\nverify: {prompts: []}\n",
    )
    recipe = load_recipes(child)[0].recipe
    assert recipe.source.task is None and recipe.source.revision is None and recipe.source.model == "org/m"
    assert recipe.quantize.skip_modules == ("c",)
    assert recipe.verify.prompts == ()


def test_child_changing_method_replaces_the_parent_block(tmp_path):
    write(
        tmp_path,
        "_base.yaml",
        "schema_version: 1\nsource: {model: org/m}\n"
        "quantize: {method: bnb-4bit, quant_type: fp4, double_quant: true}\n",
    )
    child = write(tmp_path, "c.yaml", "extends: _base.yaml\nname: c\nquantize: {method: bnb-8bit, threshold: 5}\n")
    quantize = load_recipes(child)[0].recipe.quantize
    assert (quantize.method, quantize.threshold, quantize.skip_modules) == ("bnb-8bit", 5.0, ())
    same = write(tmp_path, "d.yaml", "extends: _base.yaml\nname: d\nquantize: {method: bnb-4bit}\n")
    assert load_recipes(same)[0].recipe.quantize.quant_type == "fp4"  # same method: still a deep merge


def test_parent_variants_are_inherited_and_named_after_the_child(tmp_path):
    write(
        tmp_path,
        "_matrix.yaml",
        "schema_version: 1\nname: parent\nsource: {model: org/m}\n"
        "quantize: {method: bnb-4bit}\n"
        "variants: {nf4: {}, fp4: {quantize: {quant_type: fp4}}}\n",
    )
    child = write(
        tmp_path,
        "c.yaml",
        "extends: _matrix.yaml\nname: child\nvariants: {fp4: {quantize: {double_quant: true}}, dq: {}}\n",
    )
    loaded = {item.variant: item.recipe for item in load_recipes(child)}
    assert {name: r.name for name, r in loaded.items()} == {"nf4": "child-nf4", "fp4": "child-fp4", "dq": "child-dq"}
    assert loaded["fp4"].quantize.quant_type == "fp4" and loaded["fp4"].quantize.double_quant  # variants deep-merge


def test_three_file_cycle_names_every_link(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.yaml", "extends: b.yaml\nname: a\n")
    write(tmp_path, "b.yaml", "extends: c.yaml\n")
    write(tmp_path, "c.yaml", "schema_version: 1\nextends: a.yaml\n")
    assert problems("a.yaml") == [
        "c.yaml:2:10: extends: extends cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml; remove one of the links"
    ]
    # A diamond is not a cycle: two files may extend the same base.
    write(tmp_path, "_base.yaml", "schema_version: 1\nsource: {model: org/m}\nquantize: {method: bnb-4bit}\n")
    write(tmp_path, "x.yaml", "extends: _base.yaml\nname: x\n")
    assert load_recipes("x.yaml")[0].recipe.name == "x"


def _chain(folder: Path, files: int, last_extends: str | None = None) -> None:
    """f0.yaml -> f1.yaml -> ... -> f{files-1}.yaml, the last a complete base (or extending `last_extends`)."""
    for i in range(files - 1):
        write(folder, f"f{i}.yaml", f"extends: f{i + 1}.yaml\n" + ("name: deep\n" if i == 0 else ""))
    last = f"extends: {last_extends}\n" if last_extends else "source: {model: org/m}\nquantize: {method: bnb-4bit}\n"
    write(folder, f"f{files - 1}.yaml", "schema_version: 1\n" + last)


def test_an_extends_chain_of_32_files_loads(tmp_path):
    _chain(tmp_path, 32)
    assert len(load_recipes(tmp_path / "f0.yaml")[0].files) == 32


@pytest.mark.parametrize("files", [33, 1000])
def test_a_longer_extends_chain_is_refused_at_the_link_past_the_limit(tmp_path, monkeypatch, files):
    # 1,000 files were refused as "the YAML is nested too deeply" at an arbitrary file (a RecursionError).
    monkeypatch.chdir(tmp_path)
    _chain(tmp_path, files)
    last = " -> ".join(f"f{i}.yaml" for i in range(files - 3, files))
    shown = f"f0.yaml -> f1.yaml -> f2.yaml -> ... ({files - 6:,} more) -> {last}"
    assert problems("f0.yaml") == [
        f"f31.yaml:1:10: extends: extends chain of {files:,} files, over the limit of 32 (the recipe and its "
        f"parents): {shown}; a recipe needs a base or two: merge the bases into fewer files"
    ]


def test_a_chain_longer_than_the_look_ahead_says_at_least(tmp_path, monkeypatch):
    # Past the limit the files are read for their `extends` only, and only so many of them.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loader, "_CHAIN_LOOKAHEAD", 4)
    _chain(tmp_path, 50)
    assert problems("f0.yaml")[0].startswith("f31.yaml:1:10: extends: extends chain of at least 36 files, over")


def test_a_cycle_longer_than_the_chain_limit_is_reported_as_a_cycle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _chain(tmp_path, 40, last_extends="f5.yaml")
    assert problems("f0.yaml") == [
        "f39.yaml:2:10: extends: extends cycle: f0.yaml -> f1.yaml -> f2.yaml -> ... (35 more) -> f38.yaml -> "
        "f39.yaml -> f5.yaml; remove one of the links"
    ]


def test_problems_of_child_and_parents_come_together(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "_base.yaml", "schema_version: 1\nsource: {model: org/m, dtype: half}\n")
    write(tmp_path, "c.yaml", "extends: _base.yaml\nname: c\nname: d\nverify: {max_new_tokens: -1}\n")
    assert problems("c.yaml") == [
        "_base.yaml:2:31: source.dtype: 'half' is not one of float32, float16, bfloat16, auto (did you mean "
        "'float16'?)",
        "c.yaml:3:1: name: duplicate key 'name' (first written at line 2); keep one of them",
        "c.yaml:4:26: verify.max_new_tokens: input should be greater than or equal to 1 (got -1)",
    ]


# --- variants ----------------------------------------------------------------------------------------------------


def test_variant_problems_and_file_problems_come_together(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(
        tmp_path,
        "v.yaml",
        "schema_version: 1\nname: v\nsource: {model: org/m}\nsource: {model: org/n}\n"
        "quantize: {method: bnb-4bit}\nvariants:\n  ok: {}\n  bad: {quantize: {quant_type: x}}\n",
    )
    assert problems("v.yaml") == [
        "v.yaml:4:1: source: duplicate key 'source' (first written at line 3); keep one of them",
        "v.yaml:8:32: quantize.quant_type: 'x' is not one of nf4, fp4",
    ]


def test_a_variant_may_switch_the_build_kind(tmp_path):
    file = write(
        tmp_path,
        "v.yaml",
        "schema_version: 1\nname: m\nsource: {model: org/m}\n"
        "quantize: {method: bnb-4bit}\nvariants:\n  nf4: {}\n"
        "  onnx: {quantize: null, export: {format: onnx}}\n",
    )
    loaded = {item.variant: item.recipe for item in load_recipes(file)}
    assert loaded["nf4"].export is None and loaded["onnx"].quantize is None
    assert loaded["onnx"].export.format == "onnx"


# --- discovery and the error format ------------------------------------------------------------------------------


def test_folders_expand_to_yaml_files_except_underscore_bases(tmp_path):
    for name in ("b.yaml", "a.yml", "_base.yaml", "notes.txt", "sub/c.yaml", "sub/_d.yaml"):
        write(tmp_path, name, "x: 1\n")
    explicit = tmp_path / "_base.yaml"
    assert find_recipe_files([tmp_path, explicit]) == [
        tmp_path / "a.yml",
        tmp_path / "b.yaml",
        tmp_path / "sub" / "c.yaml",
        explicit,
    ]


def test_load_recipes_on_a_folder_or_a_missing_file_is_a_located_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    assert problems("dir") == ["dir:1:1: is a folder; name a recipe file (`builder validate` also takes folders)"]
    assert problems("nope.yaml") == ["nope.yaml:1:1: no such recipe file"]


def test_problem_format_and_json():
    problem = Problem(
        Location("recipes/x.yaml", 12, 5), "quantize.quant_type", "'nf5' is not one of nf4, fp4 (did you mean 'nf4'?)"
    )
    assert str(problem) == (
        "recipes/x.yaml:12:5: quantize.quant_type: 'nf5' is not one of nf4, fp4 (did you mean 'nf4'?)"
    )
    assert problem.as_json() == {
        "file": "recipes/x.yaml",
        "line": 12,
        "column": 5,
        "path": "quantize.quant_type",
        "message": "'nf5' is not one of nf4, fp4 (did you mean 'nf4'?)",
    }
    assert str(Problem(Location("x.yaml", 1, 1), "", "the file is empty")) == "x.yaml:1:1: the file is empty"


def test_shipped_recipes_point_editors_at_the_committed_schema():
    files = sorted((REPO / "recipes").rglob("*.yaml")) + sorted(VALID.glob("*.yaml"))
    assert len(files) >= 10
    for file in files:
        first = file.read_text().splitlines()[0]
        assert first.startswith("# yaml-language-server: $schema="), file
        schema = (file.parent / first.split("$schema=", 1)[1]).resolve()
        assert schema == REPO / "docs" / "recipe.schema.json", file


# --- builder validate / plan output ------------------------------------------------------------------------------


def test_validate_without_arguments_checks_the_recipes_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["validate", "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["validate", "--json", "recipes"]) == 0
    assert json.loads(capsys.readouterr().out) == default
    shipped = [str(p) for p in find_recipe_files(["recipes"])]
    assert [f["file"] for f in default["files"]] == shipped and len(shipped) >= 6
    assert all(f["file"].startswith("recipes/") for f in default["files"])
    monkeypatch.chdir(tmp_path)
    write(
        tmp_path,
        "recipes/good.yaml",
        "schema_version: 1\nname: good\nsource: {model: org/m}\nquantize: {method: bnb-4bit}\n",
    )
    write(tmp_path, "recipes/sub/bad.yaml", "schema_version: 1\nname: Bad\nsource: {model: org/m}\n")
    write(tmp_path, "elsewhere.yaml", "not: [valid\n")  # outside recipes/: not looked at
    assert main(["validate"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("recipes/sub/bad.yaml:2:7: name: 'Bad' is not a valid artifact name")
    assert "elsewhere" not in out and "good" not in out


def test_validate_with_no_recipe_files_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    assert main(["validate"]) == 1
    assert "no recipe files found" in capsys.readouterr().err


def test_validate_json_shape(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(
        tmp_path,
        "good.yaml",
        "schema_version: 1\nname: good\nsource: {model: org/m}\nvariants: {a: {}, b: {}}\n"
        "quantize: {method: bnb-4bit}\n",
    )
    write(
        tmp_path,
        "bad.yaml",
        "schema_version: 1\nname: bad\nsource: {model: org/m, dtype: fp8}\nquantize: {method: bnb-4bit}\n",
    )
    assert main(["validate", "--json", "good.yaml", "bad.yaml"]) == 1
    assert json.loads(capsys.readouterr().out) == {
        "ok": False,
        "files": [
            {"file": "good.yaml", "ok": True, "recipes": ["good-a", "good-b"], "problems": []},
            {
                "file": "bad.yaml",
                "ok": False,
                "recipes": [],
                "problems": [
                    {
                        "file": "bad.yaml",
                        "line": 3,
                        "column": 31,
                        "path": "source.dtype",
                        "message": "'fp8' is not one of float32, float16, bfloat16, auto",
                    }
                ],
            },
        ],
    }
    assert main(["validate", "--json", "good.yaml"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_validate_prints_one_located_line_per_problem(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(
        tmp_path,
        "r.yaml",
        "schema_version: 1\nname: r\nsource: {model: org/m}\nload: {device_map: gpu}\n"
        "quantize: {method: bnb-4bit, quant_typ: nf4}\n",
    )
    assert main(["validate", "r.yaml"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "r.yaml:4:20: load.device_map: 'gpu' is not auto, cpu, cuda or cuda:N",
        "r.yaml:5:30: quantize.quant_typ: unknown key 'quant_typ' (did you mean 'quant_type'?)",
    ]


def test_plan_json_shape_on_a_local_folder(capsys):
    assert main(["plan", "--json", str(VALID / "local-tiny.yaml")]) == 0
    (plan,) = json.loads(capsys.readouterr().out)
    assert sorted(plan) == [
        "build_hash",
        "expected_artifact_bytes",
        "expected_footprint_ratio",
        "name",
        "parameter_count",
        "recipe",
        "recipe_file",
        "source",
        "source_bytes",
        "stages",
        "thresholds",
        "variant",
        "versions",
        "warnings",
        "weight_share",
    ]
    assert (
        plan["name"] == "tiny-nf4"
        and plan["variant"] is None
        and [w for w in plan["warnings"] if "not installed here" not in w] == []
    )
    assert plan["parameter_count"] == 8 * 4 + 4 * 4 + 4 and plan["source_bytes"] == 4 * plan["parameter_count"]
    assert plan["source"]["model"] == "../models/tiny" and plan["source"]["revision"].startswith("sha256:")
    assert [s["name"] for s in plan["stages"]] == ["resolve", "quantize", "verify", "write"]
    assert set(plan["stages"][0]) == {"name", "description", "peak_memory_bytes"}
    assert plan["recipe"]["quantize"]["double_quant"] is True and len(plan["build_hash"]) == 64


def test_plan_of_a_bad_recipe_prints_located_problems_and_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "r.yaml", "schema_version: 1\nname: r\nsource: {model: ./m}\nquantize: {method: bnb-2bit}\n")
    assert main(["plan", "r.yaml"]) == 1
    assert capsys.readouterr().err == (  # the schema's problem and the missing source folder's, in one report
        f"error: r.yaml:3:17: source.model: source folder {tmp_path / 'm'} does not exist; check `source.model` "
        "(relative paths are relative to the recipe file)\n"
        "r.yaml:4:20: quantize.method: 'bnb-2bit' is not one of bnb-4bit, bnb-8bit (did you mean 'bnb-8bit'?)\n"
    )


def test_relative_source_path_is_relative_to_the_file_that_wrote_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(
        tmp_path, "shared/_base.yaml", "schema_version: 1\nsource: {model: ./weights}\nquantize: {method: bnb-4bit}\n"
    )
    write(tmp_path, "family/child.yaml", "extends: ../shared/_base.yaml\nname: c\n")
    write(tmp_path, "family/own.yaml", "extends: ../shared/_base.yaml\nname: o\nsource: {model: ./mine}\n")
    write(
        tmp_path,
        "family/matrix.yaml",
        "extends: ../shared/_base.yaml\nname: m\nvariants: {base: {}, mine: {source: {model: ../mine}}}\n",
    )
    root = tmp_path.resolve()
    assert load_recipes("family/child.yaml")[0].source_path == root / "shared" / "weights"
    assert load_recipes(tmp_path / "family/own.yaml")[0].source_path == root / "family" / "mine"
    assert [r.source_path for r in load_recipes("family/matrix.yaml")] == [root / "shared" / "weights", root / "mine"]


def test_validate_reads_each_recipe_file_once_name_clash_check_included(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.yaml", "schema_version: 1\nname: same\nsource: {model: org/m}\nquantize: {method: bnb-4bit}\n")
    write(tmp_path, "b.yaml", "schema_version: 1\nname: same\nsource: {model: org/m}\nquantize: {method: bnb-8bit}\n")
    parsed: list[Path] = []
    parse_file = loader._parse_file
    monkeypatch.setattr(loader, "_parse_file", lambda path, display: parsed.append(path) or parse_file(path, display))
    assert main(["validate", "a.yaml", "b.yaml"]) == 1
    assert "artifact 'same' is also built by a.yaml" in capsys.readouterr().out
    assert parsed == [Path("a.yaml"), Path("b.yaml")]
