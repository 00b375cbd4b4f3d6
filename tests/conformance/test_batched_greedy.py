"""The gate generates every prompt's greedy continuation in one left-padded batch (`causal_lm._greedy`); each must be
the continuation that prompt gets when it is generated alone, in every decoder family of the matrix (absolute and
rotary positions, ALiBi-free and sliding-window attention, a mixture of experts)."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, slug
from transformers import AutoModelForCausalLM

from builder.steps import metrics
from builder.steps.verify import tokenize_inputs
from builder.tasks import causal_lm

NEW_TOKENS = 16  # the recipe default
PROMPTS = ("Once", "It is a truth universally acknowledged, that", "Call me Ishmael. Some years ago, never mind how")


class _Stage:
    def step(self, done: int) -> None:
        self.done = done


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.tokenizer == "lm"], ids=slug)
def test_a_batched_continuation_is_the_one_generated_alone(family, conformance_root):
    source = conformance_root / "sources" / slug(family)
    prompts = tokenize_inputs(source, "text-generation", PROMPTS)["prompts"]
    assert len({ids.shape[1] for ids in prompts}) > 1, "the prompts must differ in length, or nothing is padded"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # random weights: an end token would cut continuations short
    stage = _Stage()
    batched = _batched(model, prompts, stage)
    assert batched == _alone(model, prompts)
    assert stage.done == NEW_TOKENS

    # A row that ends early ends where it would alone (generate pads it while the others go on).
    model.generation_config.eos_token_id = batched[0][3]
    assert _batched(model, prompts, stage) == _alone(model, prompts)


@torch.inference_mode()
def _batched(model, prompts, stage) -> list[list[int]]:
    return causal_lm._greedy(model, prompts, NEW_TOKENS, metrics._Run("cpu", lambda event: None), stage)


@torch.inference_mode()
def _alone(model, prompts) -> list[list[int]]:
    return [
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )[0, ids.shape[1] :].tolist()
        for ids in prompts
    ]
