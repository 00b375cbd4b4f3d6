"""The streaming quantizer on CUDA: byte-for-byte equal to the transformers path on the same GPU, and within a
GPU memory cap that the model itself does not fit in. Uses the bench's synthetic SmolLM2-shaped checkpoint
(random bf16 weights, real architecture) so that it needs no model download; `bench/run.py --device cuda` runs the
same comparison on the Llama-3-8B shape."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from stream_compare import differences, recipe_for, transformers_build

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="session")
def smol_shape(tmp_path_factory) -> Path:
    from checkpoints import generate

    return generate("smollm2", tmp_path_factory.mktemp("smollm2-shape"))


@pytest.mark.parametrize("method", ["nf4-dq", "nf4", "fp4", "int8"])
def test_streamed_on_cuda_equals_transformers_on_cuda(method, smol_shape, tmp_path):
    from builder.steps.stream import stream_build, streamable

    recipe = recipe_for(smol_shape, method)
    assert streamable(recipe, smol_shape) is None
    stream_build(recipe, smol_shape, tmp_path / "stream", "cuda")
    reference = transformers_build(recipe, smol_shape, tmp_path / "transformers", "cuda")
    assert differences(tmp_path / "stream", reference) == []


def test_streaming_peak_gpu_memory_stays_small(smol_shape, tmp_path):
    import gc

    import torch

    from builder.steps.stream import stream_build

    gc.collect()
    before = torch.cuda.memory_allocated()  # what earlier tests' models still hold
    torch.cuda.reset_peak_memory_stats()
    stream_build(recipe_for(smol_shape, "int8"), smol_shape, tmp_path, "cuda")
    largest = 576 * 1536 * 2  # one MLP weight in bf16; the 56 MB embedding never goes to the GPU
    assert torch.cuda.max_memory_allocated() - before < 16 * largest
