"""The architecture families of the conformance matrix: tiny models built offline from transformers' own config
classes (a few layers of width 32-64), with deterministic weights (torch.manual_seed) and a real tokenizer.

Decoder LMs get SmolLM2's tokenizer (vocab 49152: the embeddings are most of their parameters, as in small real
models), encoders MiniLM's (vocab 30522). ViT gets a preprocessor config, Whisper a feature extractor; no tokenizer
reaches them, because the gate refuses their tasks before anything would need one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LM_VOCAB = 49152
ENCODER_VOCAB = 30522


@dataclass(frozen=True)
class Family:
    name: str
    """As the support table shows it."""
    config: str
    """The transformers config class."""
    model: str
    """The transformers model class saved (its name lands in config.json's `architectures`)."""
    kwargs: dict[str, Any]
    tokenizer: str | None
    """"lm" (SmolLM2's), "encoder" (MiniLM's) or None."""
    task: str | None = None
    """`source.task` of the recipes (None: inferred from `architectures`)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Files beside the model (name -> JSON)."""


_DECODER = {
    "vocab_size": LM_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}
_ENCODER = {
    "vocab_size": ENCODER_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}

FAMILIES: tuple[Family, ...] = (
    Family("Llama", "LlamaConfig", "LlamaForCausalLM", {**_DECODER, "num_key_value_heads": 2}, "lm"),
    Family(
        "Mistral",
        "MistralConfig",
        "MistralForCausalLM",
        {**_DECODER, "num_key_value_heads": 2, "tie_word_embeddings": False},
        "lm",
    ),
    Family(
        "Qwen2",
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {**_DECODER, "num_key_value_heads": 2, "tie_word_embeddings": True},
        "lm",
    ),
    Family(
        "Qwen3",
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {**_DECODER, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True},
        "lm",
    ),
    Family(
        "Gemma 2",
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**_DECODER, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 64},
        "lm",
    ),
    Family(
        "Phi-3",
        "Phi3Config",
        "Phi3ForCausalLM",
        {**_DECODER, "num_key_value_heads": 4, "pad_token_id": 0, "tie_word_embeddings": False},
        "lm",
    ),
    Family(
        "GPT-2",
        "GPT2Config",
        "GPT2LMHeadModel",
        {
            "vocab_size": LM_VOCAB,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 512,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        "lm",
    ),
    Family("GPT-NeoX", "GPTNeoXConfig", "GPTNeoXForCausalLM", {**_DECODER, "tie_word_embeddings": False}, "lm"),
    Family(
        "Falcon",
        "FalconConfig",
        "FalconForCausalLM",
        {
            "vocab_size": LM_VOCAB,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "new_decoder_architecture": True,
            "num_kv_heads": 2,
        },
        "lm",
    ),
    Family(
        "OPT",
        "OPTConfig",
        "OPTForCausalLM",
        {
            "vocab_size": LM_VOCAB,
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 64,
            "max_position_embeddings": 512,
        },
        "lm",
    ),
    Family(
        "Mixtral (MoE)",
        "MixtralConfig",
        "MixtralForCausalLM",
        {
            **_DECODER,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "tie_word_embeddings": False,
        },
        "lm",
    ),
    Family("BERT", "BertConfig", "BertModel", _ENCODER, "encoder", "feature-extraction"),
    Family(
        "RoBERTa", "RobertaConfig", "RobertaModel", {**_ENCODER, "pad_token_id": 0}, "encoder", "feature-extraction"
    ),
    Family(
        "DeBERTa-v2",
        "DebertaV2Config",
        "DebertaV2Model",
        {**_ENCODER, "pad_token_id": 0},
        "encoder",
        "feature-extraction",
    ),
    Family(
        "XLM-R", "XLMRobertaConfig", "XLMRobertaModel", {**_ENCODER, "pad_token_id": 0}, "encoder", "feature-extraction"
    ),
    Family(
        "T5",
        "T5Config",
        "T5ForConditionalGeneration",
        {
            "vocab_size": ENCODER_VOCAB,
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 128,
            "num_layers": 2,
            "num_heads": 4,
            "decoder_start_token_id": 0,
        },
        "encoder",
    ),
    Family(
        "ViT",
        "ViTConfig",
        "ViTForImageClassification",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "num_labels": 3,
        },
        None,
        "image-classification",
        {
            "preprocessor_config.json": {
                "do_normalize": True,
                "do_rescale": True,
                "do_resize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "image_processor_type": "ViTImageProcessor",
                "resample": 2,
                "rescale_factor": 1 / 255,
                "size": {"height": 32, "width": 32},
            }
        },
    ),
    Family(
        "Whisper",
        "WhisperConfig",
        "WhisperForConditionalGeneration",
        {
            "vocab_size": 1000,
            "d_model": 64,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128,
            "num_mel_bins": 80,
            "max_source_positions": 1500,
            "max_target_positions": 64,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "decoder_start_token_id": 1,
            "begin_suppress_tokens": None,
            "suppress_tokens": None,
        },
        None,
        "automatic-speech-recognition",
        {
            "preprocessor_config.json": {
                "feature_extractor_type": "WhisperFeatureExtractor",
                "feature_size": 80,
                "sampling_rate": 16000,
                "hop_length": 160,
                "chunk_length": 30,
                "n_fft": 400,
                "padding_value": 0.0,
                "return_attention_mask": False,
            }
        },
    ),
)
BY_NAME = {family.name: family for family in FAMILIES}


def slug(family: Family) -> str:
    return "".join(c if c.isalnum() else "-" for c in family.name.lower()).strip("-").replace("--", "-")


def make_family(family: Family, folder: Path, tokenizers: dict[str, Path]) -> Path:
    """Save the tiny `family` model (bfloat16 for decoders, float32 otherwise) and its tokenizer into `folder`."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, family.config)(**family.kwargs)
    model = getattr(transformers, family.model)(config)
    if family.tokenizer == "lm":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    if family.tokenizer is not None:
        transformers.AutoTokenizer.from_pretrained(tokenizers[family.tokenizer]).save_pretrained(folder)
    for name, content in family.extra.items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return folder
