"""The model card rendered from a manifest: Hub metadata, usage, settings, verification, size, recipe."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from builder.artifact import Manifest
from builder.card import render_card as render_manifest_card


def render_card(manifest: dict, **options) -> str:
    """The card of a manifest written as JSON (the tests build them as dicts)."""
    return render_manifest_card(Manifest.model_validate(manifest), **options)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def bnb_manifest(**changes) -> dict:
    recipe = {
        "schema_version": 1,
        "name": "smol-nf4",
        "source": {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "revision": COMMIT,
            "task": "text-generation",
            "dtype": "bfloat16",
            "trust_remote_code": False,
            "allow_pickle": False,
        },
        "load": {"attn_implementation": None, "device_map": None, "max_memory": None},
        "quantize": {
            "method": "bnb-4bit",
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": "bfloat16",
            "quant_storage": "uint8",
            "skip_modules": [],
            "dequantize": False,
        },
        "export": None,
        "publish": {
            "repo": "demo/smol-nf4",
            "revision": "main",
            "private": False,
            "create_pr": False,
            "license": "apache-2.0",
            "tags": ["tiny"],
            "card": "## Notes\n\nHand-written notes.",
        },
    }
    manifest = {
        "manifest_version": 1,
        "name": "smol-nf4",
        "build_hash": "ab" * 32,
        "kind": "quantize",
        "recipe": recipe,
        "recipe_files": ["recipes/smollm2/nf4.yaml"],
        "source": {"model": recipe["source"]["model"], "revision": COMMIT, "task": "text-generation"},
        "versions": {"builder": "0.1.0", "torch": "2.13.0", "bitsandbytes": "0.50.2"},
        "device": "AMD EPYC",
        "built_at": "2026-01-01T00:00:00+00:00",
        "timings": {"load": 1.0},
        "footprint": {"source_bytes": 269_060_096, "artifact_bytes": 118_000_000, "ratio": 0.44},
        "bits_per_param": 4.13,
        "library_name": "transformers",
        "verification": {
            "passed": True,
            "task": "text-generation",
            "device": "cpu",
            "provider": None,
            "metrics": {"top1_agreement": 0.953, "kl_divergence_mean": 0.0412},
            "thresholds": {"top1_agreement": 0.9, "kl_divergence": 0.15},
            "failures": [],
            "performance": {"reference_latency_ms": 12.5},
        },
    }
    manifest.update(changes)
    return manifest


def onnx_manifest(**export_changes) -> dict:
    manifest = bnb_manifest(
        kind="export",
        library_name="onnx",
        bits_per_param=None,
        files={"onnx/model.onnx": {"sha256": "00" * 32, "size": 10}},
    )
    recipe = manifest["recipe"]
    recipe["quantize"] = None
    recipe["export"] = {
        "format": "onnx",
        "exporter": "torch",
        "opset": 18,
        "dtype": "float32",
        "provider": "CPUExecutionProvider",
        "optimize": "O2",
        "with_past": False,
        "quantize": "none",
        "verify_on": None,
        **export_changes,
    }
    recipe["source"] = {**recipe["source"], "task": "feature-extraction"}
    manifest["source"]["task"] = "feature-extraction"
    return manifest


def card_data(card: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(card).data.to_dict()


def test_bnb_card_metadata_links_the_source_as_quantized():
    data = card_data(render_card(bnb_manifest()))
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"
    assert {"bitsandbytes", "4-bit", "nf4", "tiny"} <= set(data["tags"])


def test_bnb_card_body_usage_settings_verification_size_recipe_versions_and_extra_text():
    card = render_card(bnb_manifest())
    assert 'model_id = "demo/smol-nf4"' in card and "AutoModelForCausalLM.from_pretrained(model_id" in card
    assert "| `quantize.quant_type` | `nf4` |" in card and "| `quantize.double_quant` | `true` |" in card
    assert re.search(r"\| top1_agreement \| 0\.953 \|  \| 0\.9 \| pass \|", card)  # no interval: a version-1 report
    assert re.search(r"\| kl_divergence_mean \| 0\.0412 \|  \| 0\.15 \| pass \|", card)  # gated as kl_divergence
    assert "**passed**" in card and "reference_latency_ms" in card
    assert "bits per quantized-layer weight (quantized layers only): 4.13" in card and "(0.44x the source)" in card
    recipe_block = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_block) == bnb_manifest()["recipe"]
    assert "| bitsandbytes | 0.50.2 |" in card
    assert card.rstrip().endswith("Hand-written notes.")


def test_a_version_3_card_shows_the_bits_reached_and_the_quantized_share_apart():
    layers = {"count": 210, "parameters": 106_000_000, "bytes": 55_000_000, "bits_per_param": 4.15}
    card = render_card(
        bnb_manifest(
            manifest_version=3,
            bits_per_param=6.65,
            quantized_layers=layers,
            weight_share={"quantized": 0.7893, "unquantized_experts": 0.0, "kept_dtype": None},
        )
    )
    assert "- bits per parameter (weight files over all parameters): 6.65" in card
    assert "- bits per quantized-layer weight (quantized layers only): 4.15" in card
    assert "- quantized: 78.9% of the source's weight bytes\n" in card
    assert "bitsandbytes 4-bit (nf4, double quantization) build of" in card and "partly" not in card


def test_a_moe_card_says_its_experts_were_not_quantized():
    share = {"quantized": 0.1204, "unquantized_experts": 0.8412, "kept_dtype": "bfloat16"}
    card = render_card(bnb_manifest(manifest_version=3, weight_share=share))
    summary = card.split("# smol-nf4\n\n", 1)[1].split("\n", 1)[0]
    assert summary.startswith(
        "Only partly quantized: the mixture-of-experts experts (84.1% of the weights) are kept in bfloat16, not "
        "quantized, because bitsandbytes converts only nn.Linear and transformers holds the experts as fused 3-D "
        "parameters (bitsandbytes #1849); bitsandbytes 4-bit (nf4, double quantization) covers the other Linear "
        "layers (12.0% of the weights). A build of "
    )
    assert "- quantized: 12.0% of the source's weight bytes; the mixture-of-experts experts (84.1%) are kept" in card


def test_the_usage_snippet_names_the_repo_it_is_published_to():
    assert 'model_id = "other/repo"' in render_card(bnb_manifest(), repo_id="other/repo")
    manifest = bnb_manifest()
    manifest["recipe"]["publish"] = None
    assert 'model_id = "<org>/smol-nf4"' in render_card(manifest)


def test_failed_verification_is_shown_as_failed():
    manifest = bnb_manifest()
    manifest["verification"] = {
        **manifest["verification"],
        "passed": False,
        "failures": [
            {"metric": "top1_agreement", "value": 0.4, "threshold": 0.9, "message": "top1_agreement 0.400 < 0.900"}
        ],
    }
    card = render_card(manifest)
    assert "**FAILED**" in card and "| fail |" in card and "NOT verified" in card


def local_manifest(tmp_path, monkeypatch, readme: str | None, config: dict | None = None, **source) -> dict:
    """A manifest built from the local folder models/m (its README.md and config.json as given)."""
    (tmp_path / "recipes").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "models" / "m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or {}))
    if readme is not None:
        (folder / "README.md").write_text(readme)
    manifest = bnb_manifest(
        recipe_files=["recipes/r.yaml"],
        source={"model": "../models/m", "revision": "sha256:" + "1" * 64, "task": "text-generation"},
    )
    manifest["recipe"]["source"] = {**manifest["recipe"]["source"], "model": "../models/m", "revision": None, **source}
    return manifest


def test_the_recipes_base_model_wins_over_the_source(tmp_path, monkeypatch):
    manifest = local_manifest(
        tmp_path,
        monkeypatch,
        "---\nbase_model: other/from-card\n---\n",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    data = card_data(render_card(manifest))
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["base_model_relation"] == "quantized"
    hub = bnb_manifest()
    hub["recipe"]["source"]["base_model"] = "HuggingFaceTB/SmolLM2-135M"
    assert card_data(render_card(hub))["base_model"] == "HuggingFaceTB/SmolLM2-135M"


def test_a_local_folder_links_the_base_model_of_its_readme_front_matter(tmp_path, monkeypatch):
    manifest = local_manifest(tmp_path, monkeypatch, "---\nlicense: mit\nbase_model: org/parent\n---\n# card\n")
    card = render_card(manifest)
    assert card_data(card)["base_model"] == "org/parent"
    assert "build of a local copy of `org/parent` (content digest `sha256:111" in card


def test_a_local_folder_never_links_configs_name_or_path(tmp_path, monkeypatch):
    # all-MiniLM-L6-v2's config names its grandparent; a card must not link it.
    manifest = local_manifest(
        tmp_path,
        monkeypatch,
        "---\nlicense: apache-2.0\n---\n",
        config={"_name_or_path": "nreimers/MiniLM-L6-H384-uncased"},
    )
    data = card_data(render_card(manifest))
    assert "base_model" not in data and "base_model_relation" not in data
    assert "base_model" not in card_data(render_card(local_manifest(tmp_path / "b", monkeypatch, None)))


def test_the_card_inherits_license_language_datasets_and_pipeline_tag_from_the_source_card(tmp_path, monkeypatch):
    readme = (
        "---\nlanguage: en\nlicense: mit\ndatasets:\n- s2orc\n- ms_marco\npipeline_tag: sentence-similarity\n"
        "library_name: sentence-transformers\n---\n# all-MiniLM-L6-v2\n"
    )
    manifest = local_manifest(tmp_path, monkeypatch, readme)
    manifest["recipe"]["publish"]["license"] = None
    data = card_data(render_card(manifest))
    assert data["license"] == "mit" and data["language"] == "en" and data["datasets"] == ["s2orc", "ms_marco"]
    assert data["pipeline_tag"] == "sentence-similarity"
    assert data["library_name"] == "transformers"  # what loads the artifact, not the source
    manifest["recipe"]["publish"]["license"] = "apache-2.0"  # the recipe's license wins
    assert card_data(render_card(manifest))["license"] == "apache-2.0"


def test_the_card_inherits_from_front_matter_with_dashes_in_a_quoted_value(tmp_path, monkeypatch):
    # huggingface_hub (and the Hub) end the block at a line that is `---`; splitting the text at its first `---`
    # cut this card's YAML in the middle of the description and dropped everything it inherits.
    readme = '---\ndescription: "MiniLM --- distilled"\nlicense: mit\nlanguage: en\n---\n# card --- text\n'
    manifest = local_manifest(tmp_path, monkeypatch, readme)
    manifest["recipe"]["publish"]["license"] = None
    data = card_data(render_card(manifest))
    assert data["license"] == "mit" and data["language"] == "en"


def test_base_model_must_be_a_hub_repo_id():
    from pydantic import ValidationError

    from builder.recipe import Source

    assert Source(model="./m", base_model="org/name").base_model == "org/name"
    with pytest.raises(ValidationError, match="not a Hub repo id"):
        Source(model="./m", base_model="../models/m")


def test_base_model_does_not_change_the_build_hash():
    from builder.plan import build_hash
    from builder.recipe import Recipe

    recipe = bnb_manifest()["recipe"]
    with_base = {**recipe, "source": {**recipe["source"], "base_model": "org/parent"}}
    assert build_hash(Recipe.model_validate(recipe), COMMIT, {}) == build_hash(
        Recipe.model_validate(with_base), COMMIT, {}
    )


@pytest.mark.parametrize(
    ("export", "relation"),
    [
        ({}, None),
        ({"quantize": "dynamic-int8"}, "quantized"),
        ({"dtype": "float16", "provider": "CUDAExecutionProvider", "optimize": "O4"}, "quantized"),
    ],
)
def test_onnx_card(export, relation):
    card = render_card(onnx_manifest(**export))
    data = card_data(card)
    provider = export.get("provider", "CPUExecutionProvider")
    assert data["library_name"] == "onnx" and data["pipeline_tag"] == "feature-extraction"
    assert {"onnx", provider} <= set(data["tags"])
    assert data.get("base_model_relation") == relation
    assert f'ort.InferenceSession(f"{{folder}}/onnx/model.onnx", providers=["{provider}"])' in card
    assert "ORTModelForFeatureExtraction.from_pretrained" in card
    assert "| `export.optimize` |" in card


def test_the_gates_results_are_the_cards_model_index():
    from huggingface_hub import ModelCard

    data = ModelCard(render_card(bnb_manifest())).data
    results = {r.metric_type: r for r in data.eval_results}
    assert data.model_name == "smol-nf4"
    assert results["top1_agreement"].metric_value == 0.953
    assert results["kl_divergence_mean"].metric_value == 0.0412
    assert {r.dataset_type for r in results.values()} == {"builder/eval_text"}
    assert {r.task_type for r in results.values()} == {"text-generation"}


def test_one_name_per_size_figure():
    manifest = bnb_manifest()
    manifest["verification"]["metrics"]["bits_per_param"] = 6.65  # every weight file, embeddings included
    card = render_card(manifest)
    assert "| weight_file_bits_per_param | 6.65 |" in card
    assert "bits per quantized-layer weight (quantized layers only): 4.13" in card
    assert not re.search(r"\bbits_per_param\b|bits per parameter", card.split("## Reproduce")[0])


def test_settings_are_written_as_yaml_values():
    card = render_card(bnb_manifest())
    settings = card.split("## Build settings")[1].split("##")[0]
    assert "| `quantize.double_quant` | `true` |" in settings and "| `quantize.dequantize` | `false` |" in settings
    assert "True" not in settings and "False" not in settings


def test_a_published_card_names_no_local_path(tmp_path, monkeypatch):
    manifest = local_manifest(tmp_path, monkeypatch, None, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    manifest["recipe"]["source"]["model"] = manifest["source"]["model"] = "../../models/smollm2-135m-instruct"
    card = render_card(manifest)
    assert "../" not in card and "models/smollm2" not in card
    assert "a local copy of `HuggingFaceTB/SmolLM2-135M-Instruct`" in card


def _verification_rows(card: str, *, interval: bool = False) -> dict[str, tuple[str, ...]]:
    """metric -> (threshold cell, verdict cell) of the card's verification table; (interval, threshold, verdict)
    with `interval`."""
    table = card.split("## Verification")[1].split("##")[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [cell.strip() for cell in rows[0]] == ["metric", "value", "95% interval", "threshold", ""]
    shown = slice(2, 5) if interval else slice(3, 5)
    return {cells[0].strip(): tuple(c.strip() for c in cells[shown]) for cells in rows[1:] if len(cells) == 5}


def test_the_card_shows_each_gated_metrics_interval_and_whether_it_clears_the_bound():
    manifest = bnb_manifest()
    manifest["verification"] |= {
        "report_version": 3,
        "intervals": {"top1_agreement": [0.94, 0.962], "kl_divergence_mean": [0.031, 0.16]},
        "interval_verdicts": {"top1_agreement": "clear", "kl_divergence_mean": "straddles"},
    }
    card = render_card(manifest)
    rows = _verification_rows(card, interval=True)
    assert rows["top1_agreement"] == ("[0.94, 0.962]", "0.9", "pass (clear)")
    assert rows["kl_divergence_mean"] == ("[0.031, 0.16]", "0.15", "pass (straddles)")
    assert "*straddles*: the threshold lies inside it" in card


def test_a_card_from_a_report_without_intervals_leaves_the_interval_cells_empty():
    rows = _verification_rows(render_card(bnb_manifest()), interval=True)  # a version-1 report
    assert rows["top1_agreement"] == ("", "0.9", "pass") and rows["kl_divergence_mean"] == ("", "0.15", "pass")


@pytest.mark.parametrize(
    ("kind", "task", "metrics", "thresholds"),
    [
        ("quantize", "text-generation", {"top1_agreement": 0.7, "kl_divergence_mean": 0.3, "kl_divergence_max": 2.0,
         "perplexity_ratio": 1.1, "footprint_ratio": 0.4}, {"top1_agreement": 0.45, "kl_divergence": 1.5,
         "perplexity_ratio": 2.5, "footprint_ratio": 0.5}),
        ("quantize", "feature-extraction", {"cosine_min": 0.95, "cosine_mean": 0.99, "max_abs_diff": 0.3,
         "footprint_ratio": 0.6}, {"cosine": 0.9, "footprint_ratio": 0.7}),
        ("export", "feature-extraction", {"cosine_min": 0.99999, "max_abs_diff": 1e-4, "relative_error": 1e-5},
         {"max_abs_diff": 2e-2, "cosine": 0.9999}),
        ("export", "text-generation", {"max_abs_diff": 1e-3, "top1_agreement": 1.0, "kl_divergence_mean": 1e-6,
         "generation_match": 1.0, "relative_error": 1e-5}, {"max_abs_diff": 2e-2, "top1_agreement": 0.99,
         "kl_divergence": 1e-4, "generation_match": 1.0}),
    ],
)  # fmt: skip
def test_the_card_shows_each_bound_beside_the_metric_the_gate_checks(kind, task, metrics, thresholds):
    from builder.gates import GATES

    manifest = bnb_manifest() if kind == "quantize" else onnx_manifest()
    manifest["source"]["task"] = manifest["recipe"]["source"]["task"] = task
    manifest["verification"] |= {"task": task, "metrics": metrics, "thresholds": thresholds}
    rows = _verification_rows(render_card(manifest))
    bounded = {GATES[key].metric: bound for key, bound in thresholds.items()}
    assert {metric for metric, (limit, _) in rows.items() if limit} == set(bounded)  # cosine_mean: no bound
    for metric, bound in bounded.items():
        assert rows[metric] == (f"{bound:.4g}", "pass")
