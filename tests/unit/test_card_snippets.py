"""What decides a card's snippets comes from the artifact's folder (the chat template of an instruct model's
tokenizer; the pooling and normalization of a sentence-transformers folder), and (slow) every snippet of each tiny
decoder kind's card runs as written in a fresh interpreter without builder. The default tier runs the snippets of the
real-weight builds the integration tests make (tests/integration/: SmolLM2 nf4 and ONNX with the KV cache, MiniLM
int8, nf4 and ONNX); the conformance matrix runs those of every cell it builds."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from card_snippets import local_snippet, run_card_snippets
from test_card import bnb_manifest, onnx_manifest

from builder.artifact import Manifest
from builder.card import render_card
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


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_every_snippet_of_a_tiny_decoders_card_runs_as_written(tiny_builds, kind):
    """The default tier runs the snippets of the real-weight builds (tests/integration/); this covers each decoder
    kind, the graph without the KV cache included."""
    # Random weights decode to nothing in particular: that each snippet exits 0 on the folder is the check.
    assert run_card_snippets(tiny_builds(kind))


def card(manifest: dict, folder: Path | None) -> str:
    return render_card(Manifest.model_validate(manifest), folder=folder)


def snippets(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.fixture
def tokenizer_folder(tiny_llama, tmp_path) -> Path:
    """A folder with the tiny Llama's tokenizer files: SmolLM2-Instruct's, chat template included."""
    folder = tmp_path / "artifact"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_llama / name).is_file():
            shutil.copy(tiny_llama / name, folder / name)
    return folder


def without_chat_template(folder: Path) -> Path:
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind", ["bnb", "onnx"])
def test_an_instruct_models_card_prompts_through_its_chat_template(tokenizer_folder, kind):
    manifest = bnb_manifest() if kind == "bnb" else text_generation_onnx_manifest()
    [code, *_] = snippets(card(manifest, tokenizer_folder))
    assert "tokenizer.apply_chat_template(" in code and "What is the capital of France?" in code
    [code, *_] = snippets(card(manifest, without_chat_template(tokenizer_folder)))
    assert "apply_chat_template" not in code and 'tokenizer("The capital of France is"' in code


def text_generation_onnx_manifest() -> dict:
    manifest = onnx_manifest(with_past=True)
    manifest["source"]["task"] = manifest["recipe"]["source"]["task"] = "text-generation"
    return manifest


def test_the_onnx_decoder_snippet_feeds_position_ids_and_the_cache():
    [code, optimum] = snippets(card(text_generation_onnx_manifest(), None))
    assert '"position_ids"' in code and 'startswith("past_key_values.")' in code and '"present."' in code
    assert "A man is eating food." not in code and "ORTModelForCausalLM" in optimum


def sentence_transformers_folder(tmp_path: Path, pooling: dict, normalize: bool) -> Path:
    folder = tmp_path / "st"
    (folder / "1_Pooling").mkdir(parents=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, **pooling}))
    return folder


def encoder_manifest() -> dict:
    manifest = bnb_manifest()
    manifest["source"]["task"] = manifest["recipe"]["source"]["task"] = "feature-extraction"
    return manifest


@pytest.mark.parametrize("make", [encoder_manifest, onnx_manifest])
def test_an_encoders_card_pools_as_the_folders_sentence_transformers_config_says(tmp_path, make):
    mean = card(make(), sentence_transformers_folder(tmp_path / "mean", {"pooling_mode_mean_tokens": True}, True))
    assert "(hidden * mask).sum(axis=1)" in mean and "np.linalg.norm" in mean
    cls = card(make(), sentence_transformers_folder(tmp_path / "cls", {"pooling_mode_cls_token": True}, False))
    assert "embeddings = hidden[:, 0]" in cls and "np.linalg.norm" not in cls
    plain = card(make(), tmp_path)  # no sentence-transformers config: mean pooling, normalized
    assert "(hidden * mask).sum(axis=1)" in plain and "np.linalg.norm" in plain
    assert "SentenceTransformer" not in plain


def test_a_sentence_transformers_folder_gets_the_sentence_transformers_snippet_first(tmp_path):
    folder = sentence_transformers_folder(tmp_path, {"pooling_mode_mean_tokens": True}, True)
    [first, second] = snippets(card(encoder_manifest(), folder))
    assert "model = SentenceTransformer(model_id)" in first and "AutoModel.from_pretrained(model_id" in second
    # ONNX: sentence-transformers' ONNX backend wants another layout; onnxruntime and optimum only.
    assert "SentenceTransformer" not in card(onnx_manifest(), folder)


def test_a_snippet_that_never_loads_the_repo_is_refused():
    with pytest.raises(AssertionError, match="never loads"):
        local_snippet('print("hello")', "<org>/x", Path("/tmp"))
