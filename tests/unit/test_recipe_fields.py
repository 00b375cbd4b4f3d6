"""Every field of the recipe schema: values it takes, and a bad value's located path and message.

`test_every_schema_field_has_a_case` fails when a field is added to builder/recipe.py without a case here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from builder.errors import RecipeError
from builder.recipe import Bnb4Bit, Bnb8Bit, Load, OnnxExport, Publish, Recipe, Source, Thresholds, Verify, load_recipes

HEX = "0123456789abcdef0123456789abcdef01234567"
REF_RULE = (
    "git refs have no spaces, none of ~ ^ : ? * [ \\, no '..' or '@{', do not start or end with '/' and do "
    "not end with '.lock'"
)
BASE = {"schema_version": 1, "name": "x", "source": {"model": "org/model"}, "quantize": {"method": "bnb-4bit"}}
# Where a model's fields live in a recipe, and the keys its block needs to be valid.
BLOCKS: dict[type, tuple[tuple[str, ...], dict]] = {
    Recipe: ((), {}),
    Source: (("source",), {"model": "org/model"}),
    Load: (("load",), {}),
    Bnb4Bit: (("quantize",), {"method": "bnb-4bit"}),
    Bnb8Bit: (("quantize",), {"method": "bnb-8bit"}),
    OnnxExport: (("export",), {"format": "onnx"}),
    Verify: (("verify",), {}),
    Thresholds: (("verify", "thresholds"), {}),
    Publish: (("publish",), {"repo": "org/x"}),
}


@dataclass
class Case:
    model: type
    name: str
    good: list[Any]
    bad: list[tuple[Any, str]] = field(default_factory=list)
    """(value, "path: message") with the path relative to the block."""


CASES = [
    Case(
        Recipe,
        "schema_version",
        [1],
        [
            (2, "schema_version: 2 is not a schema_version this builder reads; write schema_version: 1"),
            (True, "schema_version: true is not a schema_version this builder reads; write schema_version: 1"),
        ],
    ),
    Case(
        Recipe,
        "name",
        ["smollm2-135m.nf4_dq", "0", "a" * 96],
        [
            (
                "a" * 97,
                f"name: '{'a' * 97}' is not a valid artifact name: use lowercase letters, digits, '.', '_' and "
                "'-', starting with a letter or digit, at most 96 characters (^[a-z0-9][a-z0-9._-]{0,95}$)",
            ),
            (7, "name: expected a string, got 7 (quote it to make it a string)"),
        ],
    ),
    Case(Recipe, "source", [{"model": "org/model"}], [("org/model", "source: expected a mapping, got 'org/model'")]),
    Case(Recipe, "load", [{}, {"device_map": "cpu"}], [([], "load: expected a mapping, got a list")]),
    Case(
        Recipe,
        "quantize",
        [{"method": "bnb-8bit"}],
        [
            ("bnb-4bit", "quantize: expected a mapping, got 'bnb-4bit'"),
            (
                None,
                "name: recipe x has neither `quantize` nor `export`: there is nothing to build; add a `quantize` "
                "block (bitsandbytes) or an `export` block (ONNX)",
            ),
        ],
    ),
    Case(Recipe, "export", [None, {"format": "onnx"}], [(3, "export: expected a mapping, got 3")]),
    Case(Recipe, "verify", [{}], [("strict", "verify: expected a mapping, got 'strict'")]),
    Case(Recipe, "publish", [None, {"repo": "org/x"}], [(True, "publish: expected a mapping, got true")]),
    # source
    Case(
        Source,
        "model",
        ["org/model", "gpt2", "Org_1/model.v2-x", "./m", "../m", "/srv/m", "~/m", "~"],
        [
            (
                "org/model/extra",
                "model: 'org/model/extra' is neither a Hub repo id (org/name) nor a local path; start "
                "local folders with './', '../', '/' or '~'",
            ),
            (
                "",
                "model: '' is neither a Hub repo id (org/name) nor a local path; start local folders with './', '../', "
                "'/' or '~'",
            ),
            (
                "org/model\n",
                "model: 'org/model\\n' is neither a Hub repo id (org/name) nor a local path; start local "
                "folders with './', '../', '/' or '~'",
            ),
            (
                "./models/a\tb",
                "model: './models/a\\tb' contains a control character; write the folder's path as plain text",
            ),
            (
                "..\\models\\m",
                "model: '..\\models\\m' contains a backslash; write local paths with '/' (./models/x), on Windows too",
            ),
            (5, "model: expected a string, got 5 (quote it to make it a string)"),
        ],
    ),
    Case(
        Source,
        "revision",
        [None, "main", "v1.0", HEX],
        [
            ("", "revision: string should have at least 1 character (got '')"),
            (2024, "revision: expected a string, got 2024 (quote it to make it a string)"),
            ("main~1", f"revision: 'main~1' is not a branch, tag or commit name: {REF_RULE}"),
        ],
    ),
    Case(
        Source,
        "task",
        [None, "text-generation", "feature-extraction", "text2text-generation"],
        [
            (
                "generation",
                "task: 'generation' is not one of audio-classification, audio-frame-classification, "
                "audio-xvector, automatic-speech-recognition, depth-estimation, feature-extraction, fill-mask, "
                "image-classification, ... (did you mean 'text-generation'?)",
            )
        ],
    ),
    Case(
        Source,
        "dtype",
        ["float32", "float16", "bfloat16", "auto"],
        [
            ("fp32", "dtype: 'fp32' is not one of float32, float16, bfloat16, auto (did you mean 'float32'?)"),
            ("int8", "dtype: 'int8' is not one of float32, float16, bfloat16, auto"),
        ],
    ),
    Case(
        Source,
        "trust_remote_code",
        [False],
        [("no", "trust_remote_code: expected true or false, got 'no' (write it without quotes)")],
    ),
    Case(Source, "allow_pickle", [True, False], [(1, "allow_pickle: expected true or false, got 1")]),
    Case(
        Source,
        "base_model",
        [None, "HuggingFaceTB/SmolLM2-135M-Instruct"],
        [
            (
                "../models/m",
                "base_model: '../models/m' is not a Hub repo id; write the model the source derives from as org/name",
            )
        ],
    ),
    # load
    Case(
        Load,
        "attn_implementation",
        [None, "eager", "sdpa", "flex_attention"],
        [
            (
                "flash",
                "attn_implementation: 'flash' is not one of eager, sdpa, flex_attention, flash_attention_2, "
                "flash_attention_3",
            )
        ],
    ),
    Case(
        Load,
        "device_map",
        [
            None,
            "auto",
            "cpu",
            "cuda",
            "cuda:1",
            {"model": 0, "lm_head": "cpu"},
            {"model.layers": "cuda:1", "model.embed_tokens": "disk"},
        ],
        [
            ("cuda:x", "device_map: 'cuda:x' is not auto, cpu, cuda or cuda:N"),
            ({"model": -1}, "device_map.model: -1 is not a device: use cpu, disk, cuda, cuda:N or N"),
            ({"model": True}, "device_map.model: true is not a device: use cpu, disk, cuda, cuda:N or N"),
            (["cpu"], "device_map: expected auto, cpu, cuda, cuda:N or a mapping {module: device}"),
        ],
    ),
    Case(
        Load,
        "max_memory",
        [None, {"0": "20GiB", "cpu": "1.5 TB", "disk": "500MB"}],
        [
            ({"gpu0": "1GiB"}, "max_memory.gpu0: 'gpu0' is not a device key: use a GPU index (\"0\"), cpu or disk"),
            ({"cpu": "lots"}, "max_memory.cpu: 'lots' is not a memory size like 20GiB or 500MB"),
            ({"0": 20}, "max_memory.0: expected a string, got 20 (quote it to make it a string)"),
        ],
    ),
    # quantize: bnb-4bit
    Case(
        Bnb4Bit,
        "method",
        ["bnb-4bit"],
        [("bnb4", "method: 'bnb4' is not one of bnb-4bit, bnb-8bit (did you mean 'bnb-4bit'?)")],
    ),
    Case(
        Bnb4Bit,
        "quant_type",
        ["nf4", "fp4"],
        [("NF4", "quant_type: 'NF4' is not one of nf4, fp4 (did you mean 'nf4'?)")],
    ),
    Case(
        Bnb4Bit,
        "double_quant",
        [True, False],
        [("true", "double_quant: expected true or false, got 'true' (write it without quotes)")],
    ),
    Case(
        Bnb4Bit,
        "compute_dtype",
        ["float32", "float16", "bfloat16"],
        [("auto", "compute_dtype: 'auto' is not one of float32, float16, bfloat16")],
    ),
    Case(
        Bnb4Bit,
        "quant_storage",
        ["uint8", "float16", "bfloat16", "float32"],
        [("uint4", "quant_storage: 'uint4' is not one of uint8, float16, bfloat16, float32 (did you mean 'uint8'?)")],
    ),
    Case(
        Bnb4Bit,
        "blocksize",
        [32, 64, 4096],
        [
            (100, "blocksize: 100 is not one of 32, 64, 128, 256, 512, 1024, 2048, 4096"),
            ("64", "blocksize: '64' is not one of 32, 64, 128, 256, 512, 1024, 2048, 4096 (write it without quotes)"),
        ],
    ),
    Case(
        Bnb4Bit,
        "skip_modules",
        [[], ["lm_head", "mlp.down_proj"]],
        [
            ("lm_head", "skip_modules: expected a list, got 'lm_head'"),
            ([""], "skip_modules.0: string should have at least 1 character (got '')"),
        ],
    ),
    Case(Bnb4Bit, "dequantize", [True], [(None, "dequantize: expected true or false, got nothing (null)")]),
    # quantize: bnb-8bit
    Case(Bnb8Bit, "method", ["bnb-8bit"], [(None, "method: nothing (null) is not one of bnb-4bit, bnb-8bit")]),
    Case(
        Bnb8Bit,
        "threshold",
        [6, 6.0, 0.5],
        [
            (0, "threshold: input should be greater than 0 (got 0)"),
            ("high", "threshold: expected a number, got 'high' (write it without quotes)"),
            (float("nan"), "threshold: expected a finite number, got nan"),
        ],
    ),
    Case(Bnb8Bit, "skip_modules", [["lm_head"]], [({"lm_head": True}, "skip_modules: expected a list, got a mapping")]),
    Case(
        Bnb8Bit,
        "fp32_cpu_offload",
        [False],
        [("no", "fp32_cpu_offload: expected true or false, got 'no' (write it without quotes)")],
    ),
    Case(Bnb8Bit, "has_fp16_weight", [True, False], [(0, "has_fp16_weight: expected true or false, got 0")]),
    Case(
        Bnb8Bit,
        "dequantize",
        [True],
        [("yes", "dequantize: expected true or false, got 'yes' (write it without quotes)")],
    ),
    # export
    Case(OnnxExport, "format", ["onnx"], [("ONNX", "format: 'ONNX' is not one of onnx (did you mean 'onnx'?)")]),
    Case(
        OnnxExport,
        "exporter",
        ["auto", "torch", "optimum", "genai"],
        [("dynamo", "exporter: 'dynamo' is not one of auto, torch, optimum, genai")],
    ),
    Case(
        OnnxExport,
        "opset",
        [7, 18, 23],
        [
            (24, "opset: input should be less than or equal to 23 (got 24)"),
            ("18", "opset: expected an integer, got '18' (write it without quotes)"),
        ],
    ),
    Case(
        OnnxExport,
        "dtype",
        ["float32", "float16"],
        [
            ("bf16", "dtype: 'bf16' is not one of float32, float16, bfloat16 (did you mean 'bfloat16'?)"),
            ("bfloat16", "dtype: bfloat16 is built by onnxruntime-genai's model builder; set `exporter: genai`"),
        ],
    ),
    Case(
        OnnxExport,
        "provider",
        ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider", "MIGraphXExecutionProvider"],
        [
            (
                "CPU",
                "provider: 'CPU' is not one of CPUExecutionProvider, CUDAExecutionProvider, "
                "TensorrtExecutionProvider, MIGraphXExecutionProvider, ROCMExecutionProvider (did you mean "
                "'CPUExecutionProvider'?)",
            ),
            (
                "ROCMExecutionProvider",
                "provider: ROCMExecutionProvider is not in onnxruntime 1.32 and later; AMD GPUs "
                "run ONNX through MIGraphXExecutionProvider: set it instead",
            ),
        ],
    ),
    Case(
        OnnxExport,
        "optimize",
        ["none", "O1", "O2", "O3"],
        [("O5", "optimize: 'O5' is not one of none, O1, O2, O3, O4")],
    ),
    Case(
        OnnxExport,
        "with_past",
        [True, False],
        [("on", "with_past: expected true or false, got 'on' (write it without quotes)")],
    ),
    Case(
        OnnxExport,
        "quantize",
        ["none", "dynamic-int8", "int4", "nf4", "fp4"],
        [
            (
                "int16",
                "quantize: 'int16' is not one of none, dynamic-int8, int4, int8, nf4, fp4 (did you mean 'int8'?)",
            ),
            ("int8", "quantize: int8 is built by onnxruntime-genai's model builder; set `exporter: genai`"),
        ],
    ),
    Case(OnnxExport, "block_size", [None], [(8, "block_size: input should be greater than or equal to 16 (got 8)")]),
    Case(OnnxExport, "quant_algorithm", ["rtn"], [("gptq", "quant_algorithm: 'gptq' is not one of rtn, hqq, k_quant")]),
    Case(
        OnnxExport, "accuracy_level", [None], [(5, "accuracy_level: input should be less than or equal to 4 (got 5)")]
    ),
    Case(
        OnnxExport,
        "verify_on",
        [None, "CPUExecutionProvider", "CUDAExecutionProvider"],
        [
            (
                "cpu",
                "verify_on: 'cpu' is not one of CPUExecutionProvider, CUDAExecutionProvider, "
                "TensorrtExecutionProvider, MIGraphXExecutionProvider, ROCMExecutionProvider (did you mean "
                "'CPUExecutionProvider'?)",
            )
        ],
    ),
    # verify
    Case(
        Verify,
        "prompts",
        [[], ["The capital of France is", "2 + 2 ="]],
        [
            ("hello", "prompts: expected a list, got 'hello'"),
            (["ok", 3], "prompts.1: expected a string, got 3 (quote it to make it a string)"),
        ],
    ),
    Case(
        Verify,
        "max_new_tokens",
        [1, 16, 512],
        [
            (513, "max_new_tokens: input should be less than or equal to 512 (got 513)"),
            (8.0, "max_new_tokens: expected an integer, got 8.0"),
        ],
    ),
    Case(Verify, "thresholds", [{}, {"top1_agreement": 1}], [([0.9], "thresholds: expected a mapping, got a list")]),
    Case(
        Thresholds,
        "top1_agreement",
        [None, 0, 0.9, 1],
        [(-0.1, "top1_agreement: input should be greater than or equal to 0 (got -0.1)")],
    ),
    Case(
        Thresholds,
        "kl_divergence",
        [None, 0, 0.05],
        [
            (-1, "kl_divergence: input should be greater than or equal to 0 (got -1)"),
            (float("inf"), "kl_divergence: expected a finite number, got inf"),
        ],
    ),
    Case(
        Thresholds,
        "perplexity_ratio",
        [None, 1, 1.05],
        [(0.99, "perplexity_ratio: input should be greater than or equal to 1 (got 0.99)")],
    ),
    Case(Thresholds, "max_abs_diff", [None, 1e-3, 2], [(0, "max_abs_diff: input should be greater than 0 (got 0)")]),
    Case(
        Thresholds, "cosine", [None, -1, 0.99, 1], [(1.5, "cosine: input should be less than or equal to 1 (got 1.5)")]
    ),
    Case(Thresholds, "footprint_ratio", [None, 0.3], [(False, "footprint_ratio: expected a number, got false")]),
    # publish
    Case(
        Publish,
        "repo",
        ["org/x", "my-org/model.v2_nf4"],
        [
            ("x", "repo: 'x' is not a Hub repo id; write it as org/name"),
            ("org/x/y", "repo: 'org/x/y' is not a Hub repo id; write it as org/name"),
        ],
    ),
    Case(
        Publish,
        "revision",
        ["main", "release/v1", "refs/pr/1"],
        [
            ("", "revision: string should have at least 1 character (got '')"),
            ("release/", f"revision: 'release/' is not a branch, tag or commit name: {REF_RULE}"),
        ],
    ),
    Case(
        Publish,
        "private",
        [True, False],
        [("false", "private: expected true or false, got 'false' (write it without quotes)")],
    ),
    Case(Publish, "create_pr", [True, False], [(2, "create_pr: expected true or false, got 2")]),
    Case(
        Publish,
        "license",
        [None, "apache-2.0", "mit", "llama3.2", "other"],
        [
            (3, "license: expected a string, got 3 (quote it to make it a string)"),
            (
                "Apache 2.0",
                "license: 'Apache 2.0' is not a Hub license identifier (did you mean 'apache-2.0'?); write "
                "one of those listed at https://huggingface.co/docs/hub/repositories-licenses, or `other` and name the "
                "license in the card's text",
            ),
            (
                "MIT License",
                "license: 'MIT License' is not a Hub license identifier (did you mean 'mit'?); write one of "
                "those listed at https://huggingface.co/docs/hub/repositories-licenses, or `other` and name the "
                "license in the card's text",
            ),
        ],
    ),
    Case(
        Publish, "tags", [[], ["nf4", "smollm2"]], [([""], "tags.0: string should have at least 1 character (got '')")]
    ),
    Case(Publish, "card", [None, "# Notes\n\nBuilt on CPU."], [(["a"], "card: expected a string, got a list")]),
]


def recipe_with(case: Case, value: Any) -> dict:
    prefix, needs = BLOCKS[case.model]
    data = yaml.safe_load(yaml.safe_dump(BASE))
    block = data
    for key in prefix:
        block = block.setdefault(key, {})
    block.update(needs)
    block[case.name] = value
    if case.model is OnnxExport or (case.model is Recipe and case.name == "export" and value is not None):
        del data["quantize"]  # a recipe builds one thing: the export replaces the base's quantize block
    return data


def load_data(tmp_path, data: dict):
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_recipes(file)


def test_every_schema_field_has_a_case():
    covered = {(case.model, case.name) for case in CASES}
    every = {(model, name) for model in BLOCKS for name in model.model_fields}
    assert every - covered == set()
    assert all(case.good and case.bad for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.model.__name__}.{c.name}")
def test_field_takes_its_good_values(case, tmp_path):
    prefix, _ = BLOCKS[case.model]
    for value in case.good:
        (loaded,) = load_data(tmp_path, recipe_with(case, value))
        read = loaded.recipe
        for key in (*prefix, case.name):
            read = getattr(read, key)
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, dict) and case.name == "device_map":
            value = {k: str(v) for k, v in value.items()}  # GPU indexes are kept as strings
        if isinstance(read, (Recipe, Source, Load, Bnb4Bit, Bnb8Bit, OnnxExport, Verify, Thresholds, Publish)):
            read = {k: v for k, v in read.model_dump().items() if k in value}
        assert read == value, (case.name, value)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.model.__name__}.{c.name}")
def test_field_rejects_a_bad_value_naming_its_path(case, tmp_path):
    prefix, _ = BLOCKS[case.model]
    for value, expected in case.bad:
        with pytest.raises(RecipeError) as error:
            load_data(tmp_path, recipe_with(case, value))
        shown = [f"{p.path}: {p.message}" for p in error.value.problems]
        assert shown == [".".join((*prefix, expected)) if prefix else expected], value
        assert all(p.location.file.endswith("recipe.yaml") for p in error.value.problems)


def test_language_docs_cover_every_top_level_key_and_source_and_load_field():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text()
    section = docs[docs.index("<!-- section: language -->") : docs.index("<!-- end: language -->")]
    names = [*Recipe.model_fields, "extends", "variants", *Source.model_fields, *Load.model_fields]
    assert [name for name in names if f"| `{name}` |" not in section] == []
    for heading in (
        "### `extends`",
        "### `variants`",
        "### Errors",
        "### Editor support",
        "`builder validate",
        "`builder plan",
        "`builder schema`",
        "yaml-language-server: $schema=",
    ):
        assert heading in section
