"""`builder build` on the tiny random Llama: artifact layout, manifest, up-to-date/force, variants, determinism."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from builder.checkpoint import local_weight_files, read_header
from builder.cli import main
from builder.plan import make_plan
from builder.recipe import load_recipes

# The tiny model is mostly its 49152x64 embedding table, which stays unquantized: its footprint barely shrinks.
TINY_VERIFY = "verify:\n  thresholds: {footprint_ratio: 1.0}\n"


def write_recipe(
    folder: Path,
    model: Path,
    name: str = "tiny-nf4",
    quantize: str | None = None,
    extra: str = "",
    verify: str = TINY_VERIFY,
) -> Path:
    quantize = quantize or "  method: bnb-4bit\n  quant_type: nf4\n  double_quant: true\n"
    recipe = folder / f"{name}.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: {name}\nsource:\n  model: {model}\n  dtype: bfloat16\n"
        f"quantize:\n{quantize}{extra}{verify}"
    )
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
    assert main(["build", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    return {"recipe": recipe, "out": out, "artifact": out / "tiny-nf4"}


def test_artifact_holds_the_quantized_model_and_its_description(built):
    names = {p.name for p in built["artifact"].iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "manifest.json",
        "recipe.lock.yaml",
        "verify-report.json",
        "README.md",
    } <= names
    config = json.loads((built["artifact"] / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    # Only the artifact is left in the output folder: no lock file, nothing temporary.
    assert sorted(p.name for p in built["out"].iterdir()) == ["tiny-nf4"]


def test_manifest_follows_the_contract(built, tiny_llama):
    manifest = json.loads((built["artifact"] / "manifest.json").read_text())
    assert manifest["manifest_version"] == 3 and manifest["kind"] == "quantize"
    assert len(manifest["build_hash"]) == 64
    assert manifest["source"]["revision"].startswith("sha256:")
    assert manifest["source"]["task"] == "text-generation"
    assert manifest["recipe"]["quantize"]["method"] == "bnb-4bit"
    assert {"torch", "transformers", "bitsandbytes", "accelerate", "huggingface_hub", "builder"} <= set(
        manifest["versions"]
    )
    assert {"resolve", "stream", "quantize", "verify"} <= set(manifest["timings"])
    assert manifest["quantize_path"] == "stream"  # a plain bnb recipe streams; see test_stream_step for fallbacks
    assert manifest["library_name"] == "transformers" and manifest["device"] and manifest["device_uuid"] is None
    assert manifest["verification"]["passed"] is True and manifest["verification"]["report_version"] == 3
    assert json.loads((built["artifact"] / "verify-report.json").read_text()) == manifest["verification"]
    verification = manifest["verification"]  # each LM gate's metric within its interval, which is set clear or not
    gated = {"top1_agreement", "kl_divergence_mean", "perplexity_ratio"}
    assert set(verification["intervals"]) == set(verification["interval_verdicts"]) == gated
    for metric, (low, high) in verification["intervals"].items():
        assert low <= verification["metrics"][metric] <= high, metric
    assert 0 < manifest["footprint"]["artifact_bytes"] < manifest["footprint"]["source_bytes"]
    # 2 layers x 7 Linear; the output head is tied to the embeddings and stays unquantized.
    assert manifest["quantized_layers"]["count"] == 14
    # The bits per parameter reached count every weight file (the bf16 embeddings too), as the gate's figure does;
    # the quantized layers' own figure is apart. The share quantized is what bitsandbytes converted (bf16 weights).
    layers, source = manifest["quantized_layers"], [t for f in local_weight_files(tiny_llama) for t in read_header(f)]
    weight_bytes = sum(p.stat().st_size for p in built["artifact"].glob("*.safetensors"))
    assert manifest["bits_per_param"] == round(8 * weight_bytes / sum(t.numel for t in source), 4)
    assert manifest["bits_per_param"] == pytest.approx(manifest["verification"]["metrics"]["bits_per_param"], 1e-3)
    assert layers["bits_per_param"] < manifest["bits_per_param"]
    assert manifest["weight_share"] == {
        "quantized": round(layers["parameters"] * 2 / sum(t.nbytes for t in source), 4),
        "unquantized_experts": 0.0,
        "kept_dtype": None,
    }
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

    # What killed builds leave behind: this recipe's are removed by its next build, another recipe's stay.
    for leftover in (".tmp-tiny-nf4-k1ll3d_x", ".old-tiny-nf4-abcdefgh", ".tmp-tiny-nf4-int8-abcdefgh"):
        (built["out"] / leftover).mkdir()
    [forced] = build_json(capsys, str(built["recipe"]), "--out", str(built["out"]), "--force")
    assert forced["status"] == "built"
    after = json.loads((built["artifact"] / "manifest.json").read_text())
    assert after["build_hash"] == before["build_hash"]
    # Quantization on CPU is deterministic: the same recipe gives byte-identical weights.
    assert after["files"]["model.safetensors"] == before["files"]["model.safetensors"]
    assert sorted(p.name for p in built["out"].iterdir()) == [
        ".tmp-tiny-nf4-int8-abcdefgh",
        "tiny-nf4",
    ]
    shutil.rmtree(built["out"] / ".tmp-tiny-nf4-int8-abcdefgh")


def test_variants_build_each_artifact_and_replace_a_stale_one(built, tiny_llama, tmp_path, capsys):
    """One file, two variants (a method switch, dequantize, explicit skip_modules); `tiny-nf4` already exists in
    the output folder from another recipe, so it is stale and replaced."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(built["artifact"], out / "tiny-nf4")
    stale = json.loads((out / "tiny-nf4" / "manifest.json").read_text())
    recipe = tmp_path / "matrix.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: tiny\nsource:\n  model: {tiny_llama}\n  dtype: bfloat16\n"
        f"quantize:\n  method: bnb-4bit\n{TINY_VERIFY}variants:\n"
        "  nf4: {quantize: {dequantize: true}}\n"
        "  int8: {quantize: {method: bnb-8bit, skip_modules: [lm_head, model.layers.1.mlp]}}\n"
    )
    results = build_json(capsys, str(recipe), "--out", str(out))
    assert [(r["name"], r["status"]) for r in results] == [("tiny-nf4", "built"), ("tiny-int8", "built")]
    assert results[0]["build_hash"] != stale["build_hash"]
    assert sorted(p.name for p in out.iterdir()) == ["tiny-int8", "tiny-nf4"]

    # Dequantize: a plain checkpoint in the source dtype under dequantized/.
    from safetensors import safe_open

    nf4 = out / "tiny-nf4"
    assert json.loads((nf4 / "config.json").read_text())["quantization_config"]["bnb_4bit_use_double_quant"] is False
    assert "quantization_config" not in json.loads((nf4 / "dequantized" / "config.json").read_text())
    with safe_open(str(nf4 / "dequantized" / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
        q_proj = weights.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert not any(k.endswith(".absmax") for k in keys)
    assert str(q_proj.dtype) == "torch.bfloat16" and tuple(q_proj.shape) == (64, 64)
    manifest = json.loads((nf4 / "manifest.json").read_text())
    assert manifest["dequantized"] == {"path": "dequantized", "dtype": "bfloat16"}
    assert "dequantized/model.safetensors" in manifest["files"]

    # Explicit skip_modules replace transformers' default skip list: lm_head is named, and layer 1's MLP is kept.
    int8 = json.loads((out / "tiny-int8" / "manifest.json").read_text())
    assert int8["quantized_layers"]["count"] == 14 - 3
    config = json.loads((out / "tiny-int8" / "config.json").read_text())["quantization_config"]
    assert config["load_in_8bit"] is True
    assert config["llm_int8_skip_modules"] == ["lm_head", "model.layers.1.mlp"]


def test_failed_verification_installs_nothing_unless_keep_failed(tiny_llama, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_llama, verify="verify:\n  thresholds: {footprint_ratio: 0.5}\n")
    out = tmp_path / "out"
    assert main(["build", str(recipe), "--out", str(out), "--keep-failed"]) == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "footprint_ratio" in err
    assert not (out / "tiny-nf4").exists()
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())
    kept = out / ".failed" / "tiny-nf4"
    report = json.loads((kept / "verify-report.json").read_text())
    assert report["passed"] is False and report["failures"][0]["metric"] == "footprint_ratio"
    assert (kept / "model.safetensors").is_file()


def test_concurrent_build_waits_for_the_lock(built, capsys):
    """A second (forced) build of a recipe waits while the first holds artifacts/.<name>.lock, then builds.
    (An up-to-date artifact is answered before the lock: installs are atomic renames, so reading it is safe.)"""
    import fcntl

    from builder.pipeline import build

    plan = make_plan(load_recipes(built["recipe"])[0])
    results = []
    with open(built["out"] / ".tiny-nf4.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the "first build"
        worker = threading.Thread(target=lambda: results.append(build(plan, out=built["out"], force=True)))
        worker.start()
        deadline = time.monotonic() + 60
        while "tiny-nf4: waiting for another build of it to finish" not in capsys.readouterr().err:
            assert time.monotonic() < deadline, "the second build did not say that it waits"
            time.sleep(0.05)
        time.sleep(0.5)
        assert worker.is_alive() and not results
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(600)
    assert results and results[0].status == "built"


def test_a_new_publish_block_refreshes_the_card_without_a_rebuild(built, tmp_path, capsys):
    """`publish` is not part of the build hash; an up-to-date artifact takes the recipe's new block (card and
    manifest), and `builder publish` accepts the refreshed files."""
    out = tmp_path / "out"
    shutil.copytree(built["artifact"], out / "tiny-nf4")
    before = json.loads((out / "tiny-nf4" / "manifest.json").read_text())
    recipe = tmp_path / "tiny-nf4.yaml"
    recipe.write_text(built["recipe"].read_text() + "publish:\n  repo: team/tiny-nf4\n  license: apache-2.0\n")
    [again] = build_json(capsys, str(recipe), "--out", str(out))
    assert again["status"] == "up to date" and again["build_hash"] == before["build_hash"]
    after = json.loads((out / "tiny-nf4" / "manifest.json").read_text())
    assert after["built_at"] == before["built_at"]
    assert after["files"]["model.safetensors"] == before["files"]["model.safetensors"]
    assert after["recipe"]["publish"]["repo"] == "team/tiny-nf4"
    card = (out / "tiny-nf4" / "README.md").read_text()
    assert "license: apache-2.0" in card and 'model_id = "team/tiny-nf4"' in card
    assert "team/tiny-nf4" in (out / "tiny-nf4" / "recipe.lock.yaml").read_text()
    assert main(["publish", str(out / "tiny-nf4"), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["repo"] == "team/tiny-nf4"
    on_disk = {p.relative_to(out / "tiny-nf4").as_posix() for p in (out / "tiny-nf4").rglob("*") if p.is_file()}
    assert on_disk == {*before["files"], "manifest.json"}


def test_a_publish_refresh_does_not_turn_a_symlink_into_a_file_of_the_artifact(built, tmp_path, capsys):
    """The refresh copies the folder; it hard-linked a symlink's target in as a regular file, which `verify --write`
    would then list and publish upload (issue 26). Now the build refuses, naming the link."""
    out = tmp_path / "out"
    shutil.copytree(built["artifact"], out / "tiny-nf4")
    secret = tmp_path / "token"
    secret.write_bytes(b"hf_the_users_own_token\n")
    (out / "tiny-nf4" / "token").symlink_to(secret)
    recipe = tmp_path / "tiny-nf4.yaml"
    recipe.write_text(built["recipe"].read_text() + "publish:\n  repo: team/tiny-nf4\n")
    assert main(["build", str(recipe), "--out", str(out)]) == 1
    assert "token: token is a symlink" in capsys.readouterr().err
    assert (out / "tiny-nf4" / "token").is_symlink()
    copies = [p for p in out.rglob("*") if p.is_file() and not p.is_symlink() and p.read_bytes() == secret.read_bytes()]
    assert copies == []


def test_the_gates_results_are_eval_results_files_the_manifest_lists(built):
    """huggingface_hub's `.eval_results` format, read back by its own parser: one entry per gated metric, the value
    verify-report.json recorded, on the evaluation data at the sha256 the gate recorded."""
    from huggingface_hub import parse_eval_result_entries

    artifact = built["artifact"]
    report = json.loads((artifact / "verify-report.json").read_text())
    path = ".eval_results/builder-gate.yaml"
    data = (artifact / path).read_bytes()
    found = {e.task_id: e for e in parse_eval_result_entries(yaml.safe_load(data))}
    assert set(found) == {"top1_agreement", "kl_divergence_mean", "perplexity_ratio", "footprint_ratio"}
    for metric, entry in found.items():
        assert entry.value == report["metrics"][metric]
        assert entry.dataset_id == "builder/eval_text"
        assert entry.dataset_revision == report["inputs"]["eval_text_sha256"]
        assert entry.notes.startswith("task text-generation; compared with the source model, a local copy")
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["files"][path] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    card = (artifact / "README.md").read_text()
    assert "model-index:" in card and "type: top1_agreement" in card  # the legacy format stays in the card


def test_builder_publish_uploads_the_eval_results(built, tmp_path):
    """`--dry-run` lists the file; the publish puts it in the loopback registry, which serves it byte for byte."""
    from test_hub_publish import TOKEN, hf_api, run_publish

    from builder.hub.server import start_in_thread

    path = ".eval_results/builder-gate.yaml"
    server = start_in_thread(tmp_path / "hub", token=TOKEN)
    try:
        dry = run_publish(built["artifact"], server.url, "--repo", "demo/tiny-nf4", "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        assert path in json.loads(dry.stdout)["uploaded"]
        result = run_publish(built["artifact"], server.url, "--repo", "demo/tiny-nf4")
        assert result.returncode == 0, result.stderr
        api = hf_api(server)
        assert path in {f.path for f in api.list_repo_tree("demo/tiny-nf4", recursive=True)}
        assert [f.path for f in api.list_repo_tree("demo/tiny-nf4", path_in_repo=".eval_results")] == [path]
        served = Path(api.snapshot_download("demo/tiny-nf4", cache_dir=tmp_path / "cache"))
        assert (served / path).read_bytes() == (built["artifact"] / path).read_bytes()
    finally:
        server.shutdown()
        server.server_close()
