"""Fuzzing `builder validate FILE`: whatever the file holds, the command ends in 0 (valid) or 1 (located problems),
never in a traceback (exit 3)."""

from __future__ import annotations

import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.cli import main
from builder.recipe import Bnb4Bit, Bnb8Bit, Load, OnnxExport, Publish, Recipe, Source, Thresholds, Verify

# CI runs this in the default suite; `FUZZ_EXAMPLES=5000 pytest tests/unit/test_fuzz_loader.py` digs deeper.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KEYS = sorted(
    {
        name
        for model in (Recipe, Source, Load, Bnb4Bit, Bnb8Bit, OnnxExport, Verify, Thresholds, Publish)
        for name in model.model_fields
    }
    | {"extends", "variants", "0", "cpu", "lm_head", "nf4"}
)
WORDS = [
    "bnb-4bit",
    "bnb-8bit",
    "onnx",
    "nf4",
    "fp4",
    "float32",
    "bfloat16",
    "auto",
    "cpu",
    "cuda:0",
    "disk",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
    "dynamic-int8",
    "O4",
    "flash_attention_2",
    "org/model",
    "./model",
    "~",
    "20GiB",
    "text-generation",
    "0123456789abcdef0123456789abcdef01234567",
    "_parent.yaml",
    "fuzz.yaml",
    "missing.yaml",
    "",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 600),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(WORDS),
)
structures = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=6)
    ),
    max_leaves=30,
)
recipes = st.fixed_dictionaries(
    {"schema_version": st.sampled_from([1, 1, 2, "1", True])},
    optional={
        "name": st.sampled_from(["x", "Bad Name", "a" * 97]) | scalars,
        "source": structures,
        "load": structures,
        "quantize": structures,
        "export": structures,
        "verify": structures,
        "publish": structures,
        "variants": st.dictionaries(st.text(max_size=5), structures, max_size=3),
        "extends": st.sampled_from(["_parent.yaml", "fuzz.yaml", "missing.yaml", "", 3]),
    },
)
FRAGMENTS = [
    "schema_version: 1\n",
    "name: x\n",
    "source:\n",
    "  model: org/m\n",
    "quantize:\n",
    "  method: bnb-4bit\n",
    "variants:\n",
    "  a: ",
    "extends: _parent.yaml\n",
    "extends: fuzz.yaml\n",
    "  ",
    "\t",
    "- ",
    ": ",
    "? ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "&a ",
    "*a",
    "*b",
    "<<: *a\n",
    "!!python/object:os.system ",
    "!!binary ",
    "!custom ",
    "---\n",
    "...\n",
    "'",
    '"',
    "\\",
    "#",
    "|\n",
    ">\n",
    "~",
    "null",
    "yes",
    "0x1F",
    "1e400",
    ".nan",
    "2024-13-45",
    "\n",
    "\r\n",
    "\x00",
    "\ufeff",
    "%YAML 1.1\n",
    "%TAG ! tag:x,2000:\n",
]


def run_validate(folder, content: str | bytes) -> int:
    file = folder / "fuzz.yaml"
    file.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return main(["validate", str(file)])


def parent(folder) -> None:
    (folder / "_parent.yaml").write_text("schema_version: 1\nsource: {model: org/m}\nquantize: {method: bnb-4bit}\n")


@FUZZ
@given(content=st.text(max_size=300) | st.binary(max_size=300))
def test_arbitrary_text_never_crashes_validate(tmp_path, capsys, content):
    assert run_validate(tmp_path, content) in (0, 1)
    assert "internal error" not in capsys.readouterr().err


@FUZZ
@given(pieces=st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=40))
def test_yaml_syntax_soup_never_crashes_validate(tmp_path, capsys, pieces):
    parent(tmp_path)
    assert run_validate(tmp_path, "".join(pieces)) in (0, 1)
    assert "internal error" not in capsys.readouterr().err


@FUZZ
@given(data=recipes, parent_data=recipes | structures, style=st.sampled_from([False, True, None]))
def test_recipe_shaped_structures_never_crash_validate(tmp_path, capsys, data, parent_data, style):
    """The file and the parent it may extend are both arbitrary: extends, variants and merging see odd shapes."""
    (tmp_path / "_parent.yaml").write_text(yaml.safe_dump(parent_data, allow_unicode=True))
    text = yaml.safe_dump(data, default_flow_style=style, allow_unicode=True)
    assert run_validate(tmp_path, text) in (0, 1)
    assert "internal error" not in capsys.readouterr().err
