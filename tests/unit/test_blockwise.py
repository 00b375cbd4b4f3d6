"""The block-by-block forward reads each decoder block from the safetensors files for its forward: the same logits
and greedy tokens as the whole model, with one block on the device at a time and none held between forwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.steps.blockwise import decoder_blocks
from builder.steps.metrics import load_for_probe

LAYERS = 6


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    """A random 6-layer Llama (hidden 32, vocabulary 128) in bfloat16, in two safetensors shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("deep-llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
    assert len(list(folder.glob("*.safetensors"))) > 1  # blocks spread over files: each read finds its file
    return folder


def test_blocks_read_from_the_files_give_the_whole_models_logits(deep_llama):
    import torch

    whole, none = load_for_probe(str(deep_llama), "text-generation", "bfloat16", "cpu")
    by_blocks, offload = load_for_probe(str(deep_llama), "text-generation", "bfloat16", "cpu", max_device_memory=1)
    assert none is None and offload is not None
    blocks = decoder_blocks(by_blocks)
    assert all(t.device.type == "meta" for t in blocks.parameters())  # not read yet: no block in host memory

    ids = torch.arange(3, 43).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(by_blocks(input_ids=ids).logits, whole(input_ids=ids).logits)
        forwards = offload.onloads // LAYERS
        generated = by_blocks.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(generated, whole.generate(input_ids=ids, max_new_tokens=3, do_sample=False))

    record = offload.as_json()
    assert record["read_from"] == "files" and record["blocks"] == LAYERS
    assert forwards == 1 and record["onloads"] == LAYERS * 4  # one forward, then three decoding steps
    assert record["peak_onloaded_blocks"] == 1  # one block at a time at any depth
    assert record["peak_onloaded_bytes"] == record["largest_block_bytes"] > 0
    assert all(t.device.type == "meta" for t in blocks.parameters())  # each block dropped after its forward
    assert by_blocks.get_memory_footprint() == whole.get_memory_footprint()


def test_block_weights_transformers_converts_on_load_are_read_from_its_copies(tmp_path):
    """Mixtral's per-expert weights are fused on load: transformers writes the fused ones under `scratch`, and each
    block's forward reads them from there."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    folder, scratch = tmp_path / "moe", tmp_path / "scratch"
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)

    whole, _ = load_for_probe(str(folder), "text-generation", "bfloat16", "cpu")
    by_blocks, offload = load_for_probe(str(folder), "text-generation", "bfloat16", "cpu", 1, str(scratch))
    ids = torch.arange(3, 30).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(by_blocks(input_ids=ids).logits, whole(input_ids=ids).logits)
    assert offload is not None and offload.read_from == "files" and offload.peak_onloaded_blocks == 1
    assert sorted(p.name for p in scratch.glob("model.layers.0.*")) == [
        "model.layers.0.mlp.experts.down_proj.safetensors",
        "model.layers.0.mlp.experts.gate_up_proj.safetensors",
    ]
