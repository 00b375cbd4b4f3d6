"""The gate's results as the Hub's `.eval_results/*.yaml` entries (builder.card.eval_results_files), read back with
huggingface_hub's own parser. A real build's file and its trip through `builder publish` are in test_pipeline.py."""

from __future__ import annotations

import yaml
from test_card import COMMIT, bnb_manifest, local_manifest, onnx_manifest

from builder.artifact import Manifest
from builder.card import EVAL_RESULTS_FILE, eval_results_files

DIGEST = "ab" * 32


def entries(manifest: dict) -> dict:
    """The manifest's eval-results entries by task id, parsed by huggingface_hub."""
    from huggingface_hub import parse_eval_result_entries

    files = eval_results_files(Manifest.model_validate(manifest))
    assert list(files) == [EVAL_RESULTS_FILE]
    return {entry.task_id: entry for entry in parse_eval_result_entries(yaml.safe_load(files[EVAL_RESULTS_FILE]))}


def test_the_file_is_in_the_folder_the_hub_reads():
    from huggingface_hub import constants

    assert EVAL_RESULTS_FILE.startswith(f"{constants.EVAL_RESULTS_FOLDER}/") and EVAL_RESULTS_FILE.endswith(".yaml")


def test_each_gated_metric_is_an_entry_on_the_evaluation_data():
    manifest = bnb_manifest()
    report = manifest["verification"]
    report["metrics"] |= {"artifact_bytes": 118_000_000, "perplexity_ratio": 1.02}  # measured, not gated
    report["inputs"] = {"eval_text_sha256": DIGEST}
    found = entries(manifest)
    assert set(found) == {"top1_agreement", "kl_divergence_mean"}  # `kl_divergence` gates kl_divergence_mean
    assert found["top1_agreement"].value == 0.953 and found["kl_divergence_mean"].value == 0.0412
    for entry in found.values():
        assert entry.dataset_id == "builder/eval_text" and entry.dataset_revision == DIGEST
        assert entry.date == "2026-01-01T00:00:00+00:00"
        assert entry.notes.startswith("task text-generation; ")
        assert f"compared with the source model HuggingFaceTB/SmolLM2-135M-Instruct at revision {COMMIT}" in (
            entry.notes
        )
        assert entry.verify_token is None  # a self-reported result: nothing claims the Hub verified it
    assert found["top1_agreement"].notes.endswith("gate >= 0.9: passed")
    assert found["kl_divergence_mean"].notes.endswith("gate <= 0.15: passed")


def test_a_failed_gate_says_which_metric_failed():
    manifest = bnb_manifest()
    report = manifest["verification"]
    report |= {"passed": False, "metrics": {"top1_agreement": 0.4, "kl_divergence_mean": 0.0412}}
    report["failures"] = [{"metric": "top1_agreement", "value": 0.4, "threshold": 0.9, "message": "missed"}]
    found = entries(manifest)
    assert found["top1_agreement"].notes.endswith("gate >= 0.9: failed")
    assert found["kl_divergence_mean"].notes.endswith("gate <= 0.15: passed")


def test_an_export_without_a_recorded_digest_has_no_revision():
    manifest = onnx_manifest()
    manifest["verification"] |= {
        "task": "feature-extraction",
        "metrics": {"cosine_min": 0.9991, "max_abs_diff": 0.002},
        "thresholds": {"cosine": 0.99},
    }
    found = entries(manifest)
    assert list(found) == ["cosine_min"] and found["cosine_min"].value == 0.9991
    assert found["cosine_min"].dataset_revision is None
    assert found["cosine_min"].notes.startswith("task feature-extraction; ")


def test_a_local_source_is_named_by_its_digest_not_its_path(tmp_path, monkeypatch):
    manifest = local_manifest(tmp_path, monkeypatch, None, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    notes = {entry.notes for entry in entries(manifest).values()}
    revision = manifest["source"]["revision"]
    assert revision.startswith("sha256:")
    for note in notes:
        assert f"a local copy of HuggingFaceTB/SmolLM2-135M-Instruct with content digest {revision}" in note
        assert "models/m" not in note


def test_no_gated_number_writes_no_file():
    manifest = bnb_manifest()
    manifest["verification"]["thresholds"] = {}
    assert eval_results_files(Manifest.model_validate(manifest)) == {}
    assert eval_results_files(Manifest.model_validate(bnb_manifest(verification=None))) == {}
