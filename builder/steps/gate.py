"""The gate's shared parts: the report file, the failure message and the report's printed forms.

Both gates use them: `builder.steps.verify` (bitsandbytes artifacts reloaded by stock transformers) and
`builder.steps.verify_onnx` (ONNX graphs on onnxruntime). The metric table is `builder.gates`; the evaluation data
`builder.evaluation`.
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.gates import GATES, gate_of_metric, number
from builder.verification import VerificationReport

REPORT_FILE = "verify-report.json"


def failure_message(name: str, report: VerificationReport) -> str:
    """One line per missed metric, then what to do."""
    lines = [f"{name}: verification failed on {report.device}:"]
    lines += [f"  {failure.message}" for failure in report.failures]
    kept = "The artifact was not installed (build with --keep-failed to keep it and its verify-report.json)."
    if all(failure.metric == "placement" for failure in report.failures):
        lines.append(kept)  # the placement failure says what to do; no threshold would change it
    else:
        lines.append(
            f"{kept} Check the quantization settings (e.g. skip_modules for sensitive layers, quant_type, "
            "double_quant), or, if this loss is acceptable, relax the named thresholds under `verify.thresholds`."
        )
    return "\n".join(lines)


def write_report(folder: Path, report: VerificationReport) -> None:
    (folder / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")


def format_report(report: VerificationReport) -> str:
    """The report as a few human-readable lines (what `builder verify` prints)."""
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [f"verification {verdict} ({report.task} on {report.device})"]
    for name, value in report.metrics.items():
        gate = gate_of_metric(name)
        bound = f"  (threshold {report.thresholds[gate.key]})" if gate and gate.key in report.thresholds else ""
        lines.append(f"  {name:<28} {value:.6g}{bound}" if isinstance(value, float) else f"  {name:<28} {value}")
    for name, performance in report.performance.items():
        lines.append(f"  {name:<34} {performance}")
    if report.placement is not None:
        lines.append(f"  nodes by provider (session on {report.placement.measured_on}):")
        lines += [f"    {line}" for line in report.placement.summary()]
    lines += [f"missed: {failure.message}" for failure in report.failures]
    return "\n".join(lines)


def format_summary(report: VerificationReport) -> str:
    """The gated metrics against their thresholds, one line each (what `builder build` prints after a build)."""
    cached = report.reference is not None and report.reference.cached
    lines = [
        f"  gate {'passed' if report.passed else 'failed'} on {report.device}"
        + (" (reference from the cache)" if cached else "")
    ]
    for key, bound in report.thresholds.items():
        gate = GATES[key]
        value = report.metrics.get(gate.metric)
        if value is not None:
            lines.append(f"    {gate.metric:<20} {number(value):>8}  {gate.sign} {number(bound)}")
    return "\n".join(lines)
