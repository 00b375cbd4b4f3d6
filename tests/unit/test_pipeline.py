"""`builder build` on the tiny random Llama: artifact layout, manifest, up-to-date/force, variants, determinism."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from builder.cli import main


def install_verify_gate(patch: pytest.MonkeyPatch) -> None:
    """builder.steps.verify belongs to another helper; only while it is absent from the tree, pass the gate with a
    report of the contract's shape so the pipeline around it can be tested."""
    if importlib.util.find_spec("builder.steps.verify") is not None:
        return
    module = types.ModuleType("builder.steps.verify")
    module.verify = lambda ctx: {"passed": True, "task": ctx.record["task"], "device": ctx.device, "provider": None,
                                 "metrics": {}, "thresholds": {}, "failures": [], "performance": {}}
    patch.setitem(sys.modules, "builder.steps.verify", module)


@pytest.fixture(autouse=True)
def verify_gate(monkeypatch):
    install_verify_gate(monkeypatch)


def write_recipe(folder: Path, model: Path, name: str = "tiny-nf4", quantize: str | None = None, extra: str = "") -> Path:
    quantize = quantize or "  method: bnb-4bit\n  quant_type: nf4\n  double_quant: true\n"
    recipe = folder / f"{name}.yaml"
    recipe.write_text(f"schema_version: 1\nname: {name}\nsource:\n  model: {model}\n  dtype: bfloat16\n"
                      f"quantize:\n{quantize}{extra}")
    return recipe


def build_json(capsys, *argv: str) -> list[dict]:
    assert main(["build", *argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory) -> dict:
    """One nf4 double-quant build of tiny_llama, shared by the read-only tests below."""
    folder = tmp_path_factory.mktemp("pipeline")
    recipe = write_recipe(folder, tiny_llama)
    out = folder / "artifacts"
    with pytest.MonkeyPatch.context() as patch:
        install_verify_gate(patch)
        assert main(["build", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    return {"recipe": recipe, "out": out, "artifact": out / "tiny-nf4"}


def test_artifact_holds_the_quantized_model_and_its_description(built):
    names = {p.name for p in built["artifact"].iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "manifest.json", "recipe.lock.yaml", "verify-report.json", "README.md"} <= names
    config = json.loads((built["artifact"] / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    # Only the artifact, its lock file and nothing temporary is left in the output folder.
    assert sorted(p.name for p in built["out"].iterdir()) == [".tiny-nf4.lock", "tiny-nf4"]


def test_manifest_follows_the_contract(built):
    manifest = json.loads((built["artifact"] / "manifest.json").read_text())
    assert manifest["manifest_version"] == 1 and manifest["kind"] == "quantize"
    assert len(manifest["build_hash"]) == 64
    assert manifest["source"]["revision"].startswith("sha256:")
    assert manifest["source"]["task"] == "text-generation"
    assert manifest["recipe"]["quantize"]["method"] == "bnb-4bit"
    assert {"torch", "transformers", "bitsandbytes", "accelerate", "huggingface_hub", "builder"} <= set(
        manifest["versions"])
    assert {"resolve", "load", "save", "quantize", "verify"} <= set(manifest["timings"])
    assert manifest["library_name"] == "transformers" and manifest["device"]
    assert manifest["verification"]["passed"] is True
    assert 0 < manifest["footprint"]["artifact_bytes"] < manifest["footprint"]["source_bytes"]
    # 2 layers x 7 Linear; the output head is tied to the embeddings and stays unquantized.
    assert manifest["quantized_layers"]["count"] == 14
    assert manifest["bits_per_param"] == manifest["quantized_layers"]["bits_per_param"]
    assert manifest["device_map"] == {"": "cpu"}


def test_manifest_hashes_every_other_file(built):
    manifest = json.loads((built["artifact"] / "manifest.json").read_text())
    on_disk = {p.relative_to(built["artifact"]).as_posix() for p in built["artifact"].rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    for name, entry in manifest["files"].items():
        data = (built["artifact"] / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, name


def test_lock_file_is_a_valid_recipe_of_the_same_source(built, capsys):
    lock = built["artifact"] / "recipe.lock.yaml"
    manifest = json.loads((built["artifact"] / "manifest.json").read_text())
    assert yaml.safe_load(lock.read_text())["quantize"] == manifest["recipe"]["quantize"]
    assert main(["plan", str(lock), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)[0]
    assert plan["source"]["revision"] == manifest["source"]["revision"]


def test_second_build_is_up_to_date_and_force_rebuilds_identically(built, capsys):
    before = json.loads((built["artifact"] / "manifest.json").read_text())
    [again] = build_json(capsys, str(built["recipe"]), "--out", str(built["out"]))
    assert again["status"] == "up to date"
    assert json.loads((built["artifact"] / "manifest.json").read_text())["built_at"] == before["built_at"]

    [forced] = build_json(capsys, str(built["recipe"]), "--out", str(built["out"]), "--force")
    assert forced["status"] == "built"
    after = json.loads((built["artifact"] / "manifest.json").read_text())
    assert after["build_hash"] == before["build_hash"]
    # Quantization on CPU is deterministic: the same recipe gives byte-identical weights.
    assert after["files"]["model.safetensors"] == before["files"]["model.safetensors"]
    assert sorted(p.name for p in built["out"].iterdir()) == [".tiny-nf4.lock", "tiny-nf4"]


def test_changed_recipe_replaces_the_stale_artifact(built, tiny_llama, tmp_path, capsys):
    out = tmp_path / "artifacts"
    first = write_recipe(tmp_path, tiny_llama, name="tiny")
    [one] = build_json(capsys, str(first), "--out", str(out))
    second = write_recipe(tmp_path, tiny_llama, name="tiny", quantize="  method: bnb-8bit\n")
    [two] = build_json(capsys, str(second), "--out", str(out))
    assert two["status"] == "built" and two["build_hash"] != one["build_hash"]
    config = json.loads((out / "tiny" / "config.json").read_text())
    assert config["quantization_config"]["load_in_8bit"] is True
    assert sorted(p.name for p in out.iterdir()) == [".tiny.lock", "tiny"]


def test_variants_build_each_artifact(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "matrix.yaml"
    recipe.write_text(f"schema_version: 1\nname: tiny\nsource:\n  model: {tiny_llama}\nquantize:\n"
                      "  method: bnb-4bit\nvariants:\n  nf4: {quantize: {quant_type: nf4}}\n"
                      "  fp4: {quantize: {quant_type: fp4}}\n")
    results = build_json(capsys, str(recipe), "--out", str(tmp_path / "out"))
    assert [r["name"] for r in results] == ["tiny-nf4", "tiny-fp4"]
    for name, quant_type in (("tiny-nf4", "nf4"), ("tiny-fp4", "fp4")):
        config = json.loads((tmp_path / "out" / name / "config.json").read_text())
        assert config["quantization_config"]["bnb_4bit_quant_type"] == quant_type


def test_dequantize_writes_a_plain_checkpoint_in_the_source_dtype(tiny_llama, tmp_path, capsys):
    from safetensors import safe_open

    recipe = write_recipe(tmp_path, tiny_llama, quantize="  method: bnb-4bit\n  dequantize: true\n")
    [result] = build_json(capsys, str(recipe), "--out", str(tmp_path / "out"))
    folder = Path(result["path"]) / "dequantized"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
        q_proj = weights.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert not any(k.endswith(".absmax") for k in keys)
    assert str(q_proj.dtype) == "torch.bfloat16" and tuple(q_proj.shape) == (64, 64)
    manifest = json.loads((Path(result["path"]) / "manifest.json").read_text())
    assert manifest["dequantized"] == {"path": "dequantized", "dtype": "bfloat16"}
    assert "dequantized/model.safetensors" in manifest["files"]


def test_explicit_skip_modules_replace_the_default_skip(tiny_llama, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_llama, name="tiny-int8",
                          quantize="  method: bnb-8bit\n  skip_modules: [lm_head, model.layers.1.mlp]\n")
    [result] = build_json(capsys, str(recipe), "--out", str(tmp_path / "out"))
    manifest = json.loads((Path(result["path"]) / "manifest.json").read_text())
    assert manifest["quantized_layers"]["count"] == 14 - 3  # the three projections of layer 1's MLP are kept
    config = json.loads((Path(result["path"]) / "config.json").read_text())
    assert config["quantization_config"]["llm_int8_skip_modules"] == ["lm_head", "model.layers.1.mlp"]
