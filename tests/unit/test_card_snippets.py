"""Every snippet a card writes runs as written, in a fresh interpreter without builder, on the tiny random Llama's
builds (bitsandbytes nf4, the torch exporter's ONNX graph with and without the KV cache, the genai exporter's) and on
MiniLM's sentence-transformers folder; and what decides a snippet (chat template, pooling) comes from the folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from card_snippets import card_snippets, local_snippet, run_card_snippets

from builder.cli import main
from builder.pipeline import build
from builder.plan import make_plan
from builder.recipe import load_recipes

BLOCKS = {
    "nf4": "quantize:\n  method: bnb-4bit\n  quant_type: nf4\n",
    "onnx-past": "export:\n  format: onnx\n  exporter: torch\n  with_past: true\n",
    "onnx": "export:\n  format: onnx\n  exporter: torch\n",
    "genai": "export:\n  format: onnx\n  exporter: genai\n",
}
# Random weights: the gate only has to run.
LM_VERIFY = "verify:\n  max_new_tokens: 4\n  thresholds: {top1_agreement: 0.0, kl_divergence: 100.0}\n"
ONNX_VERIFY = "verify:\n  max_new_tokens: 4\n"


@pytest.fixture(scope="module")
def tiny_builds(tiny_llama, tmp_path_factory):
    """kind -> the tiny Llama's artifact folder, built the first time a test asks for it."""
    root = tmp_path_factory.mktemp("card-snippets")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            recipe = root / f"tiny-{kind}.yaml"
            recipe.write_text(
                f"schema_version: 1\nname: tiny-{kind}\nsource:\n  model: {tiny_llama}\n  task: text-generation\n"
                + BLOCKS[kind]
                + (LM_VERIFY if kind == "nf4" else ONNX_VERIFY)
            )
            [loaded] = load_recipes(recipe)
            built[kind] = build(make_plan(loaded), out=root / "out", device="cpu").path
        return built[kind]

    return get


@pytest.mark.parametrize("kind", ["nf4", "onnx-past", pytest.param("onnx", marks=pytest.mark.slow), "genai"])
def test_every_snippet_of_a_decoders_card_runs_as_written(tiny_builds, kind):
    # Random weights decode to nothing in particular: that the snippet exits 0 on the folder is the check.
    assert len(run_card_snippets(tiny_builds(kind))) == 1


def test_an_instruct_models_card_prompts_with_its_chat_template(tiny_builds, tmp_path):
    """The tiny Llama carries SmolLM2-Instruct's chat template: the card applies it; a copy without it gets a
    sentence to continue instead."""
    folder = tiny_builds("nf4")
    [code] = card_snippets(folder)
    assert "tokenizer.apply_chat_template(" in code and "What is the capital of France?" in code
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    from builder.artifact import load_manifest
    from builder.card import render_card

    card = render_card(load_manifest(plain), folder=plain)
    assert "apply_chat_template" not in card and 'tokenizer("The capital of France is"' in card


def test_the_onnx_decoder_snippet_feeds_the_graphs_cache_inputs(tiny_builds):
    [code] = card_snippets(tiny_builds("onnx-past"))
    assert '"position_ids"' in code and 'startswith("past_key_values.")' in code and "present." in code


@pytest.fixture(scope="module")
def minilm_int8(minilm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("minilm-card")
    recipe = out / "minilm-int8.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: minilm-int8\nsource:\n  model: {minilm}\n  task: feature-extraction\n"
        "  dtype: float32\nquantize:\n  method: bnb-8bit\n"
    )
    assert main(["build", str(recipe), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    return out / "minilm-int8"


def test_a_sentence_transformers_card_pools_as_sentence_transformers_does(minilm_int8):
    """SentenceTransformer(folder) and the transformers-only snippet (mean pooling, normalized, from the folder's
    modules.json and 1_Pooling/config.json) print the same similarity of the two sentences."""
    st_code, transformers_code = card_snippets(minilm_int8)
    assert "SentenceTransformer(model_id)" in st_code and "mask.sum(axis=1)" in transformers_code
    outputs = run_card_snippets(minilm_int8)
    similarities = [float(out.split(")")[-1]) for out in outputs]
    assert all(out.startswith("(2, 384)") for out in outputs), outputs
    assert similarities[0] == pytest.approx(similarities[1], abs=2e-3), outputs


def test_cls_pooling_without_normalize_is_what_the_card_writes(minilm_int8, tmp_path):
    folder = tmp_path / "cls"
    shutil.copytree(minilm_int8, folder)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    pooling |= {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    from builder.artifact import load_manifest
    from builder.card import render_card

    card = render_card(load_manifest(folder), folder=folder)
    assert "embeddings = hidden[:, 0]" in card and "np.linalg.norm" not in card


def test_a_snippet_that_never_loads_the_repo_is_refused():
    with pytest.raises(AssertionError, match="never loads"):
        local_snippet('print("hello")', "<org>/x", Path("/tmp"))
