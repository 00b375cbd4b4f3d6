"""The gate's shared parts: the report file, the failure message and the report's printed forms.

Both gates use them: `builder.steps.verify` (bitsandbytes artifacts reloaded by stock transformers) and
`builder.steps.verify_onnx` (ONNX graphs on onnxruntime). The metric table is `builder.gates`; the evaluation data
`builder.evaluation`.
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.artifact import NodePlacement
from builder.gates import GATES, gate_of_metric, number

REPORT_FILE = "verify-report.json"


def failure_message(name: str, report: dict) -> str:
    """One line per missed metric, then what to do."""
    lines = [f"{name}: verification failed on {report['device']}:"]
    lines += [f"  {failure['message']}" for failure in report["failures"]]
    kept = "The artifact was not installed (build with --keep-failed to keep it and its verify-report.json)."
    if all(failure["metric"] == "placement" for failure in report["failures"]):
        lines.append(kept)  # the placement failure says what to do; no threshold would change it
    else:
        lines.append(
            f"{kept} Check the quantization settings (e.g. skip_modules for sensitive layers, quant_type, "
            "double_quant), or, if this loss is acceptable, relax the named thresholds under `verify.thresholds`."
        )
    return "\n".join(lines)


def write_report(folder: Path, report: dict) -> None:
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def format_report(report: dict) -> str:
    """The report as a few human-readable lines (what `builder verify` prints)."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [f"verification {verdict} ({report['task']} on {report['device']})"]
    for name, value in report["metrics"].items():
        gate = gate_of_metric(name)
        bound = f"  (threshold {report['thresholds'][gate.key]})" if gate and gate.key in report["thresholds"] else ""
        lines.append(f"  {name:<28} {value:.6g}{bound}" if isinstance(value, float) else f"  {name:<28} {value}")
    for name, value in report["performance"].items():
        lines.append(f"  {name:<34} {value}")
    if report.get("placement"):
        placement = NodePlacement.model_validate(report["placement"])
        lines.append(f"  nodes by provider (session on {placement.measured_on}):")
        lines += [f"    {line}" for line in placement.summary()]
    lines += [f"missed: {failure['message']}" for failure in report["failures"]]
    return "\n".join(lines)


def format_summary(report: dict) -> str:
    """The gated metrics against their thresholds, one line each (what `builder build` prints after a build)."""
    lines = [
        f"  gate {'passed' if report.get('passed') else 'failed'} on {report.get('device')}"
        + (" (reference from the cache)" if (report.get("reference") or {}).get("cached") else "")
    ]
    for key, bound in (report.get("thresholds") or {}).items():
        gate = GATES[key]
        value = (report.get("metrics") or {}).get(gate.metric)
        if value is not None:
            lines.append(f"    {gate.metric:<20} {number(value):>8}  {gate.sign} {number(bound)}")
    return "\n".join(lines)
