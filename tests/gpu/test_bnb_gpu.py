"""bitsandbytes builds on a CUDA GPU: the CPU integration recipes, built with --device cuda, reloaded on the GPU in a
fresh process with plain transformers; plus LLM.int8() with fp32 CPU offload, which needs a GPU.

Skipped without CUDA (`make test-gpu` on a GPU host).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from builder.cli import main
from builder.pipeline import build
from builder.plan import make_plan
from builder.recipe import load_recipes

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
RECIPES = {
    "smollm2-nf4-dq": ("recipes/smollm2/nf4.yaml", None, 4.127),
    "smollm2-fp4": ("recipes/smollm2/4bit-matrix.yaml", "fp4", 4.5),
    "smollm2-int8": ("recipes/smollm2/int8.yaml", None, 8.04),
    "minilm-nf4": ("recipes/minilm/nf4.yaml", None, 4.5),
    "minilm-int8": ("recipes/minilm/int8.yaml", None, 8.06),
}


@pytest.fixture(scope="session")
def gpu_artifacts(smollm2, minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("bnb-gpu")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            file, variant, _ = RECIPES[name]
            [loaded] = [r for r in load_recipes(REPO / file) if r.variant == variant]
            built[name] = build(make_plan(loaded), out=out, device="cuda").path
        return built[name]

    return get


RELOAD = """
import json, sys
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
path, task = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(path)
if task == "text-generation":
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")
    inputs = tokenizer("The capital of France is", return_tensors="pt").to("cuda")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    result = tokenizer.decode(out[0, inputs.input_ids.shape[1]:])
else:
    model = AutoModel.from_pretrained(path, device_map="cuda")
    batch = tokenizer(["A man is eating food.", "A man is eating bread.", "The new movie is awesome."],
                      padding=True, return_tensors="pt").to("cuda")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    result = [float(emb[0] @ emb[1]), float(emb[0] @ emb[2])]
print(json.dumps({"result": result, "device": str(next(model.parameters()).device),
                  "builder_imported": any(m == "builder" or m.startswith("builder.") for m in sys.modules)}))
"""


@pytest.mark.parametrize("name", list(RECIPES))
def test_gpu_build_reloads_on_the_gpu(gpu_artifacts, name):
    folder = gpu_artifacts(name)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["device_map"] == {"": "cuda"}
    assert manifest["device"] and "cpu" not in manifest["device"].lower()
    assert manifest["quantized_layers"]["bits_per_param"] == pytest.approx(RECIPES[name][2], abs=0.03)
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, str(folder), manifest["source"]["task"]],
        capture_output=True,
        text=True,
        timeout=600,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["device"].startswith("cuda") and not result["builder_imported"]
    if name.startswith("smollm2"):
        assert "Paris" in result["result"], result
    else:
        similar, unrelated = result["result"]
        assert similar > unrelated + 0.2, result


def test_gpu_and_cpu_4bit_artifacts_have_the_same_layout(gpu_artifacts, tmp_path, capsys):
    """The serialized format does not depend on where the weights were quantized."""
    folder = gpu_artifacts("minilm-nf4")
    assert main(["build", str(REPO / "recipes/minilm/nf4.yaml"), "--out", str(tmp_path), "--device", "cpu"]) == 0
    with (
        safe_open(str(folder / "model.safetensors"), "pt") as gpu,
        safe_open(str(tmp_path / "all-minilm-l6-v2-nf4" / "model.safetensors"), "pt") as cpu,
    ):
        assert set(gpu.keys()) == set(cpu.keys())


def test_int8_fp32_cpu_offload_leaves_offloaded_layers_unquantized(smollm2, tmp_path, capsys):
    layers = "\n".join(f"    model.layers.{i}: {'cpu' if i >= 28 else repr('0')}" for i in range(30))
    recipe = tmp_path / "offload.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: smollm2-int8-offload\nsource:\n  model: {smollm2}\n"
        "  dtype: float16\nload:\n  device_map:\n    model.embed_tokens: '0'\n    model.rotary_emb: '0'\n"
        f"    model.norm: '0'\n    lm_head: '0'\n{layers}\n"
        "quantize:\n  method: bnb-8bit\n  fp32_cpu_offload: true\n"
    )
    assert main(["build", str(recipe), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "smollm2-int8-offload" / "manifest.json").read_text())
    assert manifest["quantized_layers"]["count"] == 28 * 7
    with safe_open(str(tmp_path / "out" / "smollm2-int8-offload" / "model.safetensors"), "pt") as weights:
        assert str(weights.get_tensor("model.layers.0.mlp.down_proj.weight").dtype) == "torch.int8"
        assert "model.layers.29.mlp.down_proj.SCB" not in set(weights.keys())
