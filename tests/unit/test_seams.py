"""The two seams of issue 27, kept honest: a task family and a build kind registered from a test alone (no module
of builder touched) are what the plan, the threshold policy, the schema, the pipeline and the card use; and the
shipped families and kinds satisfy their protocols (mypy checks the registries' types)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from test_card import bnb_manifest, onnx_manifest

from builder.artifact import Manifest, WeightShare, parse_manifest
from builder.card import render_card
from builder.errors import ArtifactError, BuildError
from builder.kinds import KINDS, thresholds
from builder.pipeline import steps_for
from builder.plan import make_plan
from builder.recipe import Recipe, load_recipes
from builder.tasks import FAMILIES, family_of
from builder.tasks.base import CardUsage
from builder.verification import VerificationReport

TOY_TASK = "image-to-text"  # a task no shipped family verifies: the plan refuses it today


def toy_family() -> types.ModuleType:
    """A family for image-to-text written as a module would be (`builder/tasks/<name>.py`)."""
    toy = types.ModuleType("toy_family")
    toy.NAME = "toy"
    toy.TASKS = (TOY_TASK,)
    toy.PROBE_CLASS = "AutoModel"
    toy.GRAPH = "decoder"
    toy.gates = lambda runner, task: ("max_abs_diff", "top1_agreement")
    toy.default_thresholds = lambda scheme, task: {"bnb-int8": {"top1_agreement": 0.7}}[scheme]
    toy.transformers_usage = lambda task, folder, repo_id: CardUsage("caption = model.generate(**inputs)  # toy\n")
    toy.onnx_usage = lambda task, folder: "caption = session.run(None, {})  # toy\n"
    toy.ort_class = lambda task: "ORTModelForToy"
    return toy


def bnb8_recipe(task: str, overrides: dict | None = None) -> Recipe:
    return Recipe.model_validate(
        {
            "schema_version": 1,
            "name": "x",
            "source": {"model": "/nowhere", "task": task},
            "quantize": {"method": "bnb-8bit"},
            "verify": {"thresholds": overrides or {}},
        }
    )


def test_a_toy_task_registered_from_the_test_alone_gets_thresholds_schema_rules_and_card_wording(monkeypatch):
    assert family_of(TOY_TASK) is None
    toy = toy_family()
    monkeypatch.setitem(FAMILIES, toy.NAME, toy)
    assert family_of(TOY_TASK) is toy

    # threshold policy: the family's defaults under the kind's scheme, the kind's own gate, the recipe's overrides
    assert thresholds(KINDS["bnb-8bit"], bnb8_recipe(TOY_TASK), TOY_TASK, 0.5) == {
        "top1_agreement": 0.7,
        "footprint_ratio": 0.55,
    }
    overridden = bnb8_recipe(TOY_TASK, {"max_abs_diff": 0.1})
    assert thresholds(KINDS["bnb-8bit"], overridden, TOY_TASK, None)["max_abs_diff"] == 0.1
    with pytest.raises(BuildError, match=r"verify\.thresholds\.cosine does not apply .*max_abs_diff, top1_agreement"):
        thresholds(KINDS["bnb-8bit"], bnb8_recipe(TOY_TASK, {"cosine": 0.9}), TOY_TASK, None)

    # the schema's with_past rule asks the registry which tasks have decoder graphs
    export = {"schema_version": 1, "name": "x", "source": {"model": "/nowhere", "task": TOY_TASK}}
    Recipe.model_validate(export | {"export": {"format": "onnx", "with_past": True}})

    # the card's usage snippet is the family's
    manifest = bnb_manifest()
    manifest["source"]["task"] = TOY_TASK
    assert "caption = model.generate(**inputs)  # toy" in render_card(Manifest.model_validate(manifest))
    manifest = onnx_manifest()
    manifest["source"]["task"] = TOY_TASK
    onnx_card = render_card(Manifest.model_validate(manifest))
    assert "caption = session.run(None, {})  # toy" in onnx_card and "ORTModelForToy" in onnx_card


def toy_kind() -> types.ModuleType:
    """A kind written as a module would be (`builder/kinds/<name>.py`), registered in place of bnb-8bit."""
    toy = types.ModuleType("toy_kind")
    toy.NAME = "bnb-8bit"
    toy.STAGE = "toy-build"
    toy.RUNNER = "transformers"
    toy.LIBRARY = "toy-library"
    toy.VERSIONED = ("pyyaml",)
    toy.REQUIRED = ("pyyaml",)
    toy.GATES = ("footprint_ratio",)
    toy.scheme = lambda recipe: "bnb-fp4"
    toy.default_thresholds = lambda expected: {"footprint_ratio": 0.123}
    toy.refusal = lambda task, config: None
    toy.expected_footprint = lambda recipe, tensors, config: 0.25
    toy.expected_artifact_bytes = lambda recipe, tensors: 1234
    toy.weight_share = lambda recipe, tensors, config: WeightShare(quantized=0.5)
    toy.weights_refusal = lambda recipe, tensors, config: None
    toy.describe = lambda recipe, loaded, artifact: ("make a toy", 99, "compare the toy")
    toy.build = lambda ctx: None
    toy.card_tags = lambda block: ["toy"]
    toy.card_summary = lambda block: "a toy build"
    toy.quantized = lambda block: True
    return toy


def test_a_toy_kind_registered_from_the_test_alone_is_what_plan_pipeline_and_card_use(minilm, monkeypatch):
    toy = toy_kind()
    monkeypatch.setitem(KINDS, "bnb-8bit", toy)
    plan = make_plan(load_recipes("recipes/minilm/int8.yaml")[0])
    assert plan.kind is toy
    assert [stage.name for stage in plan.stages] == ["resolve", "toy-build", "verify", "write"]
    assert plan.stages[1].description == "make a toy" and plan.stages[2].description == "compare the toy"
    assert plan.expected_footprint_ratio == 0.25 and plan.expected_artifact_bytes == 1234
    assert plan.weight_share == WeightShare(quantized=0.5)
    assert set(plan.versions) == {"builder", "pyyaml"}
    # the text-encoder family's fp4 default, the toy's own footprint bound
    assert plan.thresholds == {"cosine": 0.85, "footprint_ratio": 0.123}
    assert steps_for(plan)[1] == ("toy-build", toy.build)

    manifest = bnb_manifest()
    manifest["recipe"]["quantize"] = {"method": "bnb-8bit"}
    card = render_card(Manifest.model_validate(manifest))
    assert "a toy build" in card and "- toy" in card


GOLDEN_AND_REPORT = sorted((Path(__file__).resolve().parents[1] / "assets").glob("*/*.json"))


VERSION_1 = [p for p in GOLDEN_AND_REPORT if json.loads(p.read_text()).get("manifest_version") == 1]


@pytest.mark.parametrize("path", [p for p in VERSION_1 if "manifest" in p.name or p.parent.name == "golden"])
def test_version_1_manifests_read_typed_and_as_written(path):
    raw = json.loads(path.read_text())
    manifest = parse_manifest(path.read_text(), str(path))
    assert raw["manifest_version"] == 1 and manifest.to_json() == raw
    assert isinstance(manifest.verification, VerificationReport) and manifest.verification.report_version == 1
    assert manifest.verification.failures == [] or manifest.verification.failures[0].message
    assert (manifest.onnx is not None) == (raw["kind"] == "export")


def test_a_report_of_another_shape_is_refused_where_it_differs():
    raw = bnb_manifest()
    raw["verification"]["failures"] = [{"metric": "top1_agreement", "value": 0.4}]  # no threshold, no message
    with pytest.raises(ArtifactError, match=r"verification\.failures\.0\.threshold: Field required"):
        parse_manifest(json.dumps(raw), "manifest.json")
