"""Issue 28: a 4-bit layer whose output size is not a multiple of 32 (a classifier head with a few labels) stays in
full precision. bitsandbytes' CPU 4-bit kernel for CPUs with AVX512-BF16 asserts `N must be divisible by block_n`
on it, and transformers' default skips miss `classifier` (its last parameter is `classifier.bias`).

The model: a tiny BERT AutoModelForSequenceClassification with 3 labels, built from BertConfig with deterministic
weights and MiniLM's tokenizer, as the conformance families are."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from stream_compare import differences

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
from families import ENCODER_VOCAB, Family, make_family  # noqa: E402

THREE_LABELS = Family(
    "BERT, 3 labels",
    "BertConfig",
    "BertForSequenceClassification",
    {
        "vocab_size": ENCODER_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "num_labels": 3,
    },
    "encoder",
    "text-classification",
)


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory, minilm) -> Path:
    return make_family(THREE_LABELS, tmp_path_factory.mktemp("bert-3-labels"), {"encoder": minilm})


def _recipe(folder: Path, source: Path, quantize: str, name: str = "bert-3-labels") -> Path:
    recipe = folder / f"{name}.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: {name}\nsource: {{model: {source}, task: text-classification}}\n"
        f"quantize: {quantize}\n",
        encoding="utf-8",
    )
    return recipe


def _context(recipe_file: Path, workdir: Path):
    from builder.context import BuildContext
    from builder.plan import make_plan
    from builder.recipe import load_recipes
    from builder.steps.load import resolve

    loaded = load_recipes(recipe_file)[0]
    ctx = BuildContext(loaded, make_plan(loaded), workdir, "cpu", device_map={"": "cpu"})
    resolve(ctx)
    return ctx


def _packs_on_avx512_bf16_cpus(model) -> None:
    """Repack every 4-bit weight as bitsandbytes' CPU kernel does on a CPU with AVX512-BF16 on its first forward
    (this host may lack the instructions, so the forward would not take that path here)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:
        state = layer.weight.quant_state
        _convert_weight_packed_for_cpu(layer.weight.data.clone(), type(state).from_dict(state.as_dict(), "cpu"))


def test_plan_says_which_modules_stay_in_full_precision_and_why(three_labels, tmp_path, capsys):
    from builder.cli import main

    assert main(["plan", str(_recipe(tmp_path, three_labels, "{method: bnb-4bit}"))]) == 0
    assert "keep classifier in full precision (output size not a multiple of 32" in capsys.readouterr().out
    assert main(["plan", str(_recipe(tmp_path, three_labels, "{method: bnb-8bit}"))]) == 0
    assert "in full precision" not in capsys.readouterr().out  # int8 has no such kernel rule


def test_both_paths_keep_the_head_and_write_the_same_bytes(three_labels, tmp_path, monkeypatch):
    from builder.steps import quantize as quantize_module

    recipe = _recipe(tmp_path, three_labels, "{method: bnb-4bit, quant_type: nf4}")
    streamed = _context(recipe, tmp_path / "stream")
    streamed.workdir.mkdir()
    quantize_module.quantize(streamed)
    monkeypatch.setattr(quantize_module, "stream_plan", lambda recipe, source_dir, task=None: "forced by the test")
    reference = _context(recipe, tmp_path / "transformers")
    quantize_module.quantize(reference)
    assert (streamed.quantize_path, reference.quantize_path) == ("stream", "transformers (forced by the test)")
    assert differences(streamed.workdir, reference.workdir) == []
    assert (streamed.workdir / "config.json").read_bytes() == (reference.workdir / "config.json").read_bytes()
    skipped = json.loads((streamed.workdir / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert "classifier" in skipped
    from safetensors import safe_open

    with safe_open(streamed.workdir / "model.safetensors", "pt") as weights:
        assert weights.get_slice("classifier.weight").get_dtype() == "F32"
        assert "classifier.weight.absmax" not in set(weights.keys())
        assert "bert.encoder.layer.0.attention.self.query.weight.absmax" in set(weights.keys())


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["{method: bnb-4bit, quant_type: nf4}", "{method: bnb-8bit}"])
def test_a_3_label_head_builds_verifies_and_reloads(quantize, three_labels, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from builder.cli import main

    recipe = _recipe(tmp_path, three_labels, quantize)
    assert main(["build", str(recipe), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    artifact = tmp_path / "out" / "bert-3-labels"
    assert json.loads((artifact / "manifest.json").read_text())["verification"]["passed"] is True
    model = AutoModelForSequenceClassification.from_pretrained(artifact, device_map={"": "cpu"})
    tokens = AutoTokenizer.from_pretrained(artifact)(["a short sentence"], return_tensors="pt")
    with torch.no_grad():
        assert model(**tokens).logits.shape == (1, 3)
    if "bnb-4bit" in quantize:
        assert type(model.classifier) is torch.nn.Linear
        _packs_on_avx512_bf16_cpus(model)
