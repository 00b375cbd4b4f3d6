"""The gate at scale on the tiny random Llama: the reference cache, --no-cache, damaged entries, stage lines,
the summary after a build, thresholds in `builder plan`, and the block-by-block forward."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builder.cli import main
from builder.recipe import Recipe
from builder.steps import references
from builder.steps.verify import run_checks

TINY = (
    "schema_version: 1\nname: tiny\nsource:\n  model: {model}\n  dtype: bfloat16\nquantize:\n  method: bnb-4bit\n"
    "verify:\n  thresholds: {{footprint_ratio: 1.0}}\n  max_new_tokens: 4\n"
    "variants:\n  nf4: {{quantize: {{quant_type: nf4}}}}\n  fp4: {{quantize: {{quant_type: fp4}}}}\n"
)
GATED = (
    "top1_agreement",
    "kl_divergence_mean",
    "kl_divergence_max",
    "perplexity_reference",
    "perplexity_candidate",
    "perplexity_ratio",
    "greedy_match",
    "footprint_ratio",
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(references.CACHE_ENV, str(folder))
    return folder / "references"


@pytest.fixture(scope="module")
def variants(tiny_llama, tmp_path_factory) -> dict:
    """Both variants of one tiny source built in order with an empty cache, and what the build printed."""
    folder = tmp_path_factory.mktemp("gate-cache")
    recipe = folder / "tiny.yaml"
    recipe.write_text(TINY.format(model=tiny_llama))
    previous = os.environ.get(references.CACHE_ENV)
    os.environ[references.CACHE_ENV] = str(folder / "cache")
    try:
        import contextlib
        import io

        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(["build", str(recipe), "--out", str(folder / "out"), "--device", "cpu"])
    finally:
        os.environ.pop(references.CACHE_ENV) if previous is None else os.environ.update(
            {references.CACHE_ENV: previous}
        )
    assert code == 0, err.getvalue()
    return {
        "recipe": recipe,
        "out": folder / "out",
        "cache": folder / "cache" / "references",
        "stderr": err.getvalue(),
        "stdout": out.getvalue(),
    }


def report_of(artifact: Path) -> dict:
    return json.loads((artifact / "verify-report.json").read_text())


def test_the_second_variant_of_a_source_reuses_the_first_ones_reference(variants):
    first, second = report_of(variants["out"] / "tiny-nf4"), report_of(variants["out"] / "tiny-fp4")
    assert first["reference"]["cached"] is False and second["reference"]["cached"] is True
    assert first["reference"]["key"] == second["reference"]["key"]
    manifest = json.loads((variants["out"] / "tiny-fp4" / "manifest.json").read_text())
    assert manifest["verification"]["reference"]["cached"] is True
    assert [p.name for p in variants["cache"].iterdir()] == [f"{first['reference']['key']}.ref"]
    assert "tiny-fp4: verify: reference: reused from the cache" in variants["stderr"]


def test_each_verify_stage_says_how_long_it_took(variants):
    for stage in ("load", "evaluation", "generation", "latency"):
        assert f"tiny-nf4: verify: reference: {stage} " in variants["stderr"]
        assert f"tiny-fp4: verify: candidate: {stage} " in variants["stderr"]
    assert "tiny-fp4: verify: reference: load" not in variants["stderr"]  # it came from the cache
    first, second = report_of(variants["out"] / "tiny-nf4"), report_of(variants["out"] / "tiny-fp4")
    for stages in (first["reference"]["stages"], first["candidate"]["stages"], second["candidate"]["stages"]):
        assert list(stages) == ["imports", "load", "evaluation", "generation", "latency"]  # on threads: no save
        assert all(seconds >= 0 for seconds in stages.values())
    assert second["reference"]["stages"] == {}  # from the cache: no run of its own
    assert first["candidate"]["overlapped"] is False  # on a CPU the two runs take turns


def test_a_passing_build_prints_its_gated_metrics_against_the_thresholds(variants):
    lines = variants["stdout"].splitlines()
    start = lines.index(f"tiny-nf4: built -> {variants['out'] / 'tiny-nf4'}")
    assert lines[start + 1] == "  gate passed on cpu"
    assert lines[start + 2].split()[0] == "top1_agreement" and lines[start + 2].split()[-2:] == [">=", "0.450"]
    assert "footprint_ratio" in lines[start + 5] and lines[start + 5].endswith("<= 1.000")
    assert "(reference from the cache)" in variants["stdout"].split("tiny-fp4: built")[1]


def test_metrics_are_the_same_with_and_without_the_cache_and_no_cache_recomputes(variants, cache, capsys):
    artifact = variants["out"] / "tiny-fp4"
    assert main(["verify", str(artifact), "--json"]) == 0
    fresh = json.loads(capsys.readouterr().out)  # an empty cache: computed
    assert main(["verify", str(artifact), "--json"]) == 0
    cached = json.loads(capsys.readouterr().out)
    assert main(["verify", str(artifact), "--json", "--no-cache"]) == 0
    recomputed = json.loads(capsys.readouterr().out)
    assert [r["reference"]["cached"] for r in (fresh, cached, recomputed)] == [False, True, False]
    assert (
        {k: cached["metrics"][k] for k in GATED}
        == {k: fresh["metrics"][k] for k in GATED}
        == {k: recomputed["metrics"][k] for k in GATED}
    )
    assert {k: report_of(artifact)["metrics"][k] for k in GATED} == {k: fresh["metrics"][k] for k in GATED}


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cache_entry_is_recomputed_and_rewritten(variants, cache, capsys, damage):
    artifact = variants["out"] / "tiny-nf4"
    assert main(["verify", str(artifact), "--json", "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # --quiet: no stage lines
    [entry] = cache.iterdir()
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    entry.write_bytes(data)
    assert main(["verify", str(artifact), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["reference"]["cached"] is False
    assert entry.read_bytes() != bytes(data) and references.load(entry.stem) is not None


def test_an_interrupted_cache_write_leaves_no_entry(cache, monkeypatch):
    import torch

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        references.store("k" * 64, {"x": torch.ones(3)})
    assert list(cache.iterdir()) == [] and references.load("k" * 64) is None


def test_a_killed_writers_temporary_file_is_swept_once_a_day_old(cache):
    import torch

    cache.mkdir(parents=True)
    old, fresh = cache / ".0123456789abcdef-old.tmp", cache / ".0123456789abcdef-new.tmp"
    old.write_bytes(b"half an entry")
    fresh.write_bytes(b"a live writer's")
    os.utime(old, (0, 0))
    references.store("k" * 64, {"x": torch.ones(3)})
    assert sorted(p.name for p in cache.iterdir()) == [fresh.name, "k" * 64 + ".ref"]
    assert torch.equal(references.load("k" * 64)["x"], torch.ones(3))


def test_the_key_changes_with_every_input_of_the_reference():
    import torch

    base = {
        "revision": "sha256:1",
        "dtype": "bfloat16",
        "device_kind": "cpu",
        "inputs": {"a": [torch.tensor([[1, 2]])]},
        "task": "text-generation",
        "max_new_tokens": 4,
    }
    changed = [
        base | {"revision": "sha256:2"},
        base | {"dtype": "float32"},
        base | {"device_kind": "cuda:H200"},
        base | {"inputs": {"a": [torch.tensor([[1, 3]])]}},
        base | {"max_new_tokens": 5},
        base | {"task": "feature-extraction"},
    ]
    keys = {references.reference_key(**fields) for fields in [base, *changed]}
    assert len(keys) == 7 and references.reference_key(**base) == references.reference_key(**dict(base))


@pytest.mark.slow  # minutes on 2 cores; the block path on SmolLM2 is the slow tier's too
def test_build_under_max_gpu_memory_verifies_both_models_block_by_block(tiny_llama, tmp_path, cache):
    recipe = tmp_path / "tiny.yaml"
    text = TINY.format(model=tiny_llama).split("variants:")[0]
    recipe.write_text(text.replace("bnb-4bit", "bnb-4bit\n  quant_type: nf4"))
    assert (
        main(
            [
                "build",
                str(recipe),
                "--out",
                str(tmp_path / "out"),
                "--device",
                "cpu",
                "--quiet",
                "--max-gpu-memory",
                "1MiB",
            ]
        )
        == 0
    )
    report = report_of(tmp_path / "out" / "tiny")
    assert report["passed"] and (report["reference"]["forward"], report["candidate"]["forward"]) == ("blocks", "blocks")


def test_plan_shows_the_thresholds_the_gate_will_apply(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.format(model=tiny_llama))
    assert main(["plan", str(recipe), "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert plans[0]["thresholds"] == {
        "top1_agreement": 0.45,
        "kl_divergence": 1.5,
        "perplexity_ratio": 2.5,
        "footprint_ratio": 1.0,
    }
    assert plans[1]["thresholds"]["top1_agreement"] == 0.40  # fp4's default
    assert main(["plan", str(recipe)]) == 0
    assert (
        "gate:        top1_agreement >= 0.45, kl_divergence <= 1.5, perplexity_ratio <= 2.5, footprint_ratio "
        "<= 1" in capsys.readouterr().out
    )


# --- block by block ---------------------------------------------------------------------------------------------


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-3 * abs(b)


def assert_same_metrics(blocks: dict, whole: dict) -> None:
    m, w = blocks["metrics"], whole["metrics"]
    assert m["top1_agreement"] == w["top1_agreement"] and m["greedy_match"] == w["greedy_match"]
    for key in ("kl_divergence_mean", "perplexity_reference", "perplexity_candidate", "perplexity_ratio"):
        assert close(m[key], w[key]), (key, m[key], w[key])


@pytest.mark.slow  # minutes on 2 cores; the block path on SmolLM2 is the slow tier's too
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_block_by_block_gives_the_whole_models_metrics(variants, tiny_llama, tmp_path, cache, method):
    if method == "nf4":
        artifact = variants["out"] / "tiny-nf4"
        quantize = {"method": "bnb-4bit", "quant_type": "nf4"}
    else:
        recipe = tmp_path / "int8.yaml"
        recipe.write_text(
            TINY.format(model=tiny_llama)
            .split("variants:")[0]
            .replace("bnb-4bit", "bnb-8bit")
            .replace("{footprint_ratio: 1.0}", "{footprint_ratio: 1.0, kl_divergence: 1.0}")
        )
        assert main(["build", str(recipe), "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 0
        artifact, quantize = tmp_path / "out" / "tiny", {"method": "bnb-8bit"}
    recipe = Recipe.model_validate(
        {
            "schema_version": 1,
            "name": "tiny",
            "source": {"model": str(tiny_llama), "dtype": "bfloat16"},
            "quantize": quantize,
            "verify": {"thresholds": {"footprint_ratio": 1.0}, "max_new_tokens": 4},
        }
    )
    whole = run_checks(recipe, "text-generation", tiny_llama, artifact, "cpu", use_cache=False)
    blocks = run_checks(recipe, "text-generation", tiny_llama, artifact, "cpu", use_cache=False, max_device_memory=1)
    assert (whole["reference"]["forward"], whole["candidate"]["forward"]) == ("whole", "whole")
    assert (blocks["reference"]["forward"], blocks["candidate"]["forward"]) == ("blocks", "blocks")
    offload = blocks["candidate"]["offload"]
    assert offload["blocks"] == 2 and offload["onloads"] > 2 * 4  # every forward of every block onloads it
    assert offload["peak_onloaded_bytes"] == offload["largest_block_bytes"]  # one block at a time
    # The reference's blocks are read from its files; the bitsandbytes candidate's are kept in host memory.
    assert (blocks["reference"]["offload"]["read_from"], offload["read_from"]) == ("files", "host")
    assert blocks["reference"]["offload"]["peak_onloaded_blocks"] == offload["peak_onloaded_blocks"] == 1
    assert_same_metrics(blocks, whole)


@pytest.mark.slow
def test_block_by_block_gives_the_whole_models_metrics_on_smollm2(smollm2, tmp_path, cache):
    """Real weights, 30 blocks: the same agreement, KL and perplexity whole and one block at a time."""
    recipe_file = tmp_path / "smol.yaml"
    recipe_file.write_text(
        f"schema_version: 1\nname: smol\nsource:\n  model: {smollm2}\n  dtype: bfloat16\n"
        "quantize:\n  method: bnb-4bit\n  quant_type: nf4\nverify:\n  max_new_tokens: 4\n"
    )
    assert main(["build", str(recipe_file), "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 0
    recipe = Recipe.model_validate(
        {
            "schema_version": 1,
            "name": "smol",
            "source": {"model": str(smollm2), "dtype": "bfloat16"},
            "quantize": {"method": "bnb-4bit", "quant_type": "nf4"},
            "verify": {"max_new_tokens": 4},
        }
    )
    artifact = tmp_path / "out" / "smol"
    whole = run_checks(recipe, "text-generation", smollm2, artifact, "cpu", use_cache=False)
    blocks = run_checks(
        recipe, "text-generation", smollm2, artifact, "cpu", use_cache=False, max_device_memory=64 << 20
    )
    assert blocks["candidate"]["offload"]["blocks"] == 30 and blocks["reference"]["forward"] == "blocks"
    assert_same_metrics(blocks, whole)


@pytest.fixture
def in_worker_processes(monkeypatch):
    """Gate runs in worker processes, as under a device memory cap (here without one)."""
    from builder.steps import runs, verify

    def worker(preload, task, device, label, max_device_memory, *, foreground=False, imports=()):
        return runs.WorkerRun(preload, task, device, label, foreground=foreground, imports=imports)

    monkeypatch.setattr(verify, "runner", worker)


def _tiny_recipe(tiny_llama: Path, quant_type: str) -> Recipe:
    return Recipe.model_validate(
        {
            "schema_version": 1,
            "name": "tiny",
            "source": {"model": str(tiny_llama), "dtype": "bfloat16"},
            "quantize": {"method": "bnb-4bit", "quant_type": quant_type},
            "verify": {"thresholds": {"footprint_ratio": 1.0}, "max_new_tokens": 4},
        }
    )


def test_runs_in_the_build_process_give_the_worker_processes_metrics(variants, tiny_llama, cache, request):
    artifact, recipe = variants["out"] / "tiny-nf4", _tiny_recipe(tiny_llama, "nf4")
    threads = run_checks(recipe, "text-generation", tiny_llama, artifact, "cpu", use_cache=False)
    request.getfixturevalue("in_worker_processes")
    workers = run_checks(recipe, "text-generation", tiny_llama, artifact, "cpu", use_cache=False)
    assert {k: threads["metrics"][k] for k in GATED} == {k: workers["metrics"][k] for k in GATED}
    assert threads["inputs"] == workers["inputs"] and threads["passed"]
    for run in (threads["reference"], threads["candidate"]):
        assert list(run["stages"]) == ["imports", "load", "evaluation", "generation", "latency"]  # nothing to save
    assert list(workers["candidate"]["stages"])[-1] == "save"


def test_an_artifact_that_does_not_load_in_the_build_process_fails_the_gate(variants, tiny_llama, tmp_path):
    import shutil

    artifact = tmp_path / "broken"
    shutil.copytree(variants["out"] / "tiny-nf4", artifact)
    (artifact / "model.safetensors").write_bytes(b"not safetensors")
    report = run_checks(_tiny_recipe(tiny_llama, "nf4"), "text-generation", tiny_llama, artifact, "cpu")
    assert report["passed"] is False and report["failures"][0]["metric"] == "loads"
    assert "does not load and run with stock transformers in the build process: " in report["failures"][0]["message"]


def test_a_run_in_the_build_process_stops_when_cancelled(tiny_llama):
    from builder.steps import runs, verify

    inputs = verify.tokenize_inputs(tiny_llama, "text-generation", ())
    run = runs.InProcessRun(tiny_llama, "text-generation", "cpu", "tiny: verify: reference")
    run.submit(tiny_llama, "bfloat16", inputs, 4, None)
    run.cancel()  # the run stops at its next stage event: before its model loads
    assert not run._thread.is_alive() and set(run.stages) <= {"imports"}
    with pytest.raises(runs.RunFailed, match="in the build process: the run was stopped"):
        run.result()


def test_a_reference_whose_source_is_still_being_hashed_runs_at_once_and_is_stored_under_the_digest(tiny_llama, cache):
    from concurrent.futures import Future

    from builder.source import folder_digest
    from builder.steps.verify import ReferenceRun

    recipe, digest = _tiny_recipe(tiny_llama, "nf4"), Future()
    pending = ReferenceRun(recipe, "text-generation", tiny_llama, "cpu", revision=digest)
    assert pending.running()  # no cache lookup: there is no key yet
    digest.set_result(f"sha256:{folder_digest(tiny_llama)}")
    outputs = pending.result()
    pending.cancel()  # waits for the store
    known = ReferenceRun(recipe, "text-generation", tiny_llama, "cpu", revision=digest.result())
    assert known.key == pending.key and not known.running()
    assert known.result()["continuations"] == outputs["continuations"] and known.cached
