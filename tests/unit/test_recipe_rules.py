"""Cross-field rules: each refused combination is a located error that says the fix, and the combinations next to
it that the rule must let through do pass. The publish-of-an-unpinned-Hub-source warning comes from `builder plan`,
checked against the loopback Hub registry.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from builder.errors import RecipeError
from builder.recipe import load_recipes

HEX = "0123456789abcdef0123456789abcdef01234567"
OFFLOAD = (
    "quantize.fp32_cpu_offload: fp32_cpu_offload needs `load.device_map` to put some modules on cpu and the "
    "rest on a GPU (with everything on one device it quantizes nothing or offloads nothing)"
)
TRUST = (
    "source.trust_remote_code: trust_remote_code needs `revision` pinned to a 40-hex commit so the code that "
    "runs is the code you reviewed"
)


def dynamic_int8_on(provider: str) -> str:
    return (
        f"export.quantize: dynamic-int8 graphs run on CPUExecutionProvider only, not {provider}; use "
        "`dtype: float16` for GPU providers or target CPUExecutionProvider"
    )


# (recipe body after `schema_version: 1\nname: x\n`, the one expected problem as `line:column: path: message`)
REFUSED = [
    (
        "source: {model: org/m}\nquantize: {method: bnb-4bit}\nexport: {format: onnx}\n",
        "5:9: export: bitsandbytes weights cannot be exported to ONNX; use `export.quantize: dynamic-int8` instead of "
        "`quantize`, or write two recipes",
    ),
    (
        "source: {model: org/m, dtype: float32}\nload: {attn_implementation: flash_attention_2}\n",
        "4:29: load.attn_implementation: flash_attention_2 runs in float16/bfloat16 only; set `source.dtype: bfloat16` "
        "or use sdpa",
    ),
    (
        "source: {model: org/m, dtype: float32}\nload: {attn_implementation: flash_attention_3}\n",
        "4:29: load.attn_implementation: flash_attention_3 runs in float16/bfloat16 only; set `source.dtype: bfloat16` "
        "or use sdpa",
    ),
    *[
        (
            f"source: {{model: org/m}}\n"
            f"export: {{format: onnx, provider: {p}, dtype: float16, quantize: dynamic-int8}}\n",
            f"4:{62 + len(p)}: {dynamic_int8_on(p)}",
        )
        for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "MIGraphXExecutionProvider")
    ],
    ("source: {model: org/m}\nquantize: {method: bnb-8bit, fp32_cpu_offload: true}\n", f"4:48: {OFFLOAD}"),
    (
        "source: {model: org/m}\nload: {device_map: cpu}\nquantize: {method: bnb-8bit, fp32_cpu_offload: true}\n",
        f"5:48: {OFFLOAD}",
    ),
    (
        "source: {model: org/m}\nload: {device_map: {model: 0, lm_head: disk}}\n"
        "quantize: {method: bnb-8bit, fp32_cpu_offload: true}\n",
        f"5:48: {OFFLOAD}",
    ),
    (
        "source: {model: org/m}\nload: {device_map: {model: 'cuda:0', lm_head: 'cuda:1'}}\n"
        "quantize: {method: bnb-8bit, fp32_cpu_offload: true}\n",
        f"5:48: {OFFLOAD}",
    ),
    ("source: {model: org/m, trust_remote_code: true}\n", f"3:43: {TRUST}"),
    ("source: {model: org/m, revision: main, trust_remote_code: true}\n", f"3:59: {TRUST}"),
    (f"source: {{model: org/m, revision: {HEX.upper()}, trust_remote_code: true}}\n", f"3:95: {TRUST}"),
    (f"source: {{model: org/m, revision: {HEX[:12]}, trust_remote_code: true}}\n", f"3:67: {TRUST}"),
]

ALLOWED = [
    "source: {model: org/m}\nquantize: {method: bnb-4bit}\n",
    "source: {model: org/m}\nexport: {format: onnx, quantize: dynamic-int8}\n",
    "source: {model: org/m, dtype: bfloat16}\nload: {attn_implementation: flash_attention_2}\n",
    "source: {model: org/m, dtype: float16}\nload: {attn_implementation: flash_attention_3}\n",
    "source: {model: org/m, dtype: float32}\nload: {attn_implementation: sdpa}\n",
    "source: {model: org/m}\nexport: {format: onnx, provider: CUDAExecutionProvider, dtype: float16}\n",
    "source: {model: org/m}\nexport: {format: onnx, provider: CPUExecutionProvider, quantize: dynamic-int8}\n",
    "source: {model: org/m}\nload: {device_map: {model: 0, lm_head: cpu}}\n"
    "quantize: {method: bnb-8bit, fp32_cpu_offload: true}\n",
    "source: {model: org/m}\nload: {device_map: {model.layers: 'cuda:1', lm_head: cpu}}\n"
    "quantize: {method: bnb-8bit, fp32_cpu_offload: true}\n",
    "source: {model: org/m}\nload: {device_map: auto}\nquantize: {method: bnb-8bit}\n",
    f"source: {{model: org/m, revision: {HEX}, trust_remote_code: true}}\n",
    "source: {model: ./local-model, trust_remote_code: true}\n",  # a local folder is pinned by its content digest
]


def write(tmp_path: Path, body: str, name: str = "r.yaml") -> Path:
    file = tmp_path / name
    if "quantize:" not in body and "export:" not in body:
        body += "quantize: {method: bnb-4bit}\n"  # a recipe must build something; the rules under test are elsewhere
    file.write_text("schema_version: 1\nname: x\n" + body)
    return file


@pytest.mark.parametrize(("body", "expected"), REFUSED)
def test_cross_field_rule_refuses_with_located_fix(body, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, body)
    with pytest.raises(RecipeError) as error:
        load_recipes("r.yaml")
    assert [str(p) for p in error.value.problems] == [f"r.yaml:{expected}"]


@pytest.mark.parametrize("body", ALLOWED)
def test_combination_next_to_a_rule_is_allowed(body, tmp_path):
    assert len(load_recipes(write(tmp_path, body))) == 1


def test_rule_sees_values_merged_from_a_parent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "_base.yaml").write_text("schema_version: 1\nsource:\n  model: org/m\n  dtype: float32\n")
    write(tmp_path, "extends: _base.yaml\nload:\n  attn_implementation: flash_attention_2\n")
    with pytest.raises(RecipeError) as error:
        load_recipes("r.yaml")
    # The offending value is the child's; the parent's dtype is the other half of the rule.
    assert [str(p) for p in error.value.problems] == [
        "r.yaml:5:24: load.attn_implementation: flash_attention_2 runs in float16/bfloat16 only; set "
        "`source.dtype: bfloat16` or use sdpa"
    ]


# --- plan warning: publishing a Hub source that is not pinned to a commit ----------------------------------------

TOKEN = "hf_rules_test_token"


def _tiny_model(folder: Path) -> Path:
    """config.json and a 16-parameter safetensors file, written without numpy or torch."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    header = json.dumps(
        {"model.layers.0.mlp.down_proj.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
    ).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    return folder


@pytest.fixture(scope="module")
def hub_with_model(tmp_path_factory):
    """The loopback registry holding org/tiny; yields (environment for subprocesses, the repo's commit sha)."""
    from builder.hub.server import start_in_thread

    root = tmp_path_factory.mktemp("rules-hub")
    server = start_in_thread(root / "hub", token=TOKEN)
    env = {
        **os.environ,
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(root / "hf-home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    upload = (
        "import sys\nfrom huggingface_hub import HfApi\napi = HfApi()\napi.create_repo('org/tiny')\n"
        "print(api.upload_folder(folder_path=sys.argv[1], repo_id='org/tiny').oid)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", upload, str(_tiny_model(root / "model"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    yield env, done.stdout.strip()
    server.shutdown()
    server.server_close()


def plan_warnings(env: dict, tmp_path: Path, body: str) -> list[str]:
    recipe = write(tmp_path, body)
    done = subprocess.run(
        [sys.executable, "-m", "builder", "plan", "--json", str(recipe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (plan,) = json.loads(done.stdout)
    # a core-only environment adds that it cannot build here; the warnings under test are the publish ones
    return [w for w in plan["warnings"] if "not installed here" not in w]


def test_plan_warns_when_publishing_an_unpinned_hub_source(hub_with_model, tmp_path):
    env, commit = hub_with_model
    warnings = plan_warnings(
        env, tmp_path, "source: {model: org/tiny}\nquantize: {method: bnb-4bit}\npublish: {repo: org/tiny-nf4}\n"
    )
    assert warnings == [
        "source.revision 'main' is not a 40-hex commit: the build records the commit it resolved, "
        "but `builder publish` will refuse until you pin it"
    ]
    branch = plan_warnings(
        env,
        tmp_path,
        "source: {model: org/tiny, revision: main}\nquantize: {method: bnb-4bit}\npublish: {repo: org/tiny-nf4}\n",
    )
    assert branch == warnings


def test_plan_does_not_warn_for_a_pinned_or_unpublished_hub_source(hub_with_model, tmp_path):
    env, commit = hub_with_model
    assert len(commit) == 40
    assert (
        plan_warnings(
            env,
            tmp_path,
            f"source: {{model: org/tiny, revision: {commit}}}\n"
            "quantize: {method: bnb-4bit}\npublish: {repo: org/tiny-nf4}\n",
        )
        == []
    )
    assert plan_warnings(env, tmp_path, "source: {model: org/tiny}\nquantize: {method: bnb-4bit}\n") == []


@pytest.mark.parametrize(
    ("export", "expected"),
    [
        (
            "provider: ROCMExecutionProvider",
            "6:13: export.provider: ROCMExecutionProvider is not in onnxruntime 1.32 and "
            "later; AMD GPUs run ONNX through MIGraphXExecutionProvider: set it instead",
        ),
        (
            "quantize: int4\n  provider: MIGraphXExecutionProvider",
            "6:13: export.quantize: int4 graphs use onnxruntime's "
            "MatMulNBits/MatMulBnb4 operators, which MIGraphXExecutionProvider does not run; target "
            "CPUExecutionProvider or "
            "CUDAExecutionProvider, or use `dtype: float16` without quantize",
        ),
        (
            "quantize: nf4\n  dtype: float16\n  provider: CUDAExecutionProvider",
            "6:13: export.quantize: nf4 quantizes a float32 graph; set `dtype: float32`",
        ),
        (
            "quantize: int4\n  block_size: 48",
            "7:15: export.block_size: 48 is not a power of two (16, 32, 64, 128, 256)",
        ),
        (
            "quantize: fp4\n  quant_algorithm: hqq",
            "7:20: export.quant_algorithm: quant_algorithm is for quantize: int4",
        ),
        ("block_size: 64", "6:15: export.block_size: block_size is for quantize: int4, int8, nf4 or fp4"),
        (
            "exporter: genai\n  provider: TensorrtExecutionProvider",
            "7:13: export.provider: the genai exporter builds for CPUExecutionProvider or CUDAExecutionProvider, "
            "not TensorrtExecutionProvider; use `exporter: torch` for other providers",
        ),
        (
            "exporter: genai\n  quantize: nf4",
            "7:13: export.quantize: the genai exporter quantizes to int4 or int8 (MatMulNBits), not nf4; use "
            "quantize: int4 or int8, or `exporter: torch`",
        ),
        (
            "exporter: genai\n  quantize: int4\n  quant_algorithm: hqq",
            "8:20: export.quant_algorithm: the genai exporter quantizes with rtn or k_quant, not hqq",
        ),
        (
            "exporter: genai\n  optimize: O2",
            "7:13: export.optimize: the genai exporter writes an already fused graph; remove `optimize` (or set none)",
        ),
        (
            "exporter: genai\n  dtype: float16",
            "7:10: export.dtype: the genai exporter makes float16 graphs for CUDAExecutionProvider only; use "
            "float32 or quantize: int4 on the CPU",
        ),
    ],
)
def test_onnx_quantization_and_provider_rules(export, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, f"source: {{model: org/m}}\nexport:\n  format: onnx\n  {export}\n")
    with pytest.raises(RecipeError) as error:
        load_recipes("r.yaml")
    assert [str(p) for p in error.value.problems] == [f"r.yaml:{expected}"]


@pytest.mark.parametrize(
    "export",
    [
        "exporter: genai\n  quantize: int8\n  block_size: 128",
        "exporter: genai\n  dtype: bfloat16\n  provider: CUDAExecutionProvider",
        "exporter: genai\n  quantize: int4\n  quant_algorithm: k_quant\n  accuracy_level: 1",
    ],
)
def test_genai_precisions_are_allowed(export, tmp_path):
    body = f"source: {{model: org/m}}\nexport:\n  format: onnx\n  {export}\n"
    assert load_recipes(write(tmp_path, body))[0].recipe.export.exporter == "genai"


def test_int4_on_cuda_with_its_options_is_allowed(tmp_path):
    body = (
        "source: {model: org/m}\nexport:\n  format: onnx\n  provider: CUDAExecutionProvider\n  quantize: int4\n"
        "  block_size: 64\n  quant_algorithm: k_quant\n  accuracy_level: 4\n"
    )
    assert load_recipes(write(tmp_path, body))[0].recipe.export.block_size == 64
