"""Issue 26: nothing outside an artifact folder is hashed, published, called verified or written.

An artifact's file table holds regular files strictly inside its folder (no symlink to a file or a folder, no
absolute path, no `..` part) and its `name` is a recipe name; build, `builder verify --write`, publish and list all
check it through `builder.artifact`, and a violation is exit 1 naming the entry. Publishing runs in this process
(`builder.cli.main`) against the loopback registry of test_hub_publish.py, so each case also shows that nothing
reached the repo.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_hub_publish import REPO, TOKEN, hub, make_artifact, run_publish  # noqa: F401 - hub is a fixture
from test_inventory import manifest_json, project, published_json  # noqa: F401 - project is a fixture

from builder.artifact import file_table, up_to_date
from builder.cli import main
from builder.errors import ArtifactError

SECRET = b"hf_the_users_own_token_0123456789\n"


@pytest.fixture
def hub_here(hub, monkeypatch):  # noqa: F811 - the imported fixture, used here
    """The loopback registry, as huggingface_hub in this process sees it (it reads HF_ENDPOINT at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub


def _repo_created(hub) -> bool:  # noqa: F811
    return (Path(hub.store.root) / "repos" / "models" / REPO).exists()


def _list_in_manifest(artifact: Path, entry: str, data: bytes, **changes) -> None:
    """Add `entry` to the manifest's file table as `verify --write` used to: the sha256 and size of what it read."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"][entry] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest.update(changes)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside the artifact, standing for ~/.cache/huggingface/token."""
    (tmp_path / "home" / "hf").mkdir(parents=True)
    path = tmp_path / "home" / "hf" / "token"
    path.write_bytes(SECRET)
    return path


@pytest.mark.parametrize("linked", ["file", "folder"])
def test_publish_refuses_a_symlink_in_the_file_table_and_uploads_nothing(hub_here, tmp_path, secret, linked, capsys):
    artifact = make_artifact(tmp_path / "artifacts" / "tiny-nf4")
    if linked == "file":
        (artifact / "token.txt").symlink_to(secret)
        entry, link = "token.txt", "token.txt"
    else:
        (artifact / "extra").symlink_to(secret.parent, target_is_directory=True)
        entry, link = "extra/token", "extra"
    _list_in_manifest(artifact, entry, SECRET)
    assert main(["publish", str(artifact)]) == 1
    error = capsys.readouterr().err
    assert f"{artifact / entry}: {link} is a symlink (to {secret if linked == 'file' else secret.parent})" in error
    assert "remove the link and rebuild the artifact" in error
    assert not _repo_created(hub_here)


def test_publish_refuses_an_unlisted_symlink_too(hub_here, tmp_path, secret, capsys):
    artifact = make_artifact(tmp_path / "artifacts" / "tiny-nf4")
    (artifact / "token.txt").symlink_to(secret)
    assert main(["publish", str(artifact)]) == 1
    assert "token.txt is a symlink" in capsys.readouterr().err
    assert not _repo_created(hub_here)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [("ABSOLUTE", "is not a relative POSIX path"), ("../../x", "has an empty, '.' or '..' part")],
    ids=["absolute", "dot-dot"],
)
def test_publish_refuses_a_file_table_entry_outside_the_folder(hub_here, tmp_path, secret, entry, problem, capsys):
    """An absolute entry was committed (huggingface_hub strips the leading '/') before publish exited 1; a `..`
    entry exited 3."""
    artifact = make_artifact(tmp_path / "artifacts" / "tiny-nf4")
    (tmp_path / "x").write_bytes(SECRET)
    entry = str(secret) if entry == "ABSOLUTE" else entry
    _list_in_manifest(artifact, entry, SECRET)
    assert main(["publish", str(artifact)]) == 1
    error = capsys.readouterr().err
    assert f"{artifact / 'manifest.json'} is not a builder manifest (files: Value error, entry {entry!r} {problem}" in (
        error
    )
    assert not _repo_created(hub_here)


@pytest.mark.parametrize("name", ["../../../victim/config", "ABSOLUTE"])
def test_publish_refuses_a_manifest_name_that_is_not_an_artifact_name(hub_here, tmp_path, name, capsys):
    """The name chose the publish record's path: `.published/<name>.json` overwrote any *.json the user could
    write."""
    victim = tmp_path / "victim" / "config.json"
    victim.parent.mkdir()
    victim.write_text('{"mine": true}')
    name = str(victim.with_suffix("")) if name == "ABSOLUTE" else name
    artifact = make_artifact(tmp_path / "artifacts" / "tiny-nf4")
    _list_in_manifest(artifact, "config.json", (artifact / "config.json").read_bytes(), name=name)
    assert main(["publish", str(artifact)]) == 1
    assert "is not a builder manifest (name: String should match pattern" in capsys.readouterr().err
    assert victim.read_text() == '{"mine": true}'
    assert not _repo_created(hub_here)


def test_publish_records_only_inside_published(hub, tmp_path):  # noqa: F811
    """A `.published` symlink leading elsewhere is refused (the push itself stands: exit 0, said on stderr), and a
    temporary name planted as a symlink in `.published` is never written through. In a subprocess: the push needs
    huggingface_hub to read HF_ENDPOINT at import."""
    artifact = make_artifact(tmp_path / "artifacts" / "tiny-nf4")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (artifact.parent / ".published").symlink_to(elsewhere, target_is_directory=True)
    first = run_publish(artifact, hub.url)
    assert first.returncode == 0, first.stderr
    assert f"{artifact.parent / '.published'} is a symlink" in first.stderr
    assert list(elsewhere.iterdir()) == []
    assert _repo_created(hub)

    (artifact.parent / ".published").unlink()
    (artifact.parent / ".published").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (artifact.parent / ".published" / "tiny-nf4.tmp").symlink_to(victim)
    second = run_publish(artifact, hub.url)
    assert second.returncode == 0, second.stderr  # nothing to push; the record is still written
    assert victim.read_text() == "mine"
    record = json.loads((artifact.parent / ".published" / "tiny-nf4.json").read_text())
    assert record["repo"] == REPO and record["status"] == "unchanged"


def test_the_build_and_verify_write_refuse_a_symlink_in_the_folder(tmp_path, secret, capsys):
    """`builder build` hashes its folder with `file_table`; `builder verify --write` refuses before its gate runs
    (it used to list a symlink with its target's sha256)."""
    artifact = make_artifact(tmp_path / "artifacts" / "tiny-nf4")
    (artifact / "sub").mkdir()
    (artifact / "sub" / "token").symlink_to(secret)
    with pytest.raises(ArtifactError, match="sub/token is a symlink"):
        file_table(artifact)
    assert main(["verify", str(artifact), "--write"]) == 1
    assert "sub/token is a symlink" in capsys.readouterr().err
    assert "sub/token" not in json.loads((artifact / "manifest.json").read_text())["files"]


def test_a_build_does_not_skip_an_artifact_with_a_symlink_in_its_table(tmp_path, secret):
    artifact = make_artifact(tmp_path / "artifacts" / "tiny-nf4")
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert up_to_date(artifact, manifest["build_hash"]) is not None
    (artifact / "config.json").unlink()
    (artifact / "config.json").symlink_to(secret)
    _list_in_manifest(artifact, "config.json", SECRET)
    assert up_to_date(artifact, manifest["build_hash"]) is None  # rebuilt: the build replaces the folder


def _local_artifact(tmp_path: Path) -> Path:
    """An artifact of a local source (`sha256:` revision), so `builder verify` looks for its lock file."""
    artifact = make_artifact(tmp_path / "artifacts" / "tiny-nf4", model="./m", source_revision=None)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["source"]["revision"] = "sha256:" + "0" * 64
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    return artifact


def test_verify_exits_1_on_a_recorded_recipe_this_builder_no_longer_reads(tmp_path, capsys):
    artifact = _local_artifact(tmp_path)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["recipe"]["quantize"]["quant_type"] = "nf5"
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(artifact)]) == 1
    error = capsys.readouterr().err
    assert f"{artifact / 'manifest.json'}: recipe.quantize.bnb-4bit.quant_type:" in error
    assert "rebuild the artifact (builder build RECIPE --force)" in error


@pytest.mark.parametrize(
    ("lock", "problem"),
    [("- 1\n- 2\n", "(top level): Input should be a valid dictionary"), ("a: [\n", "is not YAML")],
    ids=["list", "not-yaml"],
)
def test_verify_exits_1_on_a_lock_file_that_is_not_a_recipe(tmp_path, lock, problem, capsys):
    artifact = _local_artifact(tmp_path)
    (artifact / "recipe.lock.yaml").write_text(lock)
    assert main(["verify", str(artifact)]) == 1
    error = capsys.readouterr().err
    assert str(artifact / "recipe.lock.yaml") in error and problem in error
    assert "rebuild the artifact (builder build RECIPE --force)" in error


def _artifact_for_list(project: Path, files: dict[str, bytes], listed: dict[str, bytes] | None = None) -> Path:  # noqa: F811
    """artifacts/a with `files` on disk and a manifest of this build hash listing `listed` (default: `files`)."""
    from builder.inventory import artifact_states

    [state] = artifact_states([project / "recipes"], project / "artifacts", names=["a"])
    folder = project / "artifacts" / "a"
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    table = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in (listed or files).items()}
    (folder / "manifest.json").write_text(json.dumps(manifest_json("a", state.build_hash, True, table)))
    return folder


def _listed(capsys, *args: str) -> tuple[int, dict]:
    code = main(["list", "recipes", "--name", "a", "--json", *args])
    [row] = json.loads(capsys.readouterr().out)
    return code, row


def test_list_says_verified_only_for_content_it_hashed(project, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(project)
    folder = _artifact_for_list(project, {"model.safetensors": b"weights"})
    assert _listed(capsys)[1]["state"] == "verified"
    (folder / "model.safetensors").write_bytes(b"WEIGHTS")  # same size, other bytes
    code, row = _listed(capsys)
    assert (code, row["state"]) == (0, "built")
    assert row["detail"] == "model.safetensors changed after the build (its sha256 differs from the manifest's)"
    code, row = _listed(capsys, "--quick")
    assert (code, row["state"]) == (0, "up-to-date")


def test_list_refuses_an_entry_outside_the_folder_of_the_right_size(project, monkeypatch, capsys):  # noqa: F811
    """`../../../../etc/hostname` of the right size was `verified`: only sizes were compared."""
    monkeypatch.chdir(project)
    (project / "hostname").write_bytes(b"host\n")
    _artifact_for_list(project, {}, listed={"../../hostname": b"host\n"})
    code, row = _listed(capsys)
    assert (code, row["state"]) == (1, "invalid")
    assert "entry '../../hostname' has an empty, '.' or '..' part" in row["detail"]


def test_list_refuses_a_symlink_in_the_file_table(project, monkeypatch, secret, capsys):  # noqa: F811
    monkeypatch.chdir(project)
    folder = _artifact_for_list(project, {}, listed={"token": SECRET})
    (folder / "token").symlink_to(secret)
    code, row = _listed(capsys)
    assert (code, row["state"]) == (1, "invalid")
    assert "token: token is a symlink" in row["detail"]


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ("[1, 2]", "(top level): Input should be an object"),
        ("{", "(top level): Invalid JSON"),
        ("RECORD", "name: String should match pattern"),
    ],
    ids=["list", "not-json", "bad-name"],
)
def test_list_exits_1_on_a_publish_record_that_is_not_one(project, monkeypatch, record, problem, capsys):  # noqa: F811
    monkeypatch.chdir(project)
    _artifact_for_list(project, {})
    if record == "RECORD":
        record = json.dumps({**published_json("a", "0" * 64), "name": "../a"})
    (project / "artifacts" / ".published").mkdir()
    (project / "artifacts" / ".published" / "a.json").write_text(record)
    code, row = _listed(capsys)
    assert (code, row["state"]) == (1, "invalid")
    assert row["detail"].startswith(f"{Path('artifacts/.published/a.json')}: {problem}")
    assert row["detail"].endswith("delete it (it only records the last publish) or publish the artifact again")
