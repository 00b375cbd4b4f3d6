"""How recipe problems name things: key paths, values as the YAML author wrote them, and the one did-you-mean.

The bottom of the recipe package: the YAML reader, the schema, the error messages and the loader all word their
problems through it, so a suggestion reads the same wherever it is made.
"""

from __future__ import annotations

from difflib import get_close_matches
from typing import Any

Path_ = tuple[str, ...]
"""A key path in a recipe: ("quantize", "quant_type")."""

# Spellings people reach for, mapped to the value the schema uses (offered as "did you mean").
# Words people write for a choice: the first of a word's meanings that the key takes is suggested.
ALIASES: dict[str, tuple[str, ...]] = {
    "fp16": ("float16",),
    "half": ("float16",),
    "bf16": ("bfloat16",),
    "fp32": ("float32",),
    "float": ("float32",),
    "4bit": ("bnb-4bit",),
    "bnb4": ("bnb-4bit",),
    "8bit": ("bnb-8bit",),
    "bnb8": ("bnb-8bit",),
    "int8": ("bnb-8bit", "dynamic-int8"),
    "sdpa_attention": ("sdpa",),
    "flash_attention": ("flash_attention_2",),
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider",),
    "tensorrt": ("TensorrtExecutionProvider",),
    "rocm": ("MIGraphXExecutionProvider",),
    "amd": ("MIGraphXExecutionProvider",),
    "migraphx": ("MIGraphXExecutionProvider",),
}


def dotted(path: Path_) -> str:
    return ".".join(path)


MAX_SHOWN = 120
"""Characters of a value a message shows whole; a longer value (a pasted blob, a 100,000-digit number) shows its
first `SHOWN_START` characters and its length."""
SHOWN_START = 60


def show(value: Any) -> str:
    """A value as the YAML author wrote it: 'text', 3, true, nothing (null), a mapping, a list; long text and
    numbers longer than `MAX_SHOWN` cut to their start, with their length."""
    if isinstance(value, (dict, list, tuple)):
        return "a mapping" if isinstance(value, dict) else "a list"
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and len(value) > MAX_SHOWN:
        return f"{value[:SHOWN_START]!r}... ({len(value):,} characters)"
    if isinstance(value, int):
        try:
            digits = str(value)
        except ValueError:  # past Python's int_max_str_digits (4,300)
            return "an integer of more than 4,300 digits"
        return digits if len(digits) <= MAX_SHOWN else f"{digits[:SHOWN_START]}... ({len(digits):,} digits)"
    return repr(value)


def closest(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The choice `word` was probably meant to be: a known alias, else the nearest spelling, else the one choice
    that contains it or shares its start (`opset_version` ~ `opset`, for words of three or more characters)."""
    if not isinstance(word, str) or not word:
        return None
    for alias in ALIASES.get(word.lower(), ()):
        if alias in choices:
            return alias
    close = get_close_matches(word, list(choices), n=1)
    if close:
        return close[0]
    if len(word) < 3:
        return None
    related = [c for c in choices if word.lower() in c.lower() or c.startswith(word) or word.startswith(c)]
    return related[0] if len(related) == 1 else None


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """` (did you mean 'x'?)`, or "" when nothing is close."""
    found = closest(word, choices)
    return f" (did you mean {found!r}?)" if found else ""


def not_one_of(value: Any, choices: tuple[str, ...]) -> str:
    """`'nf5' is not one of nf4, fp4 (did you mean 'nf4'?)`; long lists show their first eight."""
    shown = ", ".join(choices) if len(choices) <= 8 else ", ".join(choices[:8]) + ", ..."
    if isinstance(value, str) and value in choices:  # a quoted number where the choices are numbers
        return f"{show(value)} is not one of {shown} (write it without quotes)"
    return f"{show(value)} is not one of {shown}{did_you_mean(value, choices)}"
