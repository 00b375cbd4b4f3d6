"""The evaluation data every gate compares on: builder/data/, a public-domain text (LMs score it; encoders embed
`ENCODER_SENTENCES` of its sentences) and the default prompts (builder/data/README.md says what and whence)."""

from __future__ import annotations

import re
from importlib import resources

ENCODER_SENTENCES = 32  # sentences of the evaluation text embedded by encoders (plus the recipe's prompts)


def eval_text() -> str:
    """The built-in evaluation text (public-domain prose)."""
    return resources.files("builder").joinpath("data/eval_text.txt").read_text(encoding="utf-8")


def default_prompts() -> list[str]:
    """The greedy-continuation prompts used when a recipe gives none."""
    text = resources.files("builder").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def eval_sentences(count: int) -> list[str]:
    """`count` sentences of at least five words, spread evenly over the evaluation text."""
    flat = re.sub(r"\s+", " ", eval_text())
    sentences = [s for s in re.split(r"(?<=[.!?:;])\s+", flat) if len(s.split()) >= 5]
    step = max(len(sentences) // count, 1)
    return sentences[::step][:count]
