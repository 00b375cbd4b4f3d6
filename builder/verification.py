"""The verification report (verify-report.json, and the manifest's `verification`) and the ONNX export's record
(the manifest's `onnx`): typed, versioned, one producer per build kind (`builder.steps.verify.run_checks` for
bitsandbytes, `builder.steps.verify_onnx.onnx_report` for ONNX; `builder.steps.export` writes the ONNX record).

Version 2 of the report is version 1's fields, typed; a report without `report_version` is a version-1 one, and
reads as it was written.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

REPORT_VERSION = 2


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # a report is JSON a builder wrote: "1.5" is not 1.5


class NodePlacement(_Record):
    """ONNX exports: which execution provider ran how many nodes of each op type in the gate's onnxruntime session,
    counted after onnxruntime's graph optimizations (`builder.steps.placement` measures it). Kept in the
    verification report as `placement`."""

    measured_on: str
    """The provider the session was created for: the verification provider (the target, or `export.verify_on`
    where the target cannot run on the build host; the report's `target_provider` says which was wanted)."""
    nodes: dict[str, dict[str, int]]
    """Provider -> op type -> nodes of that type it ran."""

    def op_types(self, provider: str) -> str:
        """The op types `provider` ran with their node counts, most frequent first: "MatMul 14, Add 9"."""
        ops = self.nodes.get(provider, {})
        return ", ".join(f"{op} {n}" for op, n in sorted(ops.items(), key=lambda item: (-item[1], item[0])))

    def providers(self) -> list[str]:
        """The providers that ran nodes: the session's own first, then those it fell back to."""
        return sorted(self.nodes, key=lambda provider: (provider != self.measured_on, provider))

    def summary(self) -> list[str]:
        """One line per provider: how many nodes it ran and of which op types."""
        return [f"{p}: {sum(self.nodes[p].values())} nodes ({self.op_types(p)})" for p in self.providers()]


class Failure(_Record):
    """One missed bound (or a model that did not load and run: `metric` "loads", or "placement")."""

    metric: str
    value: float | None
    threshold: float | None
    message: str


class RunRecord(_Record):
    """How one run of the bitsandbytes gate executed: the reference (the source; maybe from the reference cache) or
    the candidate (the artifact reloaded)."""

    model: str | None = None
    """"source" (the reference)."""
    dtype: str | None = None
    cached: bool | None = None
    """Whether the reference's outputs came from the reference cache (`key`)."""
    key: str | None = None
    stages: dict[str, float] | None = None
    """Seconds per stage of the run (imports, load, evaluation, ...)."""
    forward: str | None = None
    """"whole", or "blocks" (a model past the device memory cap, run block by block: `offload`)."""
    offload: dict[str, Any] | None = None
    device_peak_bytes: int | None = None
    overlapped: bool | None = None
    """The candidate: whether it ran while the reference computed."""


class VerificationReport(_Record):
    """The gate's report. `metrics` and `inputs` are the task family's (`builder.tasks`), `thresholds` the bounds
    by `builder.gates` key, `placement`, `target_provider` and `outputs` the ONNX gate's, `reference` and
    `candidate` the bitsandbytes gate's."""

    report_version: int = 1
    passed: bool
    task: str
    device: str
    provider: str | None = None
    """The execution provider the ONNX gate ran the graph on (None: the bitsandbytes gate)."""
    target_provider: str | None = None
    placement: NodePlacement | None = None
    metrics: dict[str, float | int]
    thresholds: dict[str, float]
    failures: list[Failure]
    performance: dict[str, float | int | None]
    outputs: dict[str, dict[str, float]] | None = None
    """Per ONNX graph output: its largest absolute and relative difference from PyTorch's."""
    reference: RunRecord | None = None
    candidate: RunRecord | None = None
    inputs: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The report as written (fields a producer did not set are absent)."""
        return self.model_dump(mode="json", exclude_unset=True)


class OnnxRecord(_Record):
    """What the export step did: exporter, task, opset, dtype, target and verification providers (and why a
    fallback), the optimizer's and quantizer's records, the graph's inputs, outputs and files."""

    exporter: str
    task: str
    with_past: bool
    opset: int | None
    dtype: str
    provider: str
    verified_on: str
    target_checked: bool
    fallback_reason: str | None
    optimization: dict[str, Any] | None
    quantization: dict[str, Any] | None
    inputs: list[str]
    outputs: list[str]
    files: list[str]
    model_bytes: int
    timings: dict[str, float]
    nodes: int | None = None
    """The genai exporter's graph: its node count and attention operators (`attention_nodes`)."""
    attention_nodes: int | None = None
    model_builder: dict[str, Any] | None = None
    """The genai exporter: the options onnxruntime-genai's model builder ran with."""
    genai_fallback: str | None = None
    """`exporter: auto` on a language model: why it did not take the genai exporter."""
