"""The verification gate on the tiny random Llama: thresholds, failure messages, the report, `builder verify`.

One nf4 artifact of tiny_llama is built through the real pipeline (so it has its manifest and lock file) and
shared by the tests below; tests that change an artifact work on a copy.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from builder.cli import main
from builder.errors import BuildError
from builder.evaluation import eval_sentences, eval_text
from builder.gates import check
from builder.kinds import kind_of, thresholds
from builder.recipe import Recipe
from builder.steps import gate as gate_module
from builder.steps.verify import reference_dtype, run_checks

DATA = Path(gate_module.__file__).resolve().parents[1] / "data"
# The tiny model is mostly its 49152x64 embedding table, which stays unquantized: its footprint barely shrinks.
TINY_VERIFY = "verify:\n  thresholds: {footprint_ratio: 1.0}\n  max_new_tokens: 4\n"


def recipe(quantize: dict, overrides: dict | None = None) -> Recipe:
    return Recipe.model_validate(
        {
            "schema_version": 1,
            "name": "x",
            "source": {"model": "/nowhere"},
            "quantize": quantize,
            "verify": {"thresholds": overrides or {}},
        }
    )


def thresholds_for(recipe: Recipe, task: str) -> dict[str, float]:
    """The bounds the gate holds a build of `recipe` for `task` to (no expected footprint: 0.99)."""
    return thresholds(kind_of(recipe), recipe, task, None)


def test_gate_names_each_missed_metric_and_by_how_much():
    failures = check(
        {"top1_agreement": 0.4, "kl_divergence_mean": 0.5, "perplexity_ratio": 1.01},
        {"top1_agreement": 0.9, "kl_divergence": 0.1, "perplexity_ratio": 1.2},
    )
    assert [f["message"] for f in failures] == [
        "top1_agreement 0.400 < 0.900 (missed by 0.500)",
        "kl_divergence_mean 0.500 > 0.100 (missed by 0.400)",
    ]
    assert failures[0] | {"message": None} == {
        "metric": "top1_agreement",
        "value": 0.4,
        "threshold": 0.9,
        "message": None,
    }


def test_defaults_depend_on_method_and_task_and_the_recipe_overrides_them():
    nf4, fp4, int8 = (
        recipe({"method": "bnb-4bit"}),
        recipe({"method": "bnb-4bit", "quant_type": "fp4"}),
        recipe({"method": "bnb-8bit"}),
    )
    lm = {r: thresholds_for(r, "text-generation") for r in (nf4, fp4, int8)}
    assert lm[int8]["kl_divergence"] < lm[nf4]["kl_divergence"] <= lm[fp4]["kl_divergence"]
    assert set(thresholds_for(nf4, "feature-extraction")) == {"cosine", "footprint_ratio"}
    custom = recipe({"method": "bnb-4bit"}, {"top1_agreement": 0.5, "kl_divergence": 2.0})
    assert thresholds_for(custom, "text-generation") == lm[nf4] | {"top1_agreement": 0.5, "kl_divergence": 2.0}


def test_a_threshold_the_task_has_no_metric_for_is_refused():
    with pytest.raises(BuildError, match=r"verify\.thresholds\.cosine does not apply to a text-generation model"):
        thresholds_for(recipe({"method": "bnb-4bit"}, {"cosine": 0.9}), "text-generation")


def test_reference_dtype_keeps_bfloat16_and_avoids_float16_on_cpu():
    class Config:
        dtype = "float16"

    assert reference_dtype("auto", Config(), "cpu") == "float32"
    assert reference_dtype("auto", Config(), "cuda") == "float16"
    assert reference_dtype("bfloat16", Config(), "cpu") == "bfloat16"


def test_evaluation_text_is_a_few_thousand_words_of_sourced_public_domain_prose():
    text = eval_text()
    assert len(text.split()) > 2000
    assert text.startswith("When in the Course of human events")
    assert "It is a truth universally acknowledged" in text and "Four score and seven years ago" in text
    readme = (DATA / "README.md").read_text()
    for needle in (
        "Declaration of Independence",
        "Jane Austen",
        "Pride and Prejudice",
        "Gettysburg Address",
        "Public domain",
    ):
        assert needle in readme
    sentences = eval_sentences(32)
    assert len(sentences) == 32 and all(len(s.split()) >= 5 for s in sentences)
    assert sentences[-1] in text.replace("\n", " ") and "Bennet" in " ".join(sentences)


# --- on a built tiny artifact ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory) -> dict:
    """tiny_llama as nf4, built by the pipeline (which runs the gate), plus a copy of its source folder."""
    folder = tmp_path_factory.mktemp("verify")
    source = folder / "source"
    shutil.copytree(tiny_llama, source)
    recipe_file = folder / "tiny.yaml"
    recipe_file.write_text(
        f"schema_version: 1\nname: tiny\nsource:\n  model: {source}\n  dtype: bfloat16\n"
        f"quantize:\n  method: bnb-4bit\n  quant_type: nf4\n{TINY_VERIFY}"
    )
    out = folder / "artifacts"
    assert main(["build", str(recipe_file), "--out", str(out), "--device", "cpu"]) == 0
    return {"artifact": out / "tiny", "source": source, "folder": folder}


def test_the_build_report_follows_the_contract(built):
    report = json.loads((built["artifact"] / "verify-report.json").read_text())
    manifest = json.loads((built["artifact"] / "manifest.json").read_text())
    assert manifest["verification"] == report
    assert report["passed"] is True and report["failures"] == []
    assert (report["task"], report["device"], report["provider"]) == ("text-generation", "cpu", None)
    assert {
        "top1_agreement",
        "kl_divergence_mean",
        "kl_divergence_max",
        "perplexity_ratio",
        "greedy_match",
        "footprint_ratio",
        "artifact_bytes",
        "bits_per_param",
    } <= set(report["metrics"])
    assert report["thresholds"]["footprint_ratio"] == 1.0 and "top1_agreement" in report["thresholds"]
    assert {
        "reference_latency_ms",
        "candidate_latency_ms",
        "reference_throughput_tokens_per_s",
        "candidate_throughput_tokens_per_s",
    } <= set(report["performance"])
    assert report["reference"]["dtype"] == "bfloat16"
    assert report["inputs"]["eval_tokens"] == 2048 and len(report["inputs"]["greedy_tokens_matched"]) == 3
    assert 0 < report["metrics"]["kl_divergence_mean"] <= report["metrics"]["kl_divergence_max"]


def copy_artifact(built, tmp_path) -> Path:
    copy = tmp_path / "tiny"
    shutil.copytree(built["artifact"], copy)
    lock = copy / "recipe.lock.yaml"  # keeps its absolute source path
    assert str(built["source"]) in lock.read_text()
    return copy


def test_builder_verify_reruns_the_checks_and_changes_nothing_without_write(built, tmp_path, capsys):
    artifact = copy_artifact(built, tmp_path)
    before = {p: p.read_bytes() for p in artifact.rglob("*") if p.is_file()}
    assert main(["verify", str(artifact), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    recorded = json.loads((artifact / "verify-report.json").read_text())
    assert report["passed"] and report["metrics"]["top1_agreement"] == pytest.approx(
        recorded["metrics"]["top1_agreement"], abs=0.01
    )
    assert {p: p.read_bytes() for p in artifact.rglob("*") if p.is_file()} == before


def test_builder_verify_write_updates_the_report_and_the_file_hashes(built, tmp_path, capsys):
    artifact = copy_artifact(built, tmp_path)
    (artifact / "verify-report.json").write_text("{}")
    assert main(["verify", str(artifact), "--write"]) == 0
    assert "verification PASSED" in capsys.readouterr().out
    report = json.loads((artifact / "verify-report.json").read_text())
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert report["passed"] and manifest["verification"] == report
    import hashlib

    entry = manifest["files"]["verify-report.json"]
    assert entry["sha256"] == hashlib.sha256((artifact / "verify-report.json").read_bytes()).hexdigest()


def test_builder_verify_refuses_a_source_that_changed(built, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(built["source"], source)
    artifact = copy_artifact(built, tmp_path)
    lock = artifact / "recipe.lock.yaml"
    lock.write_text(lock.read_text().replace(str(built["source"]), str(source)))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-5}))
    assert main(["verify", str(artifact)]) == 1
    err = capsys.readouterr().err
    assert re.search(
        r"the source folder .*source changed since .* was built \(recorded sha256:[0-9a-f]{64}, now "
        r"sha256:[0-9a-f]{64}\)",
        err,
    ), err


def test_an_artifact_that_does_not_load_in_a_worker_process_fails_the_gate(built, tmp_path):
    artifact = copy_artifact(built, tmp_path)
    (artifact / "model.safetensors").write_bytes(b"not safetensors")
    tiny = Recipe.model_validate(
        {
            "schema_version": 1,
            "name": "tiny",
            "source": {"model": str(built["source"]), "dtype": "bfloat16"},
            "quantize": {"method": "bnb-4bit"},
            "verify": {"thresholds": {"footprint_ratio": 1.0}, "max_new_tokens": 4},
        }
    )
    # A cap puts the gate's runs in worker processes (the tiny model is far below it: it runs whole).
    report = run_checks(tiny, "text-generation", built["source"], artifact, "cpu", max_device_memory=1 << 30)
    assert report["passed"] is False
    assert report["failures"][0]["metric"] == "loads"
    assert "does not load and run with stock transformers in a fresh process" in report["failures"][0]["message"]


def test_onnx_thresholds_take_the_recipes_overrides_and_refuse_what_the_task_lacks():
    def export(overrides: dict) -> Recipe:
        return Recipe.model_validate(
            {
                "schema_version": 1,
                "name": "x",
                "source": {"model": "/nowhere"},
                "export": {"format": "onnx"},
                "verify": {"thresholds": overrides},
            }
        )

    defaults = thresholds_for(export({}), "text-generation")
    assert defaults["generation_match"] == 1.0
    assert thresholds_for(export({"top1_agreement": 0.5}), "text-generation") == defaults | {"top1_agreement": 0.5}
    with pytest.raises(
        BuildError,
        match=r"verify\.thresholds\.top1_agreement does not apply to an ONNX export of a "
        r"feature-extraction model \(its gates: ",
    ):
        thresholds_for(export({"top1_agreement": 0.5}), "feature-extraction")


def test_logits_compared_a_few_rows_at_a_time_give_the_whole_chunks_metrics(monkeypatch):
    import torch

    from builder.tasks import causal_lm

    vocabulary, generator = 50, torch.Generator().manual_seed(0)

    def logits(rows: int) -> torch.Tensor:
        return torch.randn(rows, vocabulary, generator=generator).mul(3).bfloat16()

    inputs = {"eval_chunks": [torch.randint(0, vocabulary, (1, n), generator=generator) for n in (7, 9)]}
    reference = {"eval_logits": [logits(7), logits(9)], "prompt_logits": [logits(5)], "continuations": [[1, 2, 3]]}
    candidate = {
        "eval_logits": [(t.float() + 0.3 * logits(len(t)).float()).bfloat16() for t in reference["eval_logits"]],
        "prompt_logits": [logits(5)],
        "continuations": [[1, 2, 4]],
    }
    whole, _ = causal_lm.compare(inputs, reference, candidate, "cpu")  # 2**21 elements: each chunk at once
    monkeypatch.setattr(causal_lm, "CPU_COMPARE_ELEMENTS", 3 * vocabulary)  # 3 rows: blocks end inside each chunk
    blocked, details = causal_lm.compare(inputs, reference, candidate, "cpu")
    assert blocked == pytest.approx(whole, rel=1e-6) and details["positions"] == 21
    assert blocked["top1_agreement"] == whole["top1_agreement"] and 0 < whole["top1_agreement"] < 1
    assert blocked["perplexity_ratio"] != 1.0
