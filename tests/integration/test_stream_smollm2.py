"""The streaming quantizer on real weights (SmolLM2-135M-Instruct): one comparison per method family."""

from __future__ import annotations

import pytest
from stream_compare import differences, recipe_for, transformers_build


@pytest.mark.parametrize("method", ["nf4-dq", "int8"])
def test_smollm2_streamed_equals_transformers(method, smollm2, tmp_path):
    from builder.steps.stream import stream_build, streamable

    recipe = recipe_for(smollm2, method)
    assert streamable(recipe, smollm2) is None
    result = stream_build(recipe, smollm2, tmp_path / "stream")
    assert len(result["layers"]) == 30 * 7  # every Linear of the 30 blocks; the tied lm_head stays bf16
    reference = transformers_build(recipe, smollm2, tmp_path / "transformers")
    assert differences(tmp_path / "stream", reference) == []
