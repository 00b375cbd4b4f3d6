"""Module names of a checkpoint, read from its tensor names without torch: transformers' `skip_modules` rule,
which Linear weights bitsandbytes would quantize, and the check of a recipe's `skip_modules` against them.

`plan` refuses a skip_modules entry that matches nothing; `validate` reports the same problem at its line.
"""

from __future__ import annotations

import re
from difflib import get_close_matches

from builder.checkpoint import TensorInfo
from builder.recipe import Bnb4Bit, Bnb8Bit, Recipe
from builder.recipe.wording import did_you_mean

EMBEDDING_NAMES = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|shared)")


def skip_module_matches(module: str, pattern: str) -> bool:
    """transformers' rule (quantizers_utils.should_convert_module): a prefix up to a module boundary, a regex
    with the same boundary, or a suffix of the module's full name."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    try:
        return bool(re.match(rf"(?:{pattern}){boundary}", module)) or module.endswith(pattern)
    except re.error:
        return module.endswith(pattern)


def module_names(tensors: tuple[TensorInfo, ...]) -> list[str]:
    """Every module path implied by the tensor names (`a.b.weight` -> `a`, `a.b`)."""
    names: set[str] = set()
    for tensor in tensors:
        parts = tensor.name.split(".")[:-1]
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(names)


def is_quantizable(tensor: TensorInfo, skip_modules: tuple[str, ...]) -> bool:
    """Estimate of what bnb replaces: 2-D `.weight`s of linear layers, not embeddings, lm_head or skipped modules."""
    if len(tensor.shape) != 2 or not tensor.name.endswith(".weight") or EMBEDDING_NAMES.search(tensor.name):
        return False
    module = tensor.name[: -len(".weight")]
    patterns = skip_modules or ("lm_head",)
    return not any(skip_module_matches(module, p) for p in patterns)


_EXPERT = re.compile(r"\.experts\.\d+\.")


def left_alone_by_bnb(tensor: TensorInfo, config: dict) -> bool:
    """A mixture-of-experts tensor that bitsandbytes leaves in the load dtype although it is a 2-D `.weight`:
    transformers 5 fuses the per-expert Linear weights of the checkpoint into 3-D parameters on load, and keeps
    the router (`gate`, one row per expert) unquantized."""
    experts = config.get("num_local_experts") or config.get("num_experts")
    if not experts:
        return False
    return bool(_EXPERT.search(tensor.name)) or (
        tensor.name.endswith(".gate.weight") and tensor.shape[:1] == (experts,)
    )


def tied_heads(config: dict) -> list[str]:
    """An output head tied to the input embeddings is a module of the model but has no tensor in the checkpoint."""
    heads = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM")
    tied = config.get("tie_word_embeddings", True) is not False
    return ["lm_head"] if tied and any(a.endswith(heads) for a in config.get("architectures") or ()) else []


def unmatched_skip_modules(recipe: Recipe, tensors: tuple[TensorInfo, ...], config: dict) -> list[tuple[int, str]]:
    """(index, message) for each `quantize.skip_modules` entry that matches no module of the checkpoint; the
    message names the nearest quantizable Linear modules."""
    quantize = recipe.quantize
    if not isinstance(quantize, (Bnb4Bit, Bnb8Bit)) or not tensors:
        return []
    modules = module_names(tensors) + tied_heads(config)
    linears = [t.name.removesuffix(".weight") for t in tensors if is_quantizable(t, ("lm_head",))]
    # A Linear can be named by any dotted suffix of its path (`mlp.down_proj`), as skip_modules matches them.
    # Suffixes starting at a layer index (`0.mlp.down_proj`) name one layer's copy: not offered.
    suffixes = sorted(
        {
            ".".join(parts[i:])
            for parts in (name.split(".") for name in linears)
            for i in range(len(parts))
            if not parts[i].isdigit()
        }
    )
    found = []
    for index, pattern in enumerate(quantize.skip_modules):
        if any(skip_module_matches(m, pattern) for m in modules):
            continue
        nearest = (
            get_close_matches(pattern, suffixes, n=3, cutoff=0.5) or sorted({n.split(".")[-1] for n in linears})[:5]
        )
        listed = (
            f"the nearest quantizable Linear modules are {', '.join(nearest)}"
            if nearest
            else "the checkpoint has no quantizable Linear module"
        )
        found.append(
            (
                index,
                f"{pattern!r} matches no module of {recipe.source.model}: {listed}{did_you_mean(pattern, suffixes)}",
            )
        )
    return found
