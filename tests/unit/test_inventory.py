import json
import struct
from pathlib import Path

import pytest

from builder.cli import main
from builder.inventory import artifact_states


def _fake_model(folder: Path) -> None:
    """config.json + a safetensors file holding one 4x4 float32 linear weight (header written by hand)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    header = json.dumps(
        {"model.layers.0.mlp.up_proj.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
    ).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("BUILDER_CACHE", str(tmp_path / "cache"))
    _fake_model(tmp_path / "m")
    (tmp_path / "recipes").mkdir()
    for name in ("a", "b"):
        (tmp_path / "recipes" / f"{name}.yaml").write_text(
            f"schema_version: 1\nname: {name}\nsource:\n  model: ../m\nquantize:\n  method: bnb-4bit\n"
        )
    (tmp_path / "artifacts").mkdir()
    return tmp_path


def manifest_json(name: str, build_hash: str, passed: bool, files: dict | None = None) -> dict:
    """A manifest as `builder build` writes it, reduced to what the inventory reads."""
    return {
        "manifest_version": 1,
        "name": name,
        "build_hash": build_hash,
        "kind": "quantize",
        "recipe": {},
        "recipe_files": [],
        "source": {"model": "../m", "revision": "sha256:" + "0" * 64, "task": None},
        "versions": {},
        "device": "cpu",
        "built_at": "2026-01-01T00:00:00+00:00",
        "timings": {},
        "footprint": None,
        "bits_per_param": None,
        "library_name": "transformers",
        "verification": {
            "passed": passed,
            "task": "text-generation",
            "device": "cpu",
            "metrics": {},
            "thresholds": {},
            "failures": [],
            "performance": {},
        },
        "files": files or {},
    }


def published_json(name: str, build_hash: str) -> dict:
    """`.published/<name>.json` as `builder publish` writes it."""
    return {
        "name": name,
        "repo": f"org/{name}",
        "revision": "main",
        "endpoint": "http://127.0.0.1:1",
        "commit": "c" * 40,
        "pr_url": None,
        "status": "published",
        "build_hash": build_hash,
        "published_at": "2026-01-01T00:00:00+00:00",
    }


def _write_manifest(project: Path, name: str, build_hash: str, passed: bool) -> None:
    folder = project / "artifacts" / name
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest_json(name, build_hash, passed)))


def test_states_follow_the_build_hash(project):
    states = {s.name: s for s in artifact_states([project / "recipes"], project / "artifacts")}
    assert states["a"].state == "missing" and states["b"].state == "missing"
    _write_manifest(project, "a", states["a"].build_hash, passed=True)
    _write_manifest(project, "b", "0" * 64, passed=True)
    states = {s.name: s for s in artifact_states([project / "recipes"], project / "artifacts")}
    assert states["a"].state == "verified"
    assert states["b"].state == "stale"


def test_list_json_and_published_record(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    [state] = [s for s in artifact_states(["recipes"], Path("artifacts")) if s.name == "a"]
    _write_manifest(project, "a", state.build_hash, passed=False)
    (project / "artifacts" / ".published").mkdir()
    (project / "artifacts" / ".published" / "a.json").write_text(json.dumps(published_json("a", state.build_hash)))
    assert main(["list", "recipes", "--json"]) == 0
    listed = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert listed["a"]["state"] == "built"
    assert listed["a"]["published"]["repo"] == "org/a"
    assert main(["list", "recipes"]) == 0
    table = capsys.readouterr().out
    assert "org/a@cccccccccccc" in table and "missing" in table


def test_invalid_recipe_is_listed_not_raised(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    (project / "recipes" / "c.yaml").write_text("schema_version: 1\nname: c\n")
    assert main(["list", "recipes", "--json"]) == 1
    listed = {row["recipe_file"]: row for row in json.loads(capsys.readouterr().out)}
    assert listed["recipes/c.yaml"]["state"] == "invalid"


def _stamp(project: Path, name: str) -> Path:
    assert main(["stamp", name, str(project / "recipes"), "--artifacts", str(project / "artifacts")]) == 0
    return project / "artifacts" / ".stamps" / f"{name}.hash"


def test_stamp_is_dated_like_the_manifest_only_when_the_artifact_is_up_to_date(project):
    import os

    [state] = artifact_states([project / "recipes"], project / "artifacts", names=["a"])
    stamp = _stamp(project, "a")
    assert stamp.read_text() == f"{state.build_hash}\n"
    folder = project / "artifacts" / "a"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"12345")
    manifest = folder / "manifest.json"
    files = {"model.safetensors": {"size": 5, "sha256": "x"}}
    manifest.write_text(json.dumps(manifest_json("a", state.build_hash, True, files)))
    os.utime(manifest, ns=(10**18, 10**18))  # older than any stamp written now
    assert _stamp(project, "a").stat().st_mtime_ns == 10**18  # make: up to date
    (folder / "model.safetensors").write_bytes(b"1234")  # changed after the build: builder would rebuild
    assert _stamp(project, "a").stat().st_mtime_ns > 10**18
    (folder / "model.safetensors").write_bytes(b"12345")
    manifest.write_text(manifest.read_text().replace(state.build_hash, "0" * 64))
    os.utime(manifest, ns=(10**18, 10**18))
    assert _stamp(project, "a").stat().st_mtime_ns > 10**18  # stale


def test_state_names_what_keeps_an_artifact_of_this_hash_from_being_up_to_date(project):
    [state] = artifact_states([project / "recipes"], project / "artifacts", names=["b"])
    folder = project / "artifacts" / "b"
    folder.mkdir()
    files = {"model.safetensors": {"sha256": "0" * 64, "size": 5}}
    (folder / "manifest.json").write_text(json.dumps(manifest_json("b", state.build_hash, True, files)))
    [state] = artifact_states([project / "recipes"], project / "artifacts", names=["b"])
    assert (state.state, state.detail) == ("built", "model.safetensors is missing or changed")


def test_a_core_install_does_not_call_an_artifact_built_with_the_extras_stale(project, monkeypatch):
    import builder.plan
    import builder.source
    from builder.plan import build_hash
    from builder.recipe import load_recipes

    [loaded] = load_recipes(project / "recipes" / "a.yaml")
    [state] = [s for s in artifact_states([project / "recipes"], project / "artifacts") if s.name == "a"]
    revision = "sha256:" + builder.source.folder_digest(project / "m")
    built_with = {
        "builder": builder.plan._version("builder"),
        "torch": "2.13.0",
        "transformers": "5.1.0",
        "accelerate": "1.12.0",
        "bitsandbytes": "0.50.2",
    }
    manifest = manifest_json("a", build_hash(loaded.recipe, revision, built_with), passed=True)
    manifest["versions"] = {**built_with, "numpy": "2.3.0"}  # recorded for information, not hashed
    (project / "artifacts" / "a").mkdir()
    (project / "artifacts" / "a" / "manifest.json").write_text(json.dumps(manifest))
    core_only = {"builder": built_with["builder"]}
    monkeypatch.setattr(builder.plan, "_version", lambda name: core_only.get(name, "not installed"))
    [state] = [s for s in artifact_states([project / "recipes"], project / "artifacts") if s.name == "a"]
    assert state.state == "verified"
    assert "accelerate, bitsandbytes, torch, transformers not installed here" in state.detail
    # Where the packages are installed, other versions than the build's do make it stale.
    monkeypatch.setattr(builder.plan, "_version", lambda name: {**built_with, "torch": "2.14.0"}.get(name, "x"))
    [state] = [s for s in artifact_states([project / "recipes"], project / "artifacts") if s.name == "a"]
    assert state.state == "stale"
    # And a changed recipe is stale under the core install too.
    monkeypatch.setattr(builder.plan, "_version", lambda name: core_only.get(name, "not installed"))
    (project / "recipes" / "a.yaml").write_text((project / "recipes" / "a.yaml").read_text() + "  quant_type: fp4\n")
    [state] = [s for s in artifact_states([project / "recipes"], project / "artifacts") if s.name == "a"]
    assert state.state == "stale"


def test_plan_warns_when_the_packages_a_build_needs_are_not_installed(project, monkeypatch):
    import builder.plan
    from builder.recipe import load_recipes

    monkeypatch.setattr(builder.plan, "_version", lambda name: "1.0" if name == "builder" else "not installed")
    [loaded] = load_recipes(project / "recipes" / "a.yaml")
    [warning] = [w for w in builder.plan.make_plan(loaded).warnings if "not installed" in w]
    assert warning.startswith("torch, transformers, bitsandbytes not installed here")
