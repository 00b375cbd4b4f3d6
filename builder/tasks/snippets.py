"""The card's usage snippets that the families pick from: code that runs a loaded model (`model` and `tokenizer`
from transformers, or `session`, `graph_inputs` and `tokenizer` for onnxruntime), and what in the artifact's folder
decides them (a chat template, a sentence-transformers pooling config). Every snippet runs as written
(tests/unit/test_card_snippets.py executes them against built folders)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

_SENTENCES = '["A man is eating food.", "A man is riding a horse."]'
_QUESTION = "What is the capital of France?"


# --- what the folder decides ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pooling:
    """How a sentence embedding is made from the last hidden state: sentence-transformers' Pooling module's mode
    and whether a Normalize module follows (mean pooling and normalization where the folder says nothing)."""

    mode: str = "mean"
    normalize: bool = True
    sentence_transformers: bool = False


def pooling(folder: Path | None) -> Pooling:
    """The pooling the folder's sentence-transformers config (modules.json, its Pooling module's config.json) says,
    the default `Pooling` when it has none."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8")) if folder else None
    except (OSError, ValueError):
        modules = None
    if not isinstance(modules, list):
        return Pooling()
    types = [str(module.get("type", "")) for module in modules if isinstance(module, dict)]
    pooling_dir = next(
        (m.get("path", "") for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")), None
    )
    mode = "mean"
    if pooling_dir is not None and folder is not None:
        try:
            config = json.loads((folder / pooling_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        if config.get("pooling_mode_cls_token"):
            mode = "cls"
        elif config.get("pooling_mode_max_tokens"):
            mode = "max"
    return Pooling(mode, any(t.endswith("Normalize") for t in types), sentence_transformers=True)


def has_chat_template(folder: Path | None) -> bool:
    """Whether the folder's tokenizer has a chat template (an instruct model, prompted as it was trained)."""
    if folder is None:
        return False
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


# --- decoders -------------------------------------------------------------------------------------------------------


def _prompt_ids(chat: bool, tensors: str) -> str:
    """Code that sets `inputs`: the chat-templated question for an instruct model, else a sentence to continue."""
    if chat:
        return (
            f'messages = [{{"role": "user", "content": "{_QUESTION}"}}]\n'
            "inputs = tokenizer.apply_chat_template(\n"
            f'    messages, add_generation_prompt=True, return_dict=True, return_tensors="{tensors}"\n)\n'
        )
    return f'inputs = tokenizer("The capital of France is", return_tensors="{tensors}")\n'


def transformers_generate(chat: bool) -> str:
    return (
        _prompt_ids(chat, "pt") + "inputs = inputs.to(model.device)\n"
        "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))\n'
    )


def ort_decoder_loop(chat: bool) -> str:
    """Greedy decoding with the graph of the torch exporter: optimum's decoder inputs (`input_ids`,
    `attention_mask`, `position_ids`, and with the KV cache `past_key_values.N.key/value`, their heads and head
    size fixed in the graph) and outputs (`logits`, `present.N.key/value`)."""
    return (
        _prompt_ids(chat, "np") + 'ids = [int(i) for i in inputs["input_ids"][0]]\n'
        "# The cache starts empty: batch 1, the graph's heads and head size, no positions yet.\n"
        "past = {\n"
        '    name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float16 if "float16" in i.type else np.float32)\n'
        "    for name, i in graph_inputs.items()\n"
        '    if name.startswith("past_key_values.")\n'
        "}\n"
        "output_names = [o.name for o in session.get_outputs()]\n"
        "fed, new, generated = 0, ids, []  # tokens already in the cache, tokens to feed, tokens generated\n"
        "while len(generated) < 32:\n"
        "    feed = {\n"
        '        "input_ids": np.array([new], np.int64),\n'
        '        "attention_mask": np.ones((1, fed + len(new)), np.int64),\n'
        '        "position_ids": np.arange(fed, fed + len(new), dtype=np.int64)[None],\n'
        "        **past,\n"
        "    }\n"
        "    outputs = session.run(None, {k: v for k, v in feed.items() if k in graph_inputs})\n"
        "    outputs = dict(zip(output_names, outputs))\n"
        '    token = int(outputs["logits"][0, -1].argmax())\n'
        "    if token == tokenizer.eos_token_id:\n"
        "        break\n"
        "    generated.append(token)\n"
        "    if past:  # the cache now holds every token fed so far: feed only the new one\n"
        '        past = {name: outputs[name.replace("past_key_values.", "present.")] for name in past}\n'
        "        fed, new = fed + len(new), [token]\n"
        "    else:  # no cache: feed the whole sequence again\n"
        "        new = new + [token]\n"
        "print(tokenizer.decode(generated, skip_special_tokens=True))\n"
    )


# --- encoders -------------------------------------------------------------------------------------------------------


def _pool(pooling: Pooling) -> str:
    """numpy code from `hidden` (batch, tokens, width) and `mask` (batch, tokens, 1) to `embeddings`."""
    pooled = {
        "mean": "embeddings = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)\n",
        "cls": "embeddings = hidden[:, 0]\n",
        "max": "embeddings = np.where(mask > 0, hidden, -np.inf).max(axis=1)\n",
    }[pooling.mode]
    normalized = "embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)\n" if pooling.normalize else ""
    return f"{pooled}{normalized}print(embeddings.shape, embeddings[0] @ embeddings[1])\n"


def transformers_embeddings(pooling: Pooling) -> str:
    return (
        f'inputs = tokenizer({_SENTENCES}, padding=True, truncation=True, return_tensors="pt").to(model.device)\n'
        "with torch.no_grad():\n"
        "    hidden = model(**inputs).last_hidden_state.float().cpu().numpy()\n"
        'mask = inputs["attention_mask"].cpu().numpy()[..., None].astype(hidden.dtype)\n' + _pool(pooling)
    )


def sentence_transformers(repo_id: str) -> str:
    return (
        "from sentence_transformers import SentenceTransformer\n\n"
        f'model_id = "{repo_id}"\n'
        "model = SentenceTransformer(model_id)\n"
        f"embeddings = model.encode({_SENTENCES})\n"
        "print(embeddings.shape, embeddings[0] @ embeddings[1])\n"
    )


def ort_embeddings(pooling: Pooling) -> str:
    return (
        f'inputs = tokenizer({_SENTENCES}, padding=True, truncation=True, return_tensors="np")\n'
        'hidden = session.run(["last_hidden_state"], {k: v for k, v in inputs.items() if k in graph_inputs})[0]\n'
        'mask = inputs["attention_mask"][..., None].astype(hidden.dtype)\n' + _pool(pooling)
    )


def ort_forward() -> str:
    return (
        f'inputs = tokenizer({_SENTENCES}, padding=True, truncation=True, return_tensors="np")\n'
        "outputs = session.run(None, {k: v for k, v in inputs.items() if k in graph_inputs})\n"
        "print(outputs[0].shape)\n"
    )


def transformers_forward() -> str:
    return (
        'inputs = tokenizer(["A man is eating food."], return_tensors="pt", padding=True).to(model.device)\n'
        "outputs = model(**inputs)\n"
    )
