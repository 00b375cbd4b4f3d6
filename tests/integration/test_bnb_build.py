"""bitsandbytes builds of real weights on CPU: SmolLM2-135M-Instruct (nf4 + double quant, fp4, int8 with and
without skip_modules) and all-MiniLM-L6-v2 (nf4, int8).

Each artifact is built once per session (SmolLM2 builds take ~20-40 s on 2 cores) and shared by the tests. Each one
reloads in a fresh Python process with plain transformers (no builder import) and generates or embeds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from builder.pipeline import build
from builder.plan import make_plan
from builder.recipe import load_recipes

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_LAYERS = 30 * 7  # 30 decoder layers x (q, k, v, o, gate, up, down); the tied lm_head is never quantized
MINILM_LAYERS = 6 * 6 + 1  # 6 encoder layers x (query, key, value, attention output, intermediate, output) + pooler

# name -> (recipe file, variant); "int8-default" is written by the fixture: int8 with transformers' default skips.
RECIPES = {
    "smollm2-nf4-dq": ("recipes/smollm2/nf4.yaml", None),
    "smollm2-fp4": ("recipes/smollm2/4bit-matrix.yaml", "fp4"),
    "smollm2-int8": ("recipes/smollm2/int8.yaml", None),
    "smollm2-int8-default": (None, None),
    "minilm-nf4": ("recipes/minilm/nf4.yaml", None),
    "minilm-int8": ("recipes/minilm/int8.yaml", None),
}
# fp4 and int8 without skip_modules add ~3 min of builds and verification on 2 cores: `make test-slow` runs them.
SLOW = ("smollm2-fp4", "smollm2-int8-default")
SMOLLM2 = [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in RECIPES if k.startswith("smollm2")]
MINILM = [k for k in RECIPES if k.startswith("minilm")]


@pytest.fixture(scope="session")
def artifacts(smollm2, minilm, tmp_path_factory):
    """name -> built artifact folder, building each artifact the first time a test asks for it."""
    out = tmp_path_factory.mktemp("bnb-artifacts")
    built: dict[str, Path] = {}

    def get(name: str, into: Path = out) -> Path:
        key = (name, into)
        if key not in built:
            built[key] = build(_plan(name, smollm2, tmp_path_factory), out=into, device="cpu").path
        return built[key]

    return get


def _plan(name: str, smollm2: Path, tmp_path_factory):
    file, variant = RECIPES[name]
    if file is None:
        recipe = tmp_path_factory.mktemp("recipes") / "int8-default.yaml"
        recipe.write_text(
            f"schema_version: 1\nname: smollm2-135m-instruct-int8-default\nsource:\n  model: {smollm2}\n"
            "  task: text-generation\n  dtype: bfloat16\nquantize:\n  method: bnb-8bit\n"
        )
        file = recipe
    [loaded] = [r for r in load_recipes(REPO / file) if r.variant == variant]
    return make_plan(loaded)


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def fresh_process(script: str, *args: str) -> dict:
    """Run `script` in a new interpreter (no builder import) and return the JSON it prints last."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


GENERATE = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
inputs = tokenizer("The capital of France is", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print(json.dumps({"text": tokenizer.decode(out[0, inputs.input_ids.shape[1]:]),
                  "q_proj": type(model.model.layers[0].self_attn.q_proj).__name__,
                  "down_proj_29": type(model.model.layers[29].mlp.down_proj).__name__,
                  "builder_imported": any(m == "builder" or m.startswith("builder.") for m in sys.modules)}))
"""

EMBED = """
import json, sys
import torch
from transformers import AutoModel, AutoTokenizer
artifact, source = sys.argv[1], sys.argv[2]
sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."]
def embed(path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, device_map="cpu")
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1), model
quantized, model = embed(artifact)
reference, _ = embed(source)
print(json.dumps({"cosine_to_source": (quantized * reference).sum(-1).tolist(),
                  "similar": float(quantized[0] @ quantized[1]), "unrelated": float(quantized[0] @ quantized[2]),
                  "query": type(model.encoder.layer[0].attention.self.query).__name__,
                  "builder_imported": any(m == "builder" or m.startswith("builder.") for m in sys.modules)}))
"""


@pytest.mark.parametrize("name", SMOLLM2)
def test_smollm2_artifact_reloads_in_a_fresh_process_and_generates(artifacts, name):
    result = fresh_process(GENERATE, str(artifacts(name)))
    assert not result["builder_imported"]
    assert result["q_proj"] == ("Linear8bitLt" if "int8" in name else "Linear4bit")
    assert result["down_proj_29"] == ("Linear" if name == "smollm2-int8" else result["q_proj"])
    assert "Paris" in result["text"], result["text"]


@pytest.mark.parametrize("name", MINILM)
def test_minilm_artifact_reloads_in_a_fresh_process_and_embeds(artifacts, minilm, name):
    result = fresh_process(EMBED, str(artifacts(name)), str(minilm))
    assert not result["builder_imported"]
    assert result["query"] == ("Linear8bitLt" if "int8" in name else "Linear4bit")
    assert min(result["cosine_to_source"]) > 0.95, result
    assert result["similar"] > result["unrelated"] + 0.2, result


def test_the_smollm2_cards_snippet_answers_through_the_chat_template(artifacts):
    from card_snippets import run_card_snippets

    [answer] = run_card_snippets(artifacts("smollm2-nf4-dq"))
    assert "Paris" in answer, answer


def test_the_minilm_cards_snippets_pool_as_sentence_transformers_does(artifacts):
    """SentenceTransformer(folder) and the transformers-only snippet print the same embedding shape and
    similarity of the two sentences."""
    from card_snippets import run_card_snippets

    outputs = run_card_snippets(artifacts("minilm-int8"))
    assert len(outputs) == 2 and all(out and out.startswith("(2, 384)") for out in outputs), outputs
    first, second = (float(out.rsplit(" ", 1)[1]) for out in outputs if out)
    assert first == pytest.approx(second, abs=2e-3) and 0 < first < 1, outputs


@pytest.mark.parametrize("name", ["smollm2-nf4-dq", pytest.param("smollm2-fp4", marks=pytest.mark.slow), "minilm-nf4"])
def test_4bit_weights_are_in_bitsandbytes_serialized_format(artifacts, name):
    folder = artifacts(name)
    manifest = manifest_of(folder)
    quant_type = manifest["recipe"]["quantize"]["quant_type"]
    layer = "model.layers.0.self_attn.q_proj" if name.startswith("smollm2") else "encoder.layer.0.attention.self.query"
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        keys = {k for k in weights.keys() if k.startswith(layer + ".")}
        packed = weights.get_tensor(f"{layer}.weight")
    expected = {
        f"{layer}.weight",
        f"{layer}.weight.absmax",
        f"{layer}.weight.quant_map",
        f"{layer}.weight.quant_state.bitsandbytes__{quant_type}",
    }
    if manifest["recipe"]["quantize"]["double_quant"]:
        expected |= {f"{layer}.weight.nested_absmax", f"{layer}.weight.nested_quant_map"}
    assert expected <= keys, keys
    assert str(packed.dtype) == "torch.uint8"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"] is True
    assert config["bnb_4bit_quant_type"] == quant_type


@pytest.mark.parametrize("name", ["smollm2-int8", "minilm-int8"])
def test_8bit_weights_are_int8_with_row_scales(artifacts, name):
    folder = artifacts(name)
    layer = "model.layers.0.self_attn.q_proj" if name.startswith("smollm2") else "encoder.layer.0.attention.self.query"
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        weight, scales = weights.get_tensor(f"{layer}.weight"), weights.get_tensor(f"{layer}.SCB")
        if name == "smollm2-int8":  # skipped: kept in the source dtype
            assert str(weights.get_tensor("model.layers.29.mlp.down_proj.weight").dtype) == "torch.bfloat16"
    assert str(weight.dtype) == "torch.int8" and str(scales.dtype) == "torch.float32"
    assert scales.shape[0] == weight.shape[0]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["load_in_8bit"] is True and config["llm_int8_threshold"] == 6.0


@pytest.mark.parametrize(
    "name, expected",
    [("smollm2-nf4-dq", 4.127), pytest.param("smollm2-fp4", 4.5, marks=pytest.mark.slow), ("minilm-nf4", 4.5)],
)
def test_4bit_bits_per_parameter(artifacts, name, expected):
    """4 bits a weight + a float32 absmax per 64 weights (0.5 bit), or with double quant an 8-bit absmax plus a
    float32 per 256 blocks (0.127 bit); each layer's constant state (quant maps, the JSON quant_state) adds
    about 0.02 bit on these small layers."""
    manifest = manifest_of(artifacts(name))
    layers = manifest["quantized_layers"]
    assert layers["count"] == (MINILM_LAYERS if name.startswith("minilm") else SMOLLM2_LAYERS)
    assert layers["bits_per_param"] == pytest.approx(expected, abs=0.03)  # the quantized layers' (manifest v3)


def test_int8_footprint_is_half_of_bfloat16(artifacts):
    manifest = manifest_of(artifacts("smollm2-int8"))
    layers = manifest["quantized_layers"]
    assert layers["count"] == SMOLLM2_LAYERS - 1  # model.layers.29.mlp.down_proj is skipped
    # The quantized layers: 8 bits + a float32 scale per row, against 16 bits in bfloat16.
    assert layers["bytes"] / (layers["parameters"] * 2) == pytest.approx(0.5, abs=0.01)
    assert layers["bits_per_param"] == pytest.approx(8.0, abs=0.06)
    # The whole model: the (tied) embeddings, norms and skipped layer stay bfloat16, so the saving is exactly the
    # quantized layers' half.
    footprint = manifest["footprint"]
    assert footprint["source_bytes"] == pytest.approx(134_515_008 * 2, rel=0.001)
    assert footprint["artifact_bytes"] == pytest.approx(footprint["source_bytes"] - layers["parameters"], rel=0.001)


@pytest.mark.slow
def test_int8_without_skip_modules_quantizes_every_decoder_linear(artifacts):
    manifest = manifest_of(artifacts("smollm2-int8-default"))
    assert manifest["quantized_layers"]["count"] == SMOLLM2_LAYERS
    assert manifest["recipe"]["quantize"]["skip_modules"] == []
    config = json.loads((artifacts("smollm2-int8-default") / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] is None  # transformers' default skip (the output head) applies
    skipped = manifest_of(artifacts("smollm2-int8"))
    assert manifest["footprint"]["artifact_bytes"] < skipped["footprint"]["artifact_bytes"]


def test_4bit_footprint_against_the_source(artifacts):
    footprint = manifest_of(artifacts("smollm2-nf4-dq"))["footprint"]
    assert footprint["ratio"] < 0.45  # 4-bit layers; the 28M-parameter embedding table stays bfloat16


@pytest.mark.parametrize("name", MINILM)
def test_two_builds_give_identical_weight_files(artifacts, tmp_path, name):
    first = manifest_of(artifacts(name))
    second = manifest_of(artifacts(name, into=tmp_path))
    assert second["build_hash"] == first["build_hash"]
    assert second["files"]["model.safetensors"] == first["files"]["model.safetensors"]
    assert second["files"]["config.json"] == first["files"]["config.json"]


@pytest.mark.parametrize(
    ("name", "golden"),
    [
        ("smollm2-nf4-dq", "smollm2-135m-instruct-nf4"),
        ("minilm-nf4", "all-minilm-l6-v2-nf4"),
        ("minilm-int8", "all-minilm-l6-v2-int8"),
    ],
)
def test_manifest_is_the_recorded_one(artifacts, name, golden, monkeypatch):
    from golden import differences

    monkeypatch.chdir(REPO)  # recipe_files are recorded relative to the working folder
    assert differences(manifest_of(artifacts(name)), golden) == []
