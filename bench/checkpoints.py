"""Synthetic checkpoints with real architectures' shapes: random bf16 weights, sharded safetensors, config.json.

The shapes are those of public models (their config.json values); the weights are random normal (std 0.02, norms
at 1), generated on the GPU when there is one, shard by shard, so an 8B checkpoint is written in well under a minute.

Usage: python bench/checkpoints.py SHAPE FOLDER [LAYERS]   (SHAPE: llama3-8b, llama3-70b, llama-1b, llama-0.3b, smollm2,
  llama-tiny)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHAPES = {
    # meta-llama/Meta-Llama-3-8B: 8.03 B parameters, 4 shards.
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # meta-llama/Llama-3.2-1B: 1.24 B parameters, tied embeddings.
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
        head_dim=64,
    ),
    # meta-llama/Meta-Llama-3-70B: 70.6 B parameters; benchmarked cut to a few decoder layers (`layers`).
    "llama3-70b": dict(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # A 0.3B Llama (SmolLM2-360M's widths on 24 layers, untied head): 0.36 B parameters, for CPU whole-build runs.
    "llama-0.3b": dict(
        vocab_size=49152,
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=24,
        num_attention_heads=15,
        num_key_value_heads=5,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct: 135 M parameters, tied embeddings.
    "smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # A Llama of toy widths (2 layers, hidden 64), for CPU smoke tests of the GPU benches' code paths.
    "llama-tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
SHARD_BYTES = 5 * 10**9  # like the Hub's Llama-3 checkpoints (~5 GB shards)


def generate(shape: str, folder: Path, device: str | None = None, layers: int | None = None) -> Path:
    """Write the checkpoint (with `layers` decoder layers instead of the shape's, when given) and a tokenizer into
    `folder` unless a complete one is there; returns `folder`."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    if (folder / ".complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dims = SHAPES[shape] | ({"num_hidden_layers": layers} if layers else {})
    config = LlamaConfig(**dims, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tied = set(model.all_tied_weights_keys or {})
    shapes = [(name, tuple(t.shape)) for name, t in model.state_dict().items() if name not in tied]
    shards, current, size = [], {}, 0
    for name, dims in shapes:
        nbytes = 2 * _numel(dims)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = dims
        size += nbytes
    shards.append(current)
    generator = torch.Generator(device).manual_seed(0)
    weight_map = {}
    for number, names in enumerate(shards, 1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {}
        for name, dims in names.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(dims, dtype=torch.bfloat16)
            else:
                values = torch.randn(dims, generator=generator, device=device, dtype=torch.float32) * 0.02
                tensors[name] = values.to(torch.bfloat16).cpu()
            weight_map[name] = filename
        save_file(tensors, folder / filename, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(2 * _numel(dims) for _, dims in shapes)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    config.save_pretrained(folder)
    _tokenizer(folder, config.vocab_size)
    (folder / ".complete").write_text(shape, encoding="utf-8")
    return folder


def _tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on the gate's evaluation text (offline, deterministic): the gate tokenizes its
    inputs with the source's tokenizer, and a synthetic checkpoint has none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (Path(__file__).resolve().parents[1] / "builder" / "data" / "eval_text.txt").read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(4096, vocab_size),
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(folder)


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for dim in dims:
        n *= dim
    return n


if __name__ == "__main__":
    print(generate(sys.argv[1], Path(sys.argv[2]), layers=int(sys.argv[3]) if len(sys.argv) > 3 else None))
