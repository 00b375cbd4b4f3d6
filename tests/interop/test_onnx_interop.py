"""optimum's ORTModelFor* load builder's ONNX folders; the `optimum` exporter backend builds the same layout.

Runs only in the interop environment (`make test-interop`: transformers 4.57 + optimum-onnx); elsewhere it skips.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("optimum.onnxruntime", reason="needs optimum-onnx (transformers 4.57): run `make test-interop`")

import torch
from transformers import AutoModel, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[2]
MINILM_RECIPE = "recipes/minilm/onnx-cpu.yaml"
SMOLLM2_RECIPE = "recipes/smollm2/onnx-cpu.yaml"
SENTENCES = ["A man is eating food.", "The new movie is awesome.", "A cheetah chases its prey across a field."]


def _tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The artifact's tokenizer.json, read directly: transformers 5 writes a tokenizer_config.json
    (`TokenizersBackend`) that 4.57 does not know."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **special)


def _mean_pool(hidden, mask):
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def _embeddings_cosine(folder: Path) -> float:
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    model = ORTModelForFeatureExtraction.from_pretrained(folder, provider="CPUExecutionProvider")
    tokenizer = _tokenizer(folder)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    onnx_pooled = _mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    reference = AutoModel.from_pretrained(REPO / "models" / "all-minilm-l6-v2").eval()
    with torch.no_grad():
        torch_pooled = _mean_pool(reference(**batch).last_hidden_state, batch["attention_mask"])
    return float(torch.nn.functional.cosine_similarity(onnx_pooled, torch_pooled).min())


def test_ort_model_for_feature_extraction_loads_minilm(main_env_build):
    folder = main_env_build(MINILM_RECIPE)
    assert _embeddings_cosine(folder) > 0.9999


def test_ort_model_for_causal_lm_generates_with_the_cache(main_env_build):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = main_env_build(SMOLLM2_RECIPE)
    model = ORTModelForCausalLM.from_pretrained(folder, provider="CPUExecutionProvider", use_cache=True)
    assert model.can_use_cache and model.config.use_cache
    tokenizer = _tokenizer(folder)
    prompt = tokenizer("The capital of France is", return_tensors="pt", return_token_type_ids=False)
    generated = model.generate(**prompt, do_sample=False, max_new_tokens=12)
    # The PyTorch reference under transformers 4.57: its LlamaConfig reads `rope_theta`, which transformers 5
    # writes inside `rope_parameters`.
    source = REPO / "models" / "smollm2-135m-instruct"
    config = LlamaConfig.from_pretrained(source)
    config.rope_theta = json.loads((source / "config.json").read_text())["rope_parameters"]["rope_theta"]
    reference = LlamaForCausalLM.from_pretrained(source, config=config, torch_dtype=torch.float32).eval()
    expected = reference.generate(**prompt, do_sample=False, max_new_tokens=12)
    assert generated[0].tolist() == expected[0].tolist()
    assert "Paris" in tokenizer.decode(generated[0])


def _greedy_without_cache(folder: Path, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from the graph in a plain onnxruntime session, re-running the whole sequence with an empty
    cache at each step (no optimum, no cache carried over): the graph's own continuation, to the first end token
    as `generate` stops."""
    import numpy as np
    import onnxruntime

    config = json.loads((folder / "config.json").read_text())
    heads = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    generation = folder / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    tokens = list(ids)
    for _ in range(new_tokens):
        feed = {
            "input_ids": np.array([tokens], np.int64),
            "attention_mask": np.ones((1, len(tokens)), np.int64),
            "position_ids": np.arange(len(tokens), dtype=np.int64)[None],
        }
        for name in names:
            if name.startswith("past_key_values."):
                feed[name] = np.zeros((1, heads, 0, head_dim), np.float32)
        logits = session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0]
        tokens.append(int(logits[0, -1].argmax()))
        if tokens[-1] in eos:
            break
    return tokens


def test_ort_model_for_causal_lm_generates_from_an_int4_graph(main_env_build, tmp_path):
    """A 4-bit weight-only graph (`export.quantize: int4`: MatMulNBits) loads in ORTModelForCausalLM and generates,
    through the KV cache, exactly the graph's own greedy continuation (a plain onnxruntime session without a cache).
    PyTorch's continuation is not the reference: int4 changes a 135M model's next token at a third of positions."""
    import onnx
    from optimum.onnxruntime import ORTModelForCausalLM

    recipe = tmp_path / "smollm2-onnx-int4.yaml"
    recipe.write_text(
        f"schema_version: 1\nextends: {REPO / SMOLLM2_RECIPE}\nname: smollm2-135m-instruct-onnx-int4\n"
        "export:\n  quantize: int4\n"
    )
    folder = main_env_build(str(recipe))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["onnx"]["quantization"]["operator"] == "MatMulNBits"
    ops = [node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node]
    assert ops.count("MatMulNBits") == manifest["onnx"]["quantization"]["quantized_nodes"] > 0
    model = ORTModelForCausalLM.from_pretrained(folder, provider="CPUExecutionProvider", use_cache=True)
    assert model.can_use_cache
    tokenizer = _tokenizer(folder)
    prompt = tokenizer("The capital of France is", return_tensors="pt", return_token_type_ids=False)
    generated = model.generate(**prompt, do_sample=False, max_new_tokens=12)[0].tolist()
    assert generated == _greedy_without_cache(folder, prompt["input_ids"][0].tolist(), 12)


def test_auto_picks_the_optimum_exporter_here():
    from builder.recipe import OnnxExport
    from builder.steps.export import choose_exporter

    assert choose_exporter(OnnxExport(format="onnx"), "feature-extraction") == "optimum"


def test_optimum_backend_builds_the_same_layout(main_env_build, tmp_path):
    """exporter: optimum (main_export) in this environment gives the torch exporter's names and passes the gate."""
    import onnx

    from builder.pipeline import build_file

    recipe = tmp_path / "minilm-optimum.yaml"
    source = REPO / "models" / "all-minilm-l6-v2"
    recipe.write_text(
        f"schema_version: 1\nname: minilm-onnx-optimum\nsource:\n  model: {source}\n"
        "  task: feature-extraction\n  dtype: float32\nexport:\n  format: onnx\n  exporter: optimum\n"
        "  opset: 17\n"
    )
    result = build_file(recipe, out=tmp_path / "out", device="cpu")[0]
    manifest = result.manifest.to_json()
    assert manifest["onnx"]["exporter"] == "optimum"
    assert manifest["verification"]["passed"], manifest["verification"]["failures"]
    assert manifest["verification"]["metrics"]["cosine_min"] > 0.9999
    torch_built = main_env_build(MINILM_RECIPE)

    def io(folder: Path) -> tuple[list[str], list[str]]:
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        return sorted(i.name for i in graph.input), [o.name for o in graph.output]

    assert io(result.path) == io(torch_built)
    assert _embeddings_cosine(result.path) > 0.9999
