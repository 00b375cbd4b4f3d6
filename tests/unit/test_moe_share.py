"""Issue 28, honest first: bitsandbytes converts only nn.Linear, and transformers 5 holds a mixture of experts' experts
as fused 3-D parameters, so a 4-bit or 8-bit build of one leaves most of its weights in bf16 (bitsandbytes #1849).
The plan and `validate` refuse such a recipe at `quantize.method` unless it sets `allow_unquantized_experts`; then
the plan, the manifest and the card report the share that was quantized, and the card says the experts were not.

The models are tiny Mixtral, OLMoE and Qwen2-MoE made from transformers' config classes with seeded weights (the
checkpoints keep transformers' per-expert tensor names, `experts.0.w1.weight`, which it fuses on load).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from builder.checkpoint import local_weight_files, read_header
from builder.cli import main

_DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2}),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 128,
            "shared_expert_intermediate_size": 64,
        },
    ),
}
METHODS = {"nf4": "  method: bnb-4bit\n  quant_type: nf4\n  compute_dtype: bfloat16\n", "int8": "  method: bnb-8bit\n"}


def _save(folder: Path, config_class: str, model_class: str, kwargs: dict, vocab: int) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=vocab, **_DECODER, **kwargs)
    getattr(transformers, model_class)(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    """Each MoE family with a small vocabulary (its experts are most of its weights, as in real MoE models)."""
    root = tmp_path_factory.mktemp("moe")
    return {name: _save(root / name, *spec, vocab=256) for name, spec in MOE.items()}


def _recipe(tmp_path: Path, source: Path, method: str, accept: bool = False) -> Path:
    recipe = tmp_path / f"{source.name}-{method}.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: {source.name}-{method}\nsource:\n  model: {source}\n  task: text-generation\n"
        f"quantize:\n{METHODS[method]}"
        + ("  allow_unquantized_experts: true\n" if accept else "")
        + "verify:\n  max_new_tokens: 4\n  thresholds: {top1_agreement: 0.0, kl_divergence: 100.0, "
        "perplexity_ratio: 100.0}\n"
    )
    return recipe


def _shares(folder: Path, experts: int) -> tuple[float, float]:
    """(quantized, experts) shares of the checkpoint's bytes of a 4-bit build, by the tensors' names: Linear weights
    that are not embeddings, the head, experts, the router (`gate`, one row per expert) or a layer of fewer than 32
    outputs (kept for bitsandbytes' CPU kernel: Qwen2-MoE's `shared_expert_gate`) vs the experts' weights."""
    tensors = [t for file in local_weight_files(folder) for t in read_header(file)]
    total = sum(t.nbytes for t in tensors)
    expert = sum(t.nbytes for t in tensors if ".experts." in t.name)
    quantized = sum(
        t.nbytes
        for t in tensors
        if len(t.shape) == 2
        and t.name.endswith(".weight")
        and not re.search(r"embed|lm_head|\.experts\.", t.name)
        and not (t.name.endswith(".gate.weight") and t.shape[0] == experts)
        and t.shape[0] % 32 == 0
    )
    return quantized / total, expert / total


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MOE)
def test_plan_and_validate_refuse_bnb_on_unfused_experts_at_quantize_method(name, method, moe_models, tmp_path, capsys):
    recipe = _recipe(tmp_path, moe_models[name], method)
    _, experts = _shares(moe_models[name], 4)
    assert experts > 0.5  # most of the weights
    for command in ("validate", "plan"):
        assert main([command, str(recipe)]) == 1
        captured = capsys.readouterr()
        [line] = [line for line in (captured.out + captured.err).splitlines() if "#1849" in line]
        assert re.search(rf"{re.escape(str(recipe))}:7:\d+: quantize\.method: ", line), line
        assert f"the experts, {experts:.1%} of the weights, would stay in bfloat16" in line
        assert "`quantize.allow_unquantized_experts: true`" in line


@pytest.mark.parametrize("name", MOE)
def test_an_accepted_moe_recipe_plans_with_its_quantized_share(name, moe_models, tmp_path, capsys):
    recipe = _recipe(tmp_path, moe_models[name], "nf4", accept=True)
    quantized, experts = _shares(moe_models[name], 4)
    assert main(["validate", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["plan", str(recipe), "--json"]) == 0
    share = json.loads(capsys.readouterr().out)[0]["weight_share"]
    assert share == {
        "quantized": round(quantized, 4),
        "unquantized_experts": round(experts, 4),
        "kept_dtype": "bfloat16",
    }
    assert main(["plan", str(recipe)]) == 0
    assert (
        f"quantized:   {share['quantized']:.1%} of the source's weight bytes; the mixture-of-experts experts "
        f"({share['unquantized_experts']:.1%}) are kept in bfloat16, not quantized (bitsandbytes #1849)"
        in capsys.readouterr().out
    )


def test_a_dense_model_plans_as_before_with_its_share(tiny_llama, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny_llama, "nf4")
    quantized, experts = _shares(tiny_llama, 0)
    assert experts == 0
    assert main(["plan", str(recipe), "--json"]) == 0
    share = json.loads(capsys.readouterr().out)[0]["weight_share"]
    assert share == {"quantized": round(quantized, 4), "unquantized_experts": 0.0, "kept_dtype": None}


@pytest.mark.slow  # a CPU build: ~25 s on this machine
@pytest.mark.parametrize("name", MOE)
def test_an_accepted_moe_build_records_the_share_it_reached_and_its_card_says_so(name, real_models, tmp_path):
    from transformers import AutoTokenizer

    # SmolLM2's tokenizer: the gate's prompts need one
    source_folder = _save(tmp_path / name, *MOE[name], vocab=49152)
    AutoTokenizer.from_pretrained(real_models["smollm2-135m-instruct"]).save_pretrained(source_folder)
    recipe = _recipe(tmp_path, source_folder, "nf4", accept=True)
    assert main(["build", str(recipe), "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 0
    artifact = tmp_path / "out" / recipe.stem
    manifest = json.loads((artifact / "manifest.json").read_text())
    share = manifest["weight_share"]
    source = [t for file in local_weight_files(source_folder) for t in read_header(file)]
    source_bytes = sum(t.nbytes for t in source)
    # the plan's share is what bitsandbytes really converted: its Linear4bit layers' bf16 weights
    assert share["quantized"] == round(manifest["quantized_layers"]["parameters"] * 2 / source_bytes, 4)
    assert share["unquantized_experts"] > 0 and share["kept_dtype"] == "bfloat16"
    # bits per parameter reached: every weight file over every parameter, far from 4 with bf16 experts
    weight_bytes = sum(p.stat().st_size for p in artifact.glob("*.safetensors"))
    assert manifest["bits_per_param"] == round(8 * weight_bytes / sum(t.numel for t in source), 4) > 8
    assert manifest["quantized_layers"]["bits_per_param"] < 5
    card = (artifact / "README.md").read_text()
    assert (
        f"Only partly quantized: the mixture-of-experts experts ({share['unquantized_experts']:.1%} of the weights) "
        "are kept in bfloat16, not quantized" in card
    )
    assert "bitsandbytes 4-bit (nf4) build of" not in card
