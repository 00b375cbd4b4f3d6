"""The recipe corpora: every file in tests/recipes/invalid/ fails with exactly the problems its `# expect:` lines
name (message and location), and every file in tests/recipes/valid/ loads to the values checked here.

An expect line is `# expect: [FILE:]LINE:COLUMN: PATH: MESSAGE`; FILE (a parent recipe) defaults to the case
itself, paths are relative to tests/recipes/invalid/. Files starting with `_` are parents, not cases.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from builder.cli import main
from builder.errors import RecipeError
from builder.recipe import load_recipes

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
INVALID = RECIPES / "invalid"
VALID = RECIPES / "valid"
CASES = sorted(p for p in INVALID.glob("*.yaml") if not p.name.startswith("_"))
EXPECT = re.compile(r"^# expect: (?:(?P<file>[\w.-]+\.yaml):)?(?P<line>\d+):(?P<column>\d+): (?P<rest>.*)$")


def expected_problems(case: Path) -> list[str]:
    """The case's `# expect:` lines as `file:line:column: path: message` strings."""
    found = []
    for raw in case.read_bytes().decode("utf-8", errors="replace").splitlines():
        if match := EXPECT.match(raw):
            found.append(f"{match['file'] or case.name}:{match['line']}:{match['column']}: {match['rest']}")
    return found


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_invalid_recipe_reports_exact_messages_and_locations(case, monkeypatch):
    expected = expected_problems(case)
    assert expected, f"{case.name} has no '# expect:' line"
    monkeypatch.chdir(INVALID)
    with pytest.raises(RecipeError) as error:
        load_recipes(case.name)
    assert sorted(str(p) for p in error.value.problems) == sorted(expected)
    assert str(error.value) == "\n".join(str(p) for p in error.value.problems)


# Each bad-input class of the recipe language, by the file-name prefix of its cases.
BAD_INPUT_CLASSES = {
    "syntax-": 5,
    "not-utf8": 1,
    "empty": 1,
    "top-level-": 2,
    "duplicate-": 2,
    "key-read-as-": 1,
    "yaml-": 4,
    "unknown-key-": 10,
    "type-": 6,
    "range-": 4,
    "name-": 2,
    "repo-id-": 5,
    "path-": 4,
    "enum-": 6,
    "missing-": 4,
    "schema-version-": 1,
    "discriminator-": 3,
    "variants-": 6,
    "extends-": 6,
    "rule-": 10,
    "several-": 1,
}
# Every cross-field rule of builder/recipe.py has a case.
RULE_CASES = [
    "rule-bnb-with-onnx-export",
    "rule-flash-attention-float32",
    "rule-dynamic-int8-cuda",
    "rule-dynamic-int8-tensorrt",
    "rule-dynamic-int8-migraphx",
    "rule-dynamic-int8-float16",
    "rule-o4-on-cpu",
    "rule-with-past-not-generation",
    "rule-fp32-offload-without-device-map",
    "rule-fp32-offload-all-cpu",
    "rule-fp32-offload-string-device-map",
    "rule-trust-remote-code-branch",
    "rule-trust-remote-code-short-sha",
    "path-local-with-revision",
]


def test_invalid_corpus_covers_every_bad_input_class():
    names = [case.stem for case in CASES]
    assert len(names) >= 45
    for prefix, minimum in BAD_INPUT_CLASSES.items():
        assert sum(name.startswith(prefix) for name in names) >= minimum, prefix
    assert all(name.startswith(tuple(BAD_INPUT_CLASSES)) for name in names), "give the new case a class prefix"
    assert set(RULE_CASES) <= set(names)


def test_validate_cli_reports_every_invalid_case_as_json(monkeypatch, capsys):
    monkeypatch.chdir(INVALID)
    assert main(["validate", "--json", "."]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is False
    by_file = {Path(entry["file"]).name: entry for entry in payload["files"]}
    assert set(by_file) == {case.name for case in CASES}  # `_` parents are not validated alone
    for case in CASES:
        entry = by_file[case.name]
        assert entry["ok"] is False and entry["recipes"] == []
        shown = sorted(
            f"{Path(p['file']).name}:{p['line']}:{p['column']}: "
            + (f"{p['path']}: " if p["path"] else "")
            + p["message"]
            for p in entry["problems"]
        )
        assert shown == sorted(expected_problems(case)), case.name


# --- the valid corpus --------------------------------------------------------------------------------------------


def load_one(name: str):
    (loaded,) = load_recipes(VALID / name)
    return loaded


def test_valid_corpus_validates_through_the_cli(capsys):
    assert main(["validate", "--schema-only", str(VALID)]) == 0
    assert "7 file(s), 10 recipe(s): ok" in capsys.readouterr().out


def test_minimal_recipe_takes_every_default():
    recipe = load_one("minimal.yaml").recipe
    assert recipe.model_dump(mode="json") == {
        "schema_version": 1,
        "name": "minimal",
        "source": {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "revision": None,
            "task": None,
            "dtype": "auto",
            "trust_remote_code": False,
            "allow_pickle": False,
            "base_model": None,
        },
        "load": {"attn_implementation": None, "device_map": None, "max_memory": None},
        "quantize": {
            "method": "bnb-4bit",
            "quant_type": "nf4",
            "double_quant": False,
            "compute_dtype": "float32",
            "quant_storage": "uint8",
            "skip_modules": [],
            "dequantize": False,
            "blocksize": 64,
            "allow_unquantized_experts": False,
        },
        "export": None,
        "verify": {
            "prompts": [],
            "max_new_tokens": 16,
            "thresholds": {
                "top1_agreement": None,
                "kl_divergence": None,
                "perplexity_ratio": None,
                "max_abs_diff": None,
                "cosine": None,
                "footprint_ratio": None,
            },
        },
        "publish": None,
    }
    assert load_one("minimal.yaml").source_path is None


def test_every_4bit_field_is_read_as_written():
    recipe = load_one("bnb-4bit-every-field.yaml").recipe
    assert recipe.source.revision == "12fd25f77366fa6b3b4b768ec3050bf629380bac" and recipe.source.pinned
    assert (recipe.source.task, recipe.source.dtype) == ("text-generation", "bfloat16")
    assert recipe.source.trust_remote_code and recipe.source.allow_pickle
    assert recipe.load.attn_implementation == "flash_attention_2"
    assert recipe.load.device_map == "cuda:0"
    assert recipe.load.max_memory == {"0": "20GiB", "cpu": "64GiB"}  # `0:` is read as the string "0"
    q = recipe.quantize
    assert (q.method, q.quant_type, q.double_quant, q.compute_dtype, q.quant_storage, q.dequantize) == (
        "bnb-4bit",
        "fp4",
        True,
        "bfloat16",
        "bfloat16",
        True,
    )
    assert q.skip_modules == ("lm_head", "model.layers.0.mlp")
    assert recipe.verify.prompts == ("The capital of France is", "2 + 2 =") and recipe.verify.max_new_tokens == 32
    assert recipe.verify.thresholds.model_dump() == {
        "top1_agreement": 0.9,
        "kl_divergence": 0.05,
        "perplexity_ratio": 1.1,
        "max_abs_diff": 0.5,
        "cosine": 0.99,
        "footprint_ratio": 0.4,
    }
    assert recipe.publish.model_dump() == {
        "repo": "demo/smollm2-135m-nf4",
        "revision": "release",
        "private": True,
        "create_pr": True,
        "license": "apache-2.0",
        "tags": ("nf4", "smollm2"),
        "card": "Built with `builder`.",
    }


def test_8bit_offload_reads_gpu_indexes_as_strings_and_resolves_the_local_path():
    loaded = load_one("bnb-8bit-offload.yaml")
    recipe = loaded.recipe
    assert recipe.load.device_map == {"model": "0", "lm_head": "cpu"}
    q = recipe.quantize
    assert (q.method, q.threshold, q.fp32_cpu_offload, q.has_fp16_weight, q.dequantize) == (
        "bnb-8bit",
        4.0,
        True,
        True,
        False,
    )
    assert loaded.source_path == (VALID / "models" / "smollm2").resolve()
    assert not recipe.source.pinned or recipe.source.is_local


def test_every_onnx_field_is_read_as_written():
    loaded = load_one("onnx-every-field.yaml")
    export = loaded.recipe.export
    assert export.model_dump() == {
        "format": "onnx",
        "exporter": "torch",
        "opset": 20,
        "dtype": "float32",
        "provider": "CPUExecutionProvider",
        "optimize": "O2",
        "with_past": False,
        "quantize": "dynamic-int8",
        "block_size": None,
        "quant_algorithm": "rtn",
        "accuracy_level": None,
        "verify_on": "CPUExecutionProvider",
    }
    assert loaded.recipe.load.device_map == "cpu" and loaded.recipe.load.attn_implementation == "eager"
    assert loaded.source_path == (Path.home() / "models" / "all-minilm-l6-v2").resolve()  # `~` is expanded


def test_three_level_extends_chain_deep_merges_child_first():
    loaded = load_one("chain-child.yaml")
    recipe = loaded.recipe
    assert loaded.files == (VALID / "chain-child.yaml", VALID / "_family-nf4.yaml", VALID / "_family.yaml")
    assert recipe.name == "family-nf4-dq"
    assert recipe.source.model == "/srv/models/smollm2-135m" and recipe.source.dtype == "bfloat16"  # level 1
    assert recipe.load.device_map == "auto"
    assert recipe.quantize.quant_type == "nf4"  # level 2
    assert recipe.quantize.double_quant is True  # level 3
    assert recipe.quantize.compute_dtype == "bfloat16"  # level 1, through two merges
    assert recipe.quantize.skip_modules == ("lm_head",)  # level 2's list replaced level 1's
    assert recipe.verify.prompts == ("only this one",)
    assert recipe.verify.thresholds.top1_agreement == 0.85 and recipe.verify.thresholds.kl_divergence == 0.1
    assert recipe.publish is None  # `publish: null` removed the inherited block


def test_variants_are_one_artifact_each_on_top_of_the_merged_file():
    loaded = load_recipes(VALID / "variants.yaml")
    by_variant = {item.variant: item.recipe for item in loaded}
    assert [item.recipe.name for item in loaded] == ["matrix-plain", "matrix-nf4-dq", "matrix-fp4", "matrix-int8"]
    assert by_variant["plain"].quantize.quant_type == "nf4" and not by_variant["plain"].quantize.double_quant
    assert by_variant["nf4-dq"].quantize.double_quant is True
    assert by_variant["fp4"].quantize.quant_type == "fp4" and by_variant["fp4"].verify.max_new_tokens == 8
    assert by_variant["plain"].verify.max_new_tokens == 16  # one variant's overrides never leak into another
    # Changing `method` replaces the inherited quantize block (bnb-4bit keys do not apply to bnb-8bit).
    assert by_variant["int8"].quantize.model_dump() == {
        "method": "bnb-8bit",
        "threshold": 6.0,
        "skip_modules": ("lm_head",),
        "fp32_cpu_offload": False,
        "has_fp16_weight": False,
        "dequantize": False,
        "allow_unquantized_experts": False,
    }
    assert all(item.files == (VALID / "variants.yaml", VALID / "_family.yaml") for item in loaded)
    assert {item.recipe.publish.repo for item in loaded} == {"demo/family"}
