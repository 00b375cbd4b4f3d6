"""Draws `builder.report.report_data` as one HTML page: inline SVG and CSS, no script, nothing fetched.

Every mark a test (or a person's browser tools) may look for carries data attributes: a scatter point is
`<circle data-artifact=NAME data-status=passed|failed data-pareto=true|false>`, a gate threshold is
`<line class="threshold" data-value=...>`, a bar is `<rect data-artifact=NAME data-value=...>`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape

WIDTH, HEIGHT = 600, 360
LEFT, RIGHT, TOP, BOTTOM = 72, 170, 24, 52  # the right margin holds the threshold and point labels
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
table { border-collapse: collapse; margin-top: 12px; font-size: 13px; } .table { overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
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
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>builder report</title>'
        f"<style>{_CSS}</style></head><body>",
        "<h1>builder report: size vs quality</h1>",
        f'<p class="muted">{count} artifact(s) from {len(data["groups"])} source model(s); generated '
        f"{escape(data['generated_at'])}. Across: {escape(data['x']['label'])}; up: each gate metric measured "
        "against the source model. The Pareto front (no passing artifact is both smaller and better) is "
        "drawn among the passing builds.</p>",
        _legend(),
    ]
    if data["skipped"]:
        parts.append(
            '<p class="failures">Left out: '
            + "; ".join(f"{escape(s['path'])}: {escape(s['reason'])}" for s in data["skipped"])
            + "</p>"
        )
    parts += [_group(group, data["x"]) for group in data["groups"]]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _legend() -> str:
    def mark(inner: str) -> str:
        return f'<svg width="18" height="14" aria-hidden="true">{inner}</svg>'

    return (
        '<p class="legend">'
        + mark('<ellipse cx="9" cy="7" rx="5" ry="5" class="pt-passed"/>')
        + " passed "
        + mark('<ellipse cx="9" cy="7" rx="5" ry="5" class="pt-pareto"/>')
        + " on the Pareto front "
        + mark('<ellipse cx="9" cy="7" rx="5" ry="5" class="pt-failed"/>')
        + " failed verification "
        + mark('<line x1="0" y1="7" x2="18" y2="7" class="threshold"/>')
        + " gate threshold "
        + mark('<line x1="9" y1="0" x2="9" y2="14" class="source-line"/>')
        + " source model size</p>"
    )


def _group(group: dict, axis: dict) -> str:
    source = group["source"] or "unknown source"
    about = [group["task"] or "task unknown"] + [f"also {alias}" for alias in group["source_aliases"]]
    about += [f"revision {group['revision']}"] if group["revision"] else []
    if group["source_bytes"]:
        about.append(f"source weights {_size(group['source_bytes'])}")
    if group["source"] is None:
        about.append("failed builds whose config.json matches no built artifact's")
    parts = [
        f'<section class="group" data-source="{escape(source)}">',
        f'<h2>{escape(source)}</h2><p class="muted">{escape("; ".join(about))}</p><div class="charts">',
    ]
    parts += [_scatter(group, chart, axis) for chart in group["charts"]]
    rows = [a for a in group["artifacts"] if not a["superseded"]]
    if any(a["latency_ms"] is not None for a in rows):
        parts.append(_bars(rows, "latency_ms", "reference_latency_ms", "latency per forward (ms, lower is better)"))
    if any(a["throughput_tokens_per_s"] is not None for a in rows):
        parts.append(
            _bars(
                rows,
                "throughput_tokens_per_s",
                "reference_throughput_tokens_per_s",
                "throughput (tokens/s, higher is better)",
            )
        )
    parts.append("</div>")
    parts.append(_table(group))
    parts.append("</section>")
    return "\n".join(parts)


# --- scatter ---------------------------------------------------------------------------------------------------


def _scatter(group: dict, chart: dict, axis: dict) -> str:
    metric, field = chart["metric"], axis["field"]
    drawn = [a for a in group["artifacts"] if not a["superseded"] and a[field] is not None and metric in a["metrics"]]
    missing = [a["name"] for a in group["artifacts"] if not a["superseded"] and a not in drawn]
    source_bytes = group["source_bytes"] if field == "size_bytes" else None
    across = [a[field] for a in drawn] + ([source_bytes] if source_bytes else [])
    values = [a["metrics"][metric] for a in drawn] + [t["value"] for t in chart["thresholds"]]
    x = _Axis.fitting(across or [1], LEFT, WIDTH - RIGHT, log=False)
    x.format = _size if field == "size_bytes" else _number
    y = _Axis.fitting(values, HEIGHT - BOTTOM, TOP, log=chart["better"] == "lower" and _spans_decades(values))
    short = _short_names([a["name"] for a in group["artifacts"]])
    out = [
        f'<svg class="chart scatter" data-metric="{metric}" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg" role="img">',
        f"<title>{escape(chart['label'])} vs size</title>",
        f'<text class="title" x="{LEFT}" y="16">{escape(chart["label"])} '
        f"({chart['better']} is better) vs {'size' if field == 'size_bytes' else 'bits'}</text>",
        _x_axis(x, axis["label"]),
        _y_axis(y, chart["label"]),
    ]
    if source_bytes:
        sx = x(source_bytes)
        out.append(
            f'<line class="source-line" x1="{sx:.1f}" y1="{TOP}" x2="{sx:.1f}" y2="{HEIGHT - BOTTOM}">'
            f"<title>source model: {_size(group['source_bytes'])}</title></line>"
        )
    label_ys = _spread([y(t["value"]) for t in chart["thresholds"]], gap=12)
    for threshold, label_y in zip(chart["thresholds"], label_ys, strict=True):
        ty = y(threshold["value"])
        sign = "≥" if threshold["bound"] == "min" else "≤"
        names = threshold["artifacts"]
        if len(chart["thresholds"]) == 1:
            applies = ""  # one gate for all
        else:
            applies = " · " + (", ".join(short[n] for n in names) if len(names) <= 2 else f"{len(names)} artifacts")
        out.append(
            f'<line class="threshold" data-value="{threshold["value"]}" x1="{LEFT}" y1="{ty:.1f}" '
            f'x2="{WIDTH - RIGHT}" y2="{ty:.1f}"><title>gate: {chart["gate"]} {sign} {threshold["value"]} '
            f"({', '.join(threshold['artifacts'])})</title></line>"
            f'<text class="threshold-label" x="{WIDTH - RIGHT + 4}" y="{label_y + 4:.1f}">gate {sign} '
            f"{_number(threshold['value'])}{escape(applies)}</text>"
        )
    front = sorted((a for a in drawn if a["name"] in chart["pareto"]), key=lambda a: a[field])
    if len(front) > 1:
        steps = []
        for here, after in zip(front, front[1:], strict=False):
            steps += [(x(here[field]), y(here["metrics"][metric])), (x(after[field]), y(here["metrics"][metric]))]
        steps.append((x(front[-1][field]), y(front[-1]["metrics"][metric])))
        out.append(
            '<polyline class="front" points="'
            + " ".join(f"{px:.1f},{py:.1f}" for px, py in steps)
            + '"><title>Pareto front</title></polyline>'
        )
    # Failed rings first, so a passing point on the same spot stays visible inside one; one label per spot.
    labels: list[tuple[float, float, list[str]]] = []
    for a in sorted(drawn, key=lambda a: a["status"] != "failed"):
        px, py = x(a[field]), y(a["metrics"][metric])
        out.append(_point(a, metric, px, py, a["name"] in chart["pareto"], x.format(a[field])))
        spot = next((names for lx, ly, names in labels if abs(lx - px) < 8 and abs(ly - py) < 8), None)
        if spot is None:
            labels.append((px, py, [short[a["name"]]]))
        else:
            spot.append(short[a["name"]])
    for px, py, names in labels:  # left of a point near the right edge, clear of the threshold labels
        side = f'x="{px - 11:.1f}" text-anchor="end"' if px > WIDTH - RIGHT - 70 else f'x="{px + 11:.1f}"'
        out.append(f'<text {side} y="{py + 4:.1f}">{escape(", ".join(names))}</text>')
    if missing:
        out.append(
            f'<text x="{LEFT}" y="{HEIGHT - 6}">not drawn (no {escape(axis["label"])} or no {metric}): '
            f"{escape(', '.join(short[n] for n in missing))}</text>"
        )
    out.append("</svg>")
    return "\n".join(out)


def _point(artifact: dict, metric: str, px: float, py: float, pareto: bool, across: str) -> str:
    """The artifact's circle at (px, py); a failed build's is a wider dashed ring with a cross."""
    status = artifact["status"]
    css = "pt-failed" if status == "failed" else ("pt-pareto" if pareto else "pt-passed")
    tip = (
        f"{artifact['name']} ({status}{', Pareto front' if pareto else ''}): {across}, "
        f"{metric} {_number(artifact['metrics'][metric])}"
    )
    mark = (
        f'<circle class="{css}" data-artifact="{escape(artifact["name"])}" data-status="{status}" '
        f'data-pareto="{str(pareto).lower()}" cx="{px:.1f}" cy="{py:.1f}" '
        f'r="{9 if status == "failed" else 7 if pareto else 6}"><title>{escape(tip)}</title></circle>'
    )
    if status == "failed":
        mark += (
            f'<path class="cross" d="M{px - 4:.1f},{py - 4:.1f}L{px + 4:.1f},{py + 4:.1f}'
            f'M{px - 4:.1f},{py + 4:.1f}L{px + 4:.1f},{py - 4:.1f}"/>'
        )
    return mark


def _x_axis(x: _Axis, label: str) -> str:
    base = HEIGHT - BOTTOM
    parts = [f'<g class="axis"><line x1="{LEFT}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}"/>']
    for tick in x.ticks():
        tx = x(tick)
        parts.append(
            f'<line class="grid" x1="{tx:.1f}" y1="{TOP}" x2="{tx:.1f}" y2="{base}"/>'
            f'<text x="{tx:.1f}" y="{base + 16}" text-anchor="middle">{x.format(tick)}</text>'
        )
    parts.append(
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{base + 36}" text-anchor="middle">{escape(label)}</text></g>'
    )
    return "".join(parts)


def _y_axis(y: _Axis, label: str) -> str:
    parts = [f'<g class="axis"><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}"/>']
    for tick in y.ticks():
        ty = y(tick)
        parts.append(
            f'<line class="grid" x1="{LEFT}" y1="{ty:.1f}" x2="{WIDTH - RIGHT}" y2="{ty:.1f}"/>'
            f'<text x="{LEFT - 6}" y="{ty + 4:.1f}" text-anchor="end">{_number(tick)}</text>'
        )
    middle = (TOP + HEIGHT - BOTTOM) / 2
    parts.append(
        f'<text transform="translate(14 {middle}) rotate(-90)" text-anchor="middle">'
        f"{escape(label)}{' (log)' if y.log else ''}</text></g>"
    )
    return "".join(parts)


class _Axis:
    """Maps values in [lo, hi] to pixels [start, end], linearly or by log10 (all values > 0)."""

    def __init__(self, lo: float, hi: float, start: float, end: float, *, log: bool):
        if hi <= lo:
            lo, hi = (lo / 2, lo * 2) if log else (lo - 1, hi + 1)
        self.lo, self.hi, self.start, self.end, self.log = lo, hi, start, end, log
        self.format: Callable[..., str] = _number  # tick labels

    @classmethod
    def fitting(cls, values: list[float], start: float, end: float, *, log: bool) -> _Axis:
        if log:
            positive = [v for v in values if v > 0]
            return cls(min(positive) / 2, max(positive) * 2, start, end, log=True)
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 0.5
        return cls(lo - pad, hi + pad, start, end, log=False)

    def __call__(self, value: float) -> float:
        if self.log:
            # A measured 0 (an exact match) sits on the axis' floor.
            value = math.log10(max(value, self.lo))
            lo, hi = math.log10(self.lo), math.log10(self.hi)
        else:
            lo, hi = self.lo, self.hi
        return self.start + (value - lo) / (hi - lo) * (self.end - self.start)

    def ticks(self) -> list[float]:
        if self.log:
            return [10.0**e for e in range(math.ceil(math.log10(self.lo)), math.floor(math.log10(self.hi)) + 1)]
        raw = (self.hi - self.lo) / 5
        magnitude = 10 ** math.floor(math.log10(raw))
        step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
        first = math.ceil(self.lo / step) * step
        return [round(first + i * step, 12) for i in range(int((self.hi - first) / step) + 1)]


def _spread(positions: list[float], gap: float) -> list[float]:
    """`positions` moved apart until neighbours are `gap` pixels apart or more (labels that would overlap)."""
    order = sorted(range(len(positions)), key=lambda i: positions[i])
    placed = list(positions)
    for before, after in zip(order, order[1:], strict=False):
        placed[after] = max(placed[after], placed[before] + gap)
    return placed


def _spans_decades(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) >= 2 and max(positive) / min(positive) >= 100


# --- bars ------------------------------------------------------------------------------------------------------


def _bars(rows: list[dict], field: str, reference_field: str, title: str) -> str:
    shown = [r for r in rows if r[field] is not None]
    # Latency is timed on what each verifier feeds (transformers: a fixed number of tokens at batch 1; ONNX Runtime:
    # the verification inputs); say so on each bar when one chart mixes them.
    mixed = len({r["latency_basis"] for r in shown}) > 1 and field == "latency_ms"
    short = _short_names([r["name"] for r in rows])
    row_height, left, width = 24, 130, WIDTH
    height = TOP + 20 + row_height * len(shown) + 30
    top = max([r[field] for r in shown] + [r[reference_field] or 0 for r in shown])
    x = _Axis(0, top * 1.1 or 1, left, width - 60, log=False)
    out = [
        f'<svg class="chart bars" data-field="{field}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" role="img">',
        f'<title>{escape(title)}</title><text class="title" x="{left}" y="16">{escape(title)}</text>',
    ]
    for index, r in enumerate(shown):
        by = TOP + 12 + index * row_height
        bar = x(r[field]) - left
        basis = escape(f" ({r['latency_basis']})") if mixed else ""
        out.append(
            f'<text x="{left - 6}" y="{by + 14}" text-anchor="end">{escape(short[r["name"]])}</text>'
            f'<rect class="bar-{r["status"]}" data-artifact="{escape(r["name"])}" '
            f'data-status="{r["status"]}" data-value="{r[field]}" x="{left}" y="{by}" '
            f'width="{max(bar, 1):.1f}" height="{row_height - 6}"><title>{escape(r["name"])}: '
            f"{_number(r[field])} on {escape(str(r['device']))}</title></rect>"
            f'<text x="{left + bar + 4:.1f}" y="{by + 14}">{_number(r[field])}{basis}</text>'
        )
        if r[reference_field] is not None:
            rx = x(r[reference_field])
            out.append(
                f'<line class="reference" x1="{rx:.1f}" y1="{by - 2}" x2="{rx:.1f}" '
                f'y2="{by + row_height - 4}"><title>source model, same run: {_number(r[reference_field])}'
                "</title></line>"
            )
    out.append(
        f'<text x="{left}" y="{height - 8}">black tick: the source model in the same verification run</text></svg>'
    )
    return "\n".join(out)


# --- table -----------------------------------------------------------------------------------------------------


def _table(group: dict) -> str:
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
        '<div class="table"><table><thead><tr>'
        + "".join(f"<th>{escape(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
    ]
    for a in group["artifacts"]:
        status = a["status"] + (" (superseded by a later passing build)" if a["superseded"] else "")
        css = "failed" if a["status"] == "failed" else ("pareto" if a["name"] in front else "passed")
        cells = [
            f'<td><a href="{escape(a["card"])}">{escape(a["name"])}</a></td>',
            f'<td class="text">{escape(status)}'
            + "".join(f'<div class="failures">{escape(m)}</div>' for m in a["failures"])
            + "</td>",
            f'<td class="text">{escape(a["method"] or "-")}</td>',
            f"<td>{_size(a['size_bytes'])}</td>",
            f"<td>{_number(a['bits_per_param'])}</td>",
            f"<td>{_number(a['weight_bits_per_param'])}</td>",
        ]
        for metric in quality + others:
            miss = ' class="miss"' if metric in a["failed_metrics"] else ""
            cells.append(f"<td{miss}>{_number(a['metrics'].get(metric))}</td>")
        cells += [
            f"<td>{_number(a[k])}</td>" for k in ("latency_ms", "reference_latency_ms", "throughput_tokens_per_s")
        ]
        cells += [
            f'<td class="text">{escape(str(a["device"] or "-"))}</td>',
            f'<td class="text">{escape(str(a["built_at"] or "-"))}</td>',
        ]
        lines.append(f'<tr class="{css}" data-artifact="{escape(a["name"])}">' + "".join(cells) + "</tr>")
    lines.append("</tbody></table></div>")
    return "\n".join(lines)


# --- formatting ------------------------------------------------------------------------------------------------


def _short_names(names: list[str]) -> dict[str, str]:
    """Names without the prefix (up to a '-') they all share: `smollm2-135m-instruct-int8` -> `int8`."""
    if len(set(names)) < 2:
        return {n: n for n in names}
    shared = names[0]
    for name in names[1:]:
        while not name.startswith(shared):
            shared = shared[:-1]
    cut = shared.rfind("-") + 1
    return {n: n[cut:] or n for n in names}


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:.4g}"
