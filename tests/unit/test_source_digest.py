"""A local source's digest: a folder builder has not hashed before is hashed on a thread while the build goes on
(`ResolvedSource.pin`), once for all the plans that name it; a hashed one comes from the cache."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import Future

import pytest
from test_pipeline import write_recipe

import builder.source
from builder.plan import make_plan
from builder.recipe import load_recipes
from builder.source import folder_digest


@pytest.fixture
def held(monkeypatch, tmp_path) -> threading.Event:
    """An empty hash cache, and file hashing that waits until the returned event is set."""
    monkeypatch.setenv("BUILDER_CACHE", str(tmp_path / "hash-cache"))
    release, hash_file = threading.Event(), builder.source._sha256

    def held_hash(file):
        assert release.wait(30), "the hash was never released"
        return hash_file(file)

    monkeypatch.setattr(builder.source, "_sha256", held_hash)
    return release


def test_the_plan_does_not_wait_for_a_new_folders_digest_and_every_plan_of_it_shares_one_hash(
    tiny_llama, tmp_path, held
):
    source = tmp_path / "model"
    shutil.copytree(tiny_llama, source)
    recipe = write_recipe(tmp_path, source)
    plan = make_plan(load_recipes(recipe)[0])
    assert isinstance(plan.source.pin, Future) and not plan.source.pin.done()
    assert make_plan(load_recipes(recipe)[0]).source.pin is plan.source.pin
    held.set()
    assert plan.source.revision == f"sha256:{folder_digest(source)}"
    assert make_plan(load_recipes(recipe)[0]).source.pin == plan.source.revision  # from the cache now


def test_a_changed_file_is_hashed_anew(tiny_llama, tmp_path, held):
    source = tmp_path / "model"
    shutil.copytree(tiny_llama, source)
    recipe = write_recipe(tmp_path, source)
    held.set()
    before = make_plan(load_recipes(recipe)[0]).source.revision
    (source / "generation_config.json").write_text('{"do_sample": false}')
    after = make_plan(load_recipes(recipe)[0])
    assert after.source.revision != before and after.source.revision == f"sha256:{folder_digest(source)}"


def test_a_build_of_a_new_folder_records_its_digest(tiny_llama, tmp_path, monkeypatch):
    from builder.pipeline import build

    monkeypatch.setenv("BUILDER_CACHE", str(tmp_path / "hash-cache"))
    source = tmp_path / "model"
    shutil.copytree(tiny_llama, source)
    plan = make_plan(load_recipes(write_recipe(tmp_path, source))[0])
    assert isinstance(plan.source.pin, Future)
    result = build(plan, out=tmp_path / "out", device="cpu")
    assert result.manifest.source.revision == f"sha256:{folder_digest(source)}"
    assert result.manifest.build_hash == plan.build_hash
