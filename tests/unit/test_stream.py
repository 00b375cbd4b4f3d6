"""The streaming quantizer on tiny_llama: same tensors and configs as the transformers path, or a reason not to."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from stream_compare import differences, recipe_for, tensors, transformers_build


@pytest.fixture(scope="session")
def tiny_references(tiny_llama, tmp_path_factory) -> dict:
    """tiny_llama built through transformers, once per method."""
    root = tmp_path_factory.mktemp("tiny-transformers")
    return {
        method: transformers_build(recipe_for(tiny_llama, method), tiny_llama, root / method)
        for method in ("nf4-dq", "fp4", "int8")
    }


@pytest.mark.parametrize("method", ["nf4-dq", "fp4", "int8"])
def test_streamed_artifact_equals_the_transformers_one(method, tiny_llama, tiny_references, tmp_path):
    from builder.steps.stream import stream_build, streamable

    recipe = recipe_for(tiny_llama, method)
    assert streamable(recipe, tiny_llama) is None
    result = stream_build(recipe, tiny_llama, tmp_path)
    assert differences(tmp_path, tiny_references[method]) == []
    assert result["shards"] == 1 and sorted(result["layers"]) == sorted(
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    )
    assert (tmp_path / "tokenizer.json").is_file()


def test_streamed_artifact_loads_with_stock_transformers_and_generates(tiny_llama, tmp_path):
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    from builder.steps.stream import stream_build

    stream_build(recipe_for(tiny_llama, "nf4-dq"), tiny_llama, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    assert model.config.quantization_config.bnb_4bit_use_double_quant
    output = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert output.shape == (1, 6)


def test_skip_modules_follow_transformers_matching(tiny_llama, tmp_path):
    """`model.layers.1.mlp` skips that block's Linears (prefix up to a module boundary); `layers.0.mlp` skips
    nothing (it is neither a prefix nor a suffix of a Linear's name): transformers' rule, not a guess."""
    from builder.steps.stream import stream_build

    recipe = recipe_for(tiny_llama, "int8", skip_modules=["lm_head", "model.layers.1.mlp", "layers.0.mlp"])
    result = stream_build(recipe, tiny_llama, tmp_path / "stream")
    assert not any(name.startswith("model.layers.1.mlp") for name in result["layers"])
    assert "model.layers.0.mlp.up_proj" in result["layers"]
    assert tensors(tmp_path / "stream")["model.layers.1.mlp.up_proj.weight"].dtype.is_floating_point
    reference = transformers_build(recipe, tiny_llama, tmp_path / "transformers")
    assert differences(tmp_path / "stream", reference) == []


def test_sharded_output_has_an_index_and_loads(tiny_llama, tiny_references, tmp_path):
    from transformers import AutoModelForCausalLM

    from builder.steps.stream import stream_build

    result = stream_build(recipe_for(tiny_llama, "nf4-dq"), tiny_llama, tmp_path, max_shard_size=2_000_000)
    assert result["shards"] > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(tmp_path))
    assert differences(tmp_path, tiny_references["nf4-dq"]) == []
    AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")


@pytest.mark.parametrize(
    "method, quantize, load, reason",
    [
        ("nf4", {"dequantize": True}, {}, "dequantize"),
        ("int8", {"has_fp16_weight": True}, {}, "has_fp16_weight"),
        ("nf4", {"quant_storage": "bfloat16"}, {}, "quant_storage"),
        ("nf4", {}, {"device_map": {"model": "cpu", "lm_head": "cpu"}}, "device_map"),
        ("nf4", {}, {"max_memory": {"cpu": "1GiB"}}, "max_memory"),
    ],
)
def test_not_streamable_recipes_say_why(method, quantize, load, reason, tiny_llama):
    from builder.recipe import Recipe
    from builder.steps.stream import streamable

    data = recipe_for(tiny_llama, method, **quantize).model_dump(mode="json")
    data["load"].update(load)
    assert reason in streamable(Recipe.model_validate(data), tiny_llama)


def test_an_export_recipe_is_not_streamable(tiny_llama):
    from builder.recipe import Recipe
    from builder.steps.stream import streamable

    data = recipe_for(tiny_llama, "nf4").model_dump(mode="json")
    data["quantize"], data["export"] = None, {"format": "onnx"}
    assert "no bitsandbytes" in streamable(Recipe.model_validate(data), tiny_llama)


def test_a_tied_head_stored_with_other_values_is_not_streamed(tiny_llama, tmp_path):
    """A tied lm_head stored anyway but unlike the embeddings: which copy wins is transformers' business, so
    streaming refuses (an equal copy streams: tests/unit/test_stream_wider.py)."""
    from safetensors.torch import load_file, save_file

    from builder.steps.stream import streamable

    source = tmp_path / "src"
    shutil.copytree(tiny_llama, source)
    weights = load_file(source / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] * 2
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    assert streamable(recipe_for(source, "nf4"), source) == (
        "the checkpoint's lm_head.weight differs from model.embed_tokens.weight, which it is tied to"
    )


def test_already_quantized_source_is_not_streamed(tiny_llama, tiny_references):
    from builder.steps.stream import streamable

    source = tiny_references["int8"]
    assert "already quantized" in streamable(recipe_for(source, "nf4"), source)


def test_shard_writer_pads_the_header_and_keeps_tensors_aligned(tmp_path):
    import torch
    from safetensors.torch import load_file

    from builder.steps.stream_io import OutTensor, ShardWriter

    writer = ShardWriter(
        tmp_path / "x.safetensors",
        [
            OutTensor("blob", torch.uint8, None),
            OutTensor("bytes", torch.uint8, (3,)),
            OutTensor("floats", torch.float32, (5,)),
            OutTensor("halves", torch.bfloat16, (2, 3)),
        ],
        {"format": "pt"},
    )
    values = {
        "blob": torch.arange(7, dtype=torch.uint8),
        "bytes": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "floats": torch.randn(5),
        "halves": torch.randn(2, 3).to(torch.bfloat16),
    }
    for name in ("halves", "blob", "floats", "bytes"):
        writer.write(name, values[name])
    size = writer.finish()
    raw = (tmp_path / "x.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert size == len(raw) and (8 + length) % 8 == 0 and raw[8 + length - 1 : 8 + length] == b" "
    assert all(
        meta["data_offsets"][0] % values[name].element_size() == 0
        for name, meta in header.items()
        if name != "__metadata__"
    )
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[name], values[name]) for name in values)


def test_only_the_files_transformers_reads_are_streamed(tiny_llama, tiny_references, tmp_path):
    """A stray consolidated.safetensors (Mistral-style repos ship one) is not the model: transformers reads
    model.safetensors, and so does the streaming quantizer."""
    import torch
    from safetensors.torch import save_file

    from builder.steps.stream import stream_build

    source = tmp_path / "src"
    shutil.copytree(tiny_llama, source)
    save_file({"tok_embeddings.weight": torch.zeros(4, 4)}, source / "consolidated.safetensors")
    stream_build(recipe_for(source, "int8"), source, tmp_path / "out")
    assert differences(tmp_path / "out", tiny_references["int8"]) == []


def test_a_truncated_source_is_refused_from_its_header_before_any_work(tiny_llama, tmp_path):
    import os

    from builder.errors import SourceError
    from builder.steps.stream import stream_build

    source = tmp_path / "src"
    shutil.copytree(tiny_llama, source)
    weights = source / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 4096)  # the last tensors' bytes are gone
    with pytest.raises(SourceError, match="not a valid safetensors file: .* outside the file's"):
        stream_build(recipe_for(source, "int8"), source, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_failed_read_fails_the_build_and_stops_every_thread(tiny_llama, tmp_path, monkeypatch):
    import os
    import threading

    from builder.steps import stream_io
    from builder.steps.stream import stream_build

    source = tmp_path / "src"
    shutil.copytree(tiny_llama, source)
    weights = source / "model.safetensors"
    read_headers = stream_io.read_source_tensors

    def shrink_after_the_header_is_read(files):
        tensors = read_headers(files)
        os.truncate(weights, weights.stat().st_size - 4096)  # the file shrinks under the running build
        return tensors

    monkeypatch.setattr(stream_io, "read_source_tensors", shrink_after_the_header_is_read)
    before = threading.active_count()
    with pytest.raises(OSError, match="unexpected end of file"):
        stream_build(recipe_for(source, "int8"), source, tmp_path / "out")
    assert threading.active_count() == before
