"""Shared by the streaming-quantizer tests: build a recipe both ways and compare the artifacts tensor by tensor."""

from __future__ import annotations

from pathlib import Path

from builder.recipe import Recipe

METHODS = {
    "nf4-dq": {"method": "bnb-4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
    "nf4": {"method": "bnb-4bit", "quant_type": "nf4"},
    "fp4": {"method": "bnb-4bit", "quant_type": "fp4"},
    "int8": {"method": "bnb-8bit"},
}


def recipe_for(source: Path, method: str, **quantize) -> Recipe:
    return Recipe.model_validate(
        {
            "schema_version": 1,
            "name": f"stream-{method}",
            "source": {"model": str(source), "dtype": "auto"},
            "quantize": {**METHODS[method], **quantize},
        }
    )


def transformers_build(
    recipe: Recipe, source: Path, out: Path, device: str = "cpu", task: str = "text-generation"
) -> Path:
    """The hand-written transformers path: from_pretrained(quantization_config=...) then save_pretrained."""
    from builder.steps.bnb import bnb_config
    from builder.tasks import auto_class

    model = auto_class(task).from_pretrained(
        source, quantization_config=bnb_config(recipe.quantize), dtype=recipe.source.dtype, device_map={"": device}
    )
    model.save_pretrained(out)
    return out


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def differences(streamed: Path, reference: Path) -> list[str]:
    """Every way the streamed artifact's weights and configs differ from the reference's (empty: identical)."""
    ours, theirs = tensors(streamed), tensors(reference)
    problems = [f"only in streamed: {k}" for k in sorted(set(ours) - set(theirs))]
    problems += [f"only in reference: {k}" for k in sorted(set(theirs) - set(ours))]
    for key in sorted(set(ours) & set(theirs)):
        a, b = ours[key], theirs[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{key}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}")
        elif _bytes(a) != _bytes(b):
            problems.append(f"{key}: bytes differ")
    for name in ("config.json", "generation_config.json"):
        if (reference / name).is_file() and (streamed / name).read_bytes() != (reference / name).read_bytes():
            problems.append(f"{name} differs")
    return problems


def _bytes(tensor) -> bytes:
    import torch

    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
