"""Wider exact streaming: checkpoints with keys the model drops on load, tied heads saved anyway, float8 tensors.
Each is streamed and compared with the transformers path byte for byte, or refused with the reason."""

from __future__ import annotations

import shutil

import pytest
from stream_compare import differences, recipe_for, transformers_build


def _rewrite(source, folder, change) -> None:
    """Copy `source` to `folder`, passing its tensors through `change(tensors) -> tensors`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    tensors = change(load_file(folder / "model.safetensors"))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("method", ["nf4-dq", "int8"])
def test_minilm_streams_past_its_position_ids_buffer(method, minilm, tmp_path):
    """all-MiniLM-L6-v2's checkpoint holds `embeddings.position_ids`, a non-persistent buffer from_pretrained drops
    (the transformers path took it before: 'the checkpoint has keys the model does not')."""
    from builder.checkpoint import read_header
    from builder.steps.stream import stream_build, streamable

    assert "embeddings.position_ids" in {t.name for t in read_header(minilm / "model.safetensors")}
    recipe = recipe_for(minilm, method)
    assert streamable(recipe, minilm) is None
    stream_build(recipe, minilm, tmp_path / "stream")
    reference = transformers_build(recipe, minilm, tmp_path / "transformers", task="feature-extraction")
    assert differences(tmp_path / "stream", reference) == []


def test_a_tied_head_saved_in_the_checkpoint_is_dropped_like_from_pretrained_does(tiny_llama, tmp_path):
    from builder.steps.stream import stream_build, streamable

    source = tmp_path / "source"
    _rewrite(tiny_llama, source, lambda t: t | {"lm_head.weight": t["model.embed_tokens.weight"].clone()})
    recipe = recipe_for(source, "nf4-dq")
    assert streamable(recipe, source) is None
    stream_build(recipe, source, tmp_path / "stream")
    assert differences(tmp_path / "stream", transformers_build(recipe, source, tmp_path / "transformers")) == []


@pytest.mark.parametrize(
    "dtype, tensor", [("float8_e4m3fn", "model.layers.0.mlp.down_proj.weight"), ("float8_e5m2", "model.norm.weight")]
)
def test_float8_tensors_are_cast_like_the_transformers_path(dtype, tensor, tiny_llama, tmp_path):
    """A quantized Linear stored as F8_E4M3 and a norm stored as F8_E5M2: both cast to the load dtype."""
    import torch

    from builder.checkpoint import read_header
    from builder.steps.stream import stream_build, streamable

    source = tmp_path / "source"
    _rewrite(tiny_llama, source, lambda t: t | {tensor: t[tensor].to(getattr(torch, dtype))})
    assert {t.name: t.dtype for t in read_header(source / "model.safetensors")}[tensor].startswith("F8_")
    recipe = recipe_for(source, "nf4")
    assert streamable(recipe, source) is None
    stream_build(recipe, source, tmp_path / "stream")
    assert differences(tmp_path / "stream", transformers_build(recipe, source, tmp_path / "transformers")) == []


def test_a_dtype_the_streamer_cannot_read_is_a_reason_not_an_error(tiny_llama, tmp_path):
    """F8_E8M0 (MX scales) has no torch dtype in the streamer's table: `streamable` names it, nothing raises."""
    import torch

    from builder.steps.stream import streamable

    if not hasattr(torch, "float8_e8m0fnu"):
        pytest.skip("this torch has no float8_e8m0fnu")
    source = tmp_path / "source"
    name = "model.norm.weight"
    _rewrite(tiny_llama, source, lambda t: t | {name: t[name].abs().to(torch.float8_e8m0fnu)})
    assert streamable(recipe_for(source, "nf4"), source) == (
        f"tensor {name} has dtype F8_E8M0, which the streaming quantizer cannot read"
    )
