"""The charts of the report page (`builder.report_page`): a size vs quality scatter per gate metric, latency and
throughput bars; inline SVG.

Every mark a test (or a person's browser tools) may look for carries data attributes: a scatter point is
`<circle data-artifact=NAME data-status=passed|failed data-pareto=true|false>`, a gate threshold is
`<line class="threshold" data-value=...>`, a bar is `<rect data-artifact=NAME data-value=...>`.

Markup is written only as literal templates given to `builder.markup.html`, which escapes every value filled in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from builder.markup import Html, html, join

WIDTH, HEIGHT = 600, 360
# The right margin holds the threshold and point labels; the top one the source model's size above its line.
LEFT, RIGHT, TOP, BOTTOM = 72, 170, 40, 52
_LOG_DECADES = 12
# --- scatter ---------------------------------------------------------------------------------------------------


def scatter(group: dict, chart: dict, axis: dict) -> Html:
    metric, field = chart["metric"], axis["field"]
    drawn = [a for a in group["artifacts"] if not a["superseded"] and a[field] is not None and metric in a["metrics"]]
    missing = [a["name"] for a in group["artifacts"] if not a["superseded"] and a not in drawn]
    source_bytes = group["source_bytes"] if field == "size_bytes" else None
    across = [a[field] for a in drawn] + ([source_bytes] if source_bytes else [])
    values = [a["metrics"][metric] for a in drawn] + [t["value"] for t in chart["thresholds"]]
    if field == "size_bytes" and len({a[field] for a in drawn}) < 2:
        # One size alone says nothing against itself: from 0, it is read against the source model's line.
        x = _Axis(0, max(across or [1]) * 1.08, LEFT, WIDTH - RIGHT, log=False)
    else:
        x = _Axis.fitting(across or [1], LEFT, WIDTH - RIGHT, log=False)
    x.format = format_size if field == "size_bytes" else format_number
    y = _Axis.fitting(values, HEIGHT - BOTTOM, TOP, log=chart["better"] == "lower" and _spans_decades(values))
    short = _short_names([a["name"] for a in group["artifacts"]])
    title = f"{chart['label']} ({chart['better']} is better) vs {'size' if field == 'size_bytes' else 'bits'}"
    # How far right text reaches: the chart widens to hold its longest label (the plot area keeps its size).
    reach = [LEFT + text_width(title, 14)]
    out = [
        html("<title>{label} vs size</title>", label=chart["label"]),
        html('<text class="title" x="{x}" y="16">{title}</text>', x=LEFT, title=title),
        _x_axis(x, axis["label"]),
        _y_axis(y, chart["label"]),
    ]
    if source_bytes:
        # Labelled above the plot, beside its line (left of it, or right of it near the y axis): no gate label or
        # tick label is there.
        line_x = x(source_bytes)
        anchor, label_x = ("start", line_x + 4) if line_x < LEFT + 100 else ("end", line_x - 4)
        out.append(
            html(
                '<line class="source-line" data-value="{value}" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}">'
                "<title>source model: {size}</title></line>"
                '<text class="source-label" x="{label_x:.1f}" y="{label_y}" text-anchor="{anchor}">'
                "source {size}</text>",
                value=source_bytes,
                x=line_x,
                top=TOP - 10,
                bottom=HEIGHT - BOTTOM,
                size=format_size(source_bytes),
                label_x=label_x,
                label_y=TOP - 4,
                anchor=anchor,
            )
        )
    label_ys = _spread([y(t["value"]) for t in chart["thresholds"]], gap=12)
    for threshold, label_y in zip(chart["thresholds"], label_ys, strict=True):
        sign = "≥" if threshold["bound"] == "min" else "≤"
        names = threshold["artifacts"]
        if len(chart["thresholds"]) == 1:
            applies = ""  # one gate for all
        else:
            applies = " · " + (", ".join(short[n] for n in names) if len(names) <= 2 else f"{len(names)} artifacts")
        reach.append(WIDTH - RIGHT + 4 + text_width(f"gate {sign} {format_number(threshold['value'])}{applies}"))
        out.append(
            html(
                '<line class="threshold" data-value="{value}" x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}">'
                "<title>gate: {gate} {sign} {value} ({names})</title></line>"
                '<text class="threshold-label" x="{label_x}" y="{label_y:.1f}">gate {sign} {shown}{applies}</text>',
                value=threshold["value"],
                left=LEFT,
                right=WIDTH - RIGHT,
                y=y(threshold["value"]),
                gate=chart["gate"],
                sign=sign,
                names=", ".join(names),
                label_x=WIDTH - RIGHT + 4,
                label_y=label_y + 4,
                shown=format_number(threshold["value"]),
                applies=applies,
            )
        )
    front = sorted((a for a in drawn if a["name"] in chart["pareto"]), key=lambda a: a[field])
    if len(front) > 1:
        steps = []
        for here, after in zip(front, front[1:], strict=False):
            steps += [(x(here[field]), y(here["metrics"][metric])), (x(after[field]), y(here["metrics"][metric]))]
        steps.append((x(front[-1][field]), y(front[-1]["metrics"][metric])))
        out.append(
            html(
                '<polyline class="front" points="{points}"><title>Pareto front</title></polyline>',
                points=" ".join(f"{px:.1f},{py:.1f}" for px, py in steps),
            )
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
    for px, py, names in labels:  # left of a point near the right edge (when it fits), clear of the gate labels
        label = ", ".join(names)
        if px > WIDTH - RIGHT - 70 and px - 11 - text_width(label) >= 0:
            template = '<text x="{x:.1f}" text-anchor="end" y="{y:.1f}">{names}</text>'
            out.append(html(template, x=px - 11, y=py + 4, names=label))
        else:
            out.append(html('<text x="{x:.1f}" y="{y:.1f}">{names}</text>', x=px + 11, y=py + 4, names=label))
            reach.append(px + 11 + text_width(label))
    if missing:
        names = ", ".join(short[n] for n in missing)
        reach.append(LEFT + text_width(f"not drawn (no {axis['label']} or no {metric}): {names}"))
        out.append(
            html(
                '<text x="{x}" y="{y}">not drawn (no {across} or no {metric}): {names}</text>',
                x=LEFT,
                y=HEIGHT - 6,
                across=axis["label"],
                metric=metric,
                names=names,
            )
        )
    width = max(WIDTH, math.ceil(max(reach) + 8))
    svg = html(
        '<svg class="chart scatter" data-metric="{metric}" width="{width}" height="{height}" '
        'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" role="img">',
        metric=metric,
        width=width,
        height=HEIGHT,
    )
    return join([svg, *out, Html("</svg>")], "\n")


def _point(artifact: dict, metric: str, px: float, py: float, pareto: bool, across: str) -> Html:
    """The artifact's circle at (px, py); a failed build's is a wider dashed ring with a cross."""
    status = artifact["status"]
    css = "pt-failed" if status == "failed" else ("pt-pareto" if pareto else "pt-passed")
    tip = (
        f"{artifact['name']} ({status}{', Pareto front' if pareto else ''}): {across}, "
        f"{metric} {format_number(artifact['metrics'][metric])}"
    )
    mark = html(
        '<circle class="{css}" data-artifact="{name}" data-status="{status}" data-pareto="{pareto}" '
        'cx="{x:.1f}" cy="{y:.1f}" r="{r}"><title>{tip}</title></circle>',
        css=css,
        name=artifact["name"],
        status=status,
        pareto=str(pareto).lower(),
        x=px,
        y=py,
        r=9 if status == "failed" else 7 if pareto else 6,
        tip=tip,
    )
    if status == "failed":
        cross = html(
            '<path class="cross" d="M{left:.1f},{top:.1f}L{right:.1f},{bottom:.1f}M{left:.1f},{bottom:.1f}'
            'L{right:.1f},{top:.1f}"/>',
            left=px - 4,
            right=px + 4,
            top=py - 4,
            bottom=py + 4,
        )
        mark = join([mark, cross])
    return mark


def _x_axis(x: _Axis, label: str) -> Html:
    base = HEIGHT - BOTTOM
    parts = [
        html(
            '<g class="axis"><line x1="{left}" y1="{y}" x2="{right}" y2="{y}"/>', left=LEFT, right=WIDTH - RIGHT, y=base
        )
    ]
    for tick, shown in x.tick_labels():
        parts.append(
            html(
                '<line class="grid" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{y}"/>'
                '<text x="{x:.1f}" y="{text_y}" text-anchor="middle">{tick}</text>',
                x=x(tick),
                top=TOP,
                y=base,
                text_y=base + 16,
                tick=shown,
            )
        )
    parts.append(
        html(
            '<text x="{x}" y="{y}" text-anchor="middle">{label}</text></g>',
            x=(LEFT + WIDTH - RIGHT) / 2,
            y=base + 36,
            label=label,
        )
    )
    return join(parts)


def _y_axis(y: _Axis, label: str) -> Html:
    parts = [
        html(
            '<g class="axis"><line x1="{x}" y1="{top}" x2="{x}" y2="{bottom}"/>',
            x=LEFT,
            top=TOP,
            bottom=HEIGHT - BOTTOM,
        )
    ]
    for tick, shown in y.tick_labels():
        parts.append(
            html(
                '<line class="grid" x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>'
                '<text x="{text_x}" y="{text_y:.1f}" text-anchor="end">{tick}</text>',
                left=LEFT,
                right=WIDTH - RIGHT,
                y=y(tick),
                text_x=LEFT - 6,
                text_y=y(tick) + 4,
                tick=shown,
            )
        )
    parts.append(
        html(
            '<text transform="translate(14 {middle}) rotate(-90)" text-anchor="middle">{label}</text></g>',
            middle=(TOP + HEIGHT - BOTTOM) / 2,
            label=label + (" (log)" if y.log else ""),
        )
    )
    return join(parts)


class _Axis:
    """Maps values in [lo, hi] to pixels [start, end], linearly or by log10 (all values > 0)."""

    def __init__(self, lo: float, hi: float, start: float, end: float, *, log: bool):
        if hi <= lo:
            lo, hi = (lo / 2, lo * 2) if log else (lo - 1, hi + 1)
        self.lo, self.hi, self.start, self.end, self.log = lo, hi, start, end, log
        self.format: Callable[..., str] = format_number  # tick labels

    @classmethod
    def fitting(cls, values: list[float], start: float, end: float, *, log: bool) -> _Axis:
        if log:
            positive = [v for v in values if v > 0]
            # At most _LOG_DECADES decades: a tinier value (a KL of 1e-300) sits on the floor, like a measured 0.
            hi = max(positive) * 2
            return cls(max(min(positive) / 2, hi / 10**_LOG_DECADES), hi, start, end, log=True)
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

    def tick_labels(self) -> list[tuple[float, str]]:
        """The ticks with labels precise enough to tell neighbours apart (0.9999, 0.99995, 1 rather than 1, 1, 1)."""
        ticks = self.ticks()
        for digits in range(4, 13):
            labels = [self.format(tick, digits) for tick in ticks]
            if len(set(labels)) == len(labels):
                break
        return list(zip(ticks, labels, strict=True))

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


def bars(
    rows: list[dict],
    field: str,
    reference_field: str,
    title: str,
    *,
    note: str | None = None,
    only: list[dict] | None = None,
) -> Html:
    """A bar per row that measured `field` (of those in `only`, when given; names are shortened against all `rows`,
    as in the other charts), with the source model's figure from the same run as a black tick. Three columns: the
    names (as wide as the longest), the bars, and the figures ("38 · source 30"), so no text crosses a bar or a tick
    whatever the values."""
    shown = [r for r in (rows if only is None else only) if r[field] is not None]
    short = _short_names([r["name"] for r in rows])
    figures = {
        r["name"]: format_number(r[field])
        + ("" if r[reference_field] is None else f" · source {format_number(r[reference_field])}")
        for r in shown
    }
    row_height, bar_width, first_row = 24, 300, 36
    left = 12 + max(text_width(short[r["name"]]) for r in shown)
    right = left + bar_width + 8 + max(text_width(f) for f in figures.values()) + 12
    footer = "black tick: the source model in the same verification run"
    lines = [footer] + ([note] if note else [])
    width = math.ceil(max(right, 24 + max(text_width(t) for t in lines), 24 + text_width(title, 14)))
    height = first_row + 8 + row_height * len(shown) + 16 * len(lines) + 14
    top = max([r[field] for r in shown] + [r[reference_field] or 0 for r in shown])
    x = _Axis(0, top * 1.1 or 1, left, left + bar_width, log=False)
    out = [
        html(
            '<svg class="chart bars" data-field="{field}" width="{width}" height="{height}" '
            'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" role="img">',
            field=field,
            width=width,
            height=height,
        ),
        html('<title>{title}</title><text class="title" x="12" y="16">{title}</text>', title=title),
    ]
    for index, r in enumerate(shown):
        by = first_row + index * row_height
        bar = x(r[field]) - left
        out.append(
            html(
                '<text x="{label_x}" y="{text_y}" text-anchor="end">{short}</text>'
                '<rect class="bar-{status}" data-artifact="{name}" data-status="{status}" data-value="{value}" '
                'x="{x}" y="{y}" width="{width:.1f}" height="{height}">'
                "<title>{name}: {shown} on {device}</title></rect>"
                '<text class="figure" x="{value_x}" y="{text_y}">{figures}</text>',
                label_x=left - 6,
                text_y=by + 14,
                short=short[r["name"]],
                status=r["status"],
                name=r["name"],
                value=r[field],
                x=left,
                y=by,
                width=max(bar, 1),
                height=row_height - 6,
                shown=format_number(r[field]),
                device=str(r["device"]),
                value_x=left + bar_width + 8,
                figures=figures[r["name"]],
            )
        )
        if r[reference_field] is not None:
            out.append(
                html(
                    '<line class="reference" data-value="{value}" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}">'
                    "<title>source model, same run: {shown}</title></line>",
                    value=r[reference_field],
                    x=x(r[reference_field]),
                    top=by - 2,
                    bottom=by + row_height - 4,
                    shown=format_number(r[reference_field]),
                )
            )
    for index, line in enumerate(lines):
        out.append(html('<text x="12" y="{y}">{line}</text>', y=height - 8 - 16 * (len(lines) - 1 - index), line=line))
    out.append(Html("</svg>"))
    return join(out, "\n")


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


def text_width(text: str, font_px: float = 11) -> float:
    """A generous estimate of `text`'s drawn width in pixels (system-ui; wide letters count more), so a chart sized
    by it holds its labels."""
    wide = sum(1 for c in text if c.isupper() or c in "mwMW@%")
    return font_px * (0.62 * len(text) + 0.3 * wide)


def format_size(n: float | None, digits: int = 3) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}g} {unit}"
    return f"{n:.0f} B"


def format_number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:.{digits}g}"
