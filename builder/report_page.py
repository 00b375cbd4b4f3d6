"""Draws `builder.report.report_data` as one HTML page: a section per source model with its charts
(`builder.report_svg`) and a table of every figure; inline SVG and CSS, no script, nothing fetched.

Markup is written only as literal templates given to `builder.markup.html`, which escapes every value filled in
(names, paths, metrics, messages: all come from files anyone may have written); tests/unit/test_report.py holds this
module and report_svg to it.
"""

from __future__ import annotations

from builder.markup import Html, html, join
from builder.report_svg import bars, format_number, format_size, scatter

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { margin: 0 0 4px; } h2 { margin: 32px 0 4px; border-bottom: 1px solid #ddd; }
.muted { color: #666; } .charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg.chart { background: #fafafa; border: 1px solid #e4e4e4; }
svg text { font: 11px system-ui, sans-serif; fill: #333; } svg .title { font-size: 13px; font-weight: 600; }
.axis line, .axis path { stroke: #999; } .grid { stroke: #eee; }
.pt-passed { fill: #4c72b0; } .pt-pareto { fill: #dd8452; stroke: #222; stroke-width: 1.5; }
.pt-failed { fill: #fff; stroke: #c44e52; stroke-width: 2; stroke-dasharray: 3 2; } .cross { stroke: #c44e52; }
.front { fill: none; stroke: #dd8452; stroke-width: 2; stroke-dasharray: 5 3; }
.threshold { stroke: #c44e52; stroke-width: 1.5; stroke-dasharray: 7 4; } .threshold-label { fill: #c44e52; }
.source-line { stroke: #888; stroke-dasharray: 2 3; }
.bar-passed { fill: #4c72b0; } .bar-failed { fill: #fff; stroke: #c44e52; stroke-width: 2; stroke-dasharray: 3 2; }
.reference { stroke: #222; stroke-width: 2; }
table { border-collapse: collapse; margin-top: 12px; font-size: 13px; }
.table { overflow-x: auto; max-width: 100%; } /* a table wider than the page scrolls in its own box */
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th, td.text { white-space: normal; } th { vertical-align: bottom; min-width: 4em; }
th:first-child, td:first-child, td.text { text-align: left; } th { background: #f3f3f3; }
tr.failed td:first-child { border-left: 4px solid #c44e52; }
tr.pareto td:first-child { border-left: 4px solid #dd8452; }
td.miss { color: #c44e52; font-weight: 600; } .failures { color: #c44e52; white-space: normal; font-size: 12px; }
.legend svg { vertical-align: middle; }
"""


def render_html(data: dict) -> str:
    """The whole page."""
    count = sum(len(g["artifacts"]) for g in data["groups"])
    parts = [
        html(
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>builder report</title>'
            "<style>{css}</style></head><body>",
            css=Html(_CSS),
        ),
        Html("<h1>builder report: size vs quality</h1>"),
        html(
            '<p class="muted">{count} artifact(s) from {groups} source model(s); generated {generated}. '
            "Across: {across}; up: each gate metric measured against the source model. The Pareto front (no passing "
            "artifact is both smaller and better) is drawn among the passing builds.</p>",
            count=count,
            groups=len(data["groups"]),
            generated=data["generated_at"],
            across=data["x"]["label"],
        ),
        _legend(),
    ]
    if data["skipped"]:
        left_out = (html("{path}: {reason}", path=s["path"], reason=s["reason"]) for s in data["skipped"])
        parts.append(html('<p class="failures">Left out: {items}</p>', items=join(left_out, "; ")))
    parts += [_group(group, data["x"]) for group in data["groups"]]
    parts.append(Html("</body></html>\n"))
    return join(parts, "\n")


def _legend() -> Html:
    def mark(inner: Html) -> Html:
        return html('<svg width="18" height="14" aria-hidden="true">{inner}</svg>', inner=inner)

    return join(
        [
            Html('<p class="legend">'),
            mark(Html('<ellipse cx="9" cy="7" rx="5" ry="5" class="pt-passed"/>')),
            " passed ",
            mark(Html('<ellipse cx="9" cy="7" rx="5" ry="5" class="pt-pareto"/>')),
            " on the Pareto front ",
            mark(Html('<ellipse cx="9" cy="7" rx="5" ry="5" class="pt-failed"/>')),
            " failed verification ",
            mark(Html('<line x1="0" y1="7" x2="18" y2="7" class="threshold"/>')),
            " gate threshold ",
            mark(Html('<line x1="9" y1="0" x2="9" y2="14" class="source-line"/>')),
            " source model size",
            Html("</p>"),
        ]
    )


def _group(group: dict, axis: dict) -> Html:
    source = group["source"] or "unknown source"
    about = [group["task"] or "task unknown"]
    if group["source"] != group["model"]:  # a local folder: where it was read from
        about.append(f"from {group['source']}")
    about += [f"also {alias}" for alias in group["source_aliases"]]
    about += [f"revision {group['revision']}"] if group["revision"] else []
    if group["source_bytes"]:
        about.append(f"source weights {format_size(group['source_bytes'])}")
    if group["source"] is None:
        about.append("failed builds whose config.json matches no built artifact's")
    parts = [
        html('<section class="group" data-source="{source}">', source=source),
        html(
            '<h2>{model}</h2><p class="muted">{about}</p><div class="charts">',
            model=group["model"] or source,
            about="; ".join(about),
        ),
    ]
    parts += [scatter(group, chart, axis) for chart in group["charts"]]
    rows = [a for a in group["artifacts"] if not a["superseded"]]
    parts += _latency_charts(rows)
    if any(a["throughput_tokens_per_s"] is not None for a in rows):
        parts.append(
            bars(
                rows,
                "throughput_tokens_per_s",
                "reference_throughput_tokens_per_s",
                "throughput (tokens/s, higher is better)",
            )
        )
    parts.append(Html("</div>"))
    parts.append(_table(group))
    parts.append(Html("</section>"))
    return join(parts, "\n")


def _latency_charts(rows: list[dict]) -> list[Html]:
    """One latency chart per set of inputs the latency was timed on: a latency on other inputs (another length, another
    verifier) is not comparable, so it never shares an axis."""
    by_inputs: dict[str, list[dict]] = {}
    for row in rows:
        if row["latency_ms"] is not None:
            by_inputs.setdefault(row["latency_inputs_id"], []).append(row)
    note = "other inputs than the other latency charts: not comparable" if len(by_inputs) > 1 else None
    return [
        bars(
            rows,
            "latency_ms",
            "reference_latency_ms",
            f"latency per forward on {same[0]['latency_inputs']} (ms, lower is better)",
            note=note,
            only=same,
        )
        for same in by_inputs.values()
    ]


# --- table -----------------------------------------------------------------------------------------------------


def _table(group: dict) -> Html:
    quality = [c["metric"] for c in group["charts"]]
    others = sorted(
        {k for a in group["artifacts"] for k in a["metrics"]} - set(quality) - {"artifact_bytes", "bits_per_param"}
    )
    front = {name for chart in group["charts"] for name in chart["pareto"]}
    head = (
        ["artifact (card)", "status", "method", "size", "bits/param (quantized layers)", "bits/param (weights)"]
        + quality
        + others
        + ["latency ms", "source latency ms", "tokens/s", "device", "built"]
    )
    lines = [
        html(
            '<div class="table"><table><thead><tr>{cells}</tr></thead><tbody>',
            cells=join(html("<th>{h}</th>", h=join(h.split("_"), Html("_<wbr>"))) for h in head),
        )
    ]
    for a in group["artifacts"]:
        status = a["status"] + (" (superseded by a later passing build)" if a["superseded"] else "")
        css = "failed" if a["status"] == "failed" else ("pareto" if a["name"] in front else "passed")
        failures = join(html('<div class="failures">{m}</div>', m=m) for m in a["failures"])
        cells = [
            html('<td><a href="{card}">{name}</a></td>', card=a["card"], name=a["name"]),
            html('<td class="text">{status}{failures}</td>', status=status, failures=failures),
            html('<td class="text">{method}</td>', method=a["method"] or "-"),
            html("<td>{size}</td>", size=format_size(a["size_bytes"])),
            html("<td>{bits}</td>", bits=format_number(a["bits_per_param"])),
            html("<td>{bits}</td>", bits=format_number(a["weight_bits_per_param"])),
        ]
        for metric in quality + others:
            template = '<td class="miss">{value}</td>' if metric in a["failed_metrics"] else "<td>{value}</td>"
            cells.append(html(template, value=format_number(a["metrics"].get(metric))))
        cells += [
            html("<td>{value}</td>", value=format_number(a[k]))
            for k in ("latency_ms", "reference_latency_ms", "throughput_tokens_per_s")
        ]
        cells += [
            html('<td class="text">{device}</td>', device=str(a["device"] or "-")),
            html('<td class="text">{built}</td>', built=str(a["built_at"] or "-")),
        ]
        lines.append(
            html('<tr class="{css}" data-artifact="{name}">{cells}</tr>', css=css, name=a["name"], cells=join(cells))
        )
    lines.append(Html("</tbody></table></div>"))
    return join(lines, "\n")
