"""`builder build --jobs N` on a host with several GPUs: each build runs on a GPU of its own.

Self-contained (no models/): a random tiny Llama with a small BPE tokenizer trained on the evaluation text. Skipped
without two CUDA GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.cli import main

pytestmark = pytest.mark.gpu

# Random weights: the gate is opened wide; the point is where each build ran.
RECIPE = """schema_version: 1
name: {name}
source: {{model: ../tiny, task: text-generation, dtype: bfloat16}}
quantize: {{{quantize}}}
verify:
  max_new_tokens: 4
  thresholds: {{top1_agreement: 0.0, kl_divergence: 100.0, perplexity_ratio: 100.0, footprint_ratio: 10.0}}
"""


def _tiny_llama(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from builder.evaluation import eval_text

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        [eval_text()],
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def test_jobs_put_each_build_on_a_gpu_of_its_own(tmp_path, capsys):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    _tiny_llama(tmp_path / "tiny")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for name, quantize in (("tiny-nf4", "method: bnb-4bit, quant_type: nf4"), ("tiny-int8", "method: bnb-8bit")):
        (recipes / f"{name}.yaml").write_text(RECIPE.format(name=name, quantize=quantize))
    out = tmp_path / "artifacts"
    code = main(["build", str(recipes), "--jobs", "2", "--out", str(out), "--json"])
    assert code == 0, capsys.readouterr().err[-3000:]
    rows = json.loads(capsys.readouterr().out)
    assert sorted((r["name"], r["status"]) for r in rows) == [("tiny-int8", "built"), ("tiny-nf4", "built")]
    used = [json.loads((out / r["name"] / "manifest.json").read_text())["device_uuid"] for r in rows]
    present = {f"GPU-{torch.cuda.get_device_properties(i).uuid}" for i in range(torch.cuda.device_count())}
    print(f"builds ran on {used} of {sorted(present)}")
    assert set(used) <= present and len(set(used)) == 2, used
