"""Charts drawn on the server as inline SVG: nothing to download, nothing from a CDN.

Each function returns markup that stands alone (`role="img"`, a title and a description a
screen reader reads); every bar and point carries a `<title>`, which browsers show on hover.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 560, 190
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 26
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

STATUS_COLOURS = {
    "succeeded": "#2e8540",
    "needs_review": "#c98d00",
    "failed": "#d0342c",
    "cancelled": "#8a8f98",
}
SERIES_COLOURS = ("#017cee", "#8a3ffc", "#d0342c")
"""Airflow's blue first."""

Format = Callable[[float], str]


def _fmt_number(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _svg(label: str, description: str, body: list[str], height: int = HEIGHT) -> Markup:
    title = escape(label)
    return Markup(
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" '
        f'role="img" aria-label="{title}"><title>{title}</title><desc>{escape(description)}</desc>'
        + "".join(body)
        + "</svg>"
    )


def _y_axis(top_value: float, fmt: Format) -> list[str]:
    parts = []
    for fraction in (0.0, 0.5, 1.0):
        y = TOP + PLOT_H - fraction * PLOT_H
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(fmt(top_value * fraction))}</text>"
        )
    return parts


def _x_labels(days: Sequence[date]) -> list[str]:
    if not days:
        return []
    picks = sorted({0, len(days) // 2, len(days) - 1})
    step = PLOT_W / len(days)
    return [
        f'<text class="tick" x="{LEFT + (i + 0.5) * step:.1f}" y="{HEIGHT - 8}" '
        f'text-anchor="middle">{days[i]:%b %d}</text>'
        for i in picks
    ]


def _nice_max(value: float) -> float:
    return value * 1.1 if value > 0 else 1.0


def bar_chart(label: str, days: Sequence[date], values: Sequence[float], fmt: Format) -> Markup:
    """Draw one bar per day."""
    top = _nice_max(max(values, default=0.0))
    step = PLOT_W / max(1, len(days))
    body = _y_axis(top, fmt)
    for i, (day, value) in enumerate(zip(days, values, strict=True)):
        h = value / top * PLOT_H
        body.append(
            f'<rect class="bar" x="{LEFT + i * step + step * 0.15:.1f}" y="{TOP + PLOT_H - h:.1f}" '
            f'width="{step * 0.7:.1f}" height="{h:.1f}" fill="{SERIES_COLOURS[0]}">'
            f"<title>{day:%Y-%m-%d}: {escape(fmt(value))}</title></rect>"
        )
    body += _x_labels(days)
    total = sum(values)
    return _svg(label, f"{len(days)} days, total {fmt(total)}", body)


def stacked_bar_chart(
    label: str, days: Sequence[date], series: Mapping[str, Sequence[int]]
) -> Markup:
    """Draw one bar per day, stacked by series (e.g. tasks by terminal status)."""
    totals = [sum(values[i] for values in series.values()) for i in range(len(days))]
    top = _nice_max(float(max(totals, default=0)))
    step = PLOT_W / max(1, len(days))
    body = _y_axis(top, _fmt_number)
    for i, day in enumerate(days):
        base = 0.0
        for name, values in series.items():
            value = values[i]
            if not value:
                continue
            h = value / top * PLOT_H
            y = TOP + PLOT_H - (base + value) / top * PLOT_H
            body.append(
                f'<rect class="bar" x="{LEFT + i * step + step * 0.15:.1f}" y="{y:.1f}" '
                f'width="{step * 0.7:.1f}" height="{h:.1f}" '
                f'fill="{STATUS_COLOURS.get(name, SERIES_COLOURS[1])}">'
                f"<title>{day:%Y-%m-%d}: {value} {escape(name)}</title></rect>"
            )
            base += value
    body += _x_labels(days)
    sums = ", ".join(f"{sum(v)} {k}" for k, v in series.items())
    return _svg(label, f"{len(days)} days: {sums}", body)


def line_chart(
    label: str,
    days: Sequence[date],
    series: Mapping[str, Sequence[float | None]],
    fmt: Format,
    top: float | None = None,
) -> Markup:
    """Draw one line per series over the days; a day without a value breaks the line."""
    found = [v for values in series.values() for v in values if v is not None]
    top = top if top is not None else _nice_max(max(found, default=0.0))
    step = PLOT_W / max(1, len(days))
    body = _y_axis(top, fmt)
    for colour, (name, values) in zip(SERIES_COLOURS, series.items(), strict=False):
        segments: list[list[str]] = [[]]
        for i, value in enumerate(values):
            if value is None:
                if segments[-1]:
                    segments.append([])
                continue
            x, y = LEFT + (i + 0.5) * step, TOP + PLOT_H - min(value, top) / top * PLOT_H
            segments[-1].append(f"{x:.1f},{y:.1f}")
            body.append(
                f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}">'
                f"<title>{days[i]:%Y-%m-%d} {escape(name)}: {escape(fmt(value))}</title></circle>"
            )
        body += [
            f'<polyline class="line" points="{" ".join(points)}" fill="none" '
            f'stroke="{colour}" stroke-width="1.8"/>'
            for points in segments
            if len(points) >= 2
        ]
    body += _x_labels(days)
    legend = " · ".join(series)
    return _svg(label, f"{legend} over {len(days)} days", body)


def histogram(label: str, bins: Sequence[int], threshold: float | None, missing: int = 0) -> Markup:
    """Draw a histogram over 0..1 with `threshold` (the review threshold) marked."""
    top = _nice_max(float(max(bins, default=0)))
    step = PLOT_W / max(1, len(bins))
    body = _y_axis(top, _fmt_number)
    for i, count in enumerate(bins):
        lo, hi = i / len(bins), (i + 1) / len(bins)
        below = threshold is not None and hi <= threshold
        h = count / top * PLOT_H
        body.append(
            f'<rect class="bar" x="{LEFT + i * step + 1:.1f}" y="{TOP + PLOT_H - h:.1f}" '
            f'width="{step - 2:.1f}" height="{h:.1f}" '
            f'fill="{STATUS_COLOURS["needs_review"] if below else SERIES_COLOURS[0]}">'
            f"<title>confidence {lo:.2f}-{hi:.2f}: {count}</title></rect>"
        )
    for value in (0.0, 0.5, 1.0):
        body.append(
            f'<text class="tick" x="{LEFT + value * PLOT_W:.1f}" y="{HEIGHT - 8}" '
            f'text-anchor="middle">{value:g}</text>'
        )
    if threshold is not None:
        x = LEFT + threshold * PLOT_W
        body.append(
            f'<line class="threshold" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + PLOT_H}" '
            f'stroke="#d0342c" stroke-dasharray="4 3" stroke-width="2"/>'
            f'<text class="tick threshold-label" x="{x + 4:.1f}" y="{TOP + 10}">'
            f"review below {threshold:g}</text>"
        )
    note = f"; {missing} answers without confidence" if missing else ""
    where = f"review threshold {threshold:g}" if threshold is not None else "no review threshold"
    return _svg(label, f"{sum(bins)} answers, {where}{note}", body)


@dataclass(frozen=True)
class Span:
    """One bar of a timeline: a batch's request from start to finish."""

    label: str
    start: datetime
    end: datetime
    kind: str
    """`done`, `retried` or `failed`: its colour."""


TIMELINE_COLOURS = {"done": SERIES_COLOURS[0], "retried": "#c98d00", "failed": "#d0342c"}


def timeline(label: str, spans: Sequence[Span]) -> Markup:
    """Draw the spans on a time axis, each in the first lane free at its start (concurrency)."""
    if not spans:
        return _svg(label, "no batch has run yet", [], height=40)
    ordered = sorted(spans, key=lambda s: (s.start, s.end))
    origin = ordered[0].start
    total = max(1e-3, max((s.end - origin).total_seconds() for s in ordered))
    lane_ends: list[datetime] = []
    placed: list[tuple[int, Span]] = []
    for span in ordered:
        lane = next((i for i, end in enumerate(lane_ends) if end <= span.start), None)
        if lane is None:
            lane_ends.append(span.end)
            lane = len(lane_ends) - 1
        else:
            lane_ends[lane] = span.end
        placed.append((lane, span))
    lane_h = max(3.0, min(12.0, 220 / len(lane_ends)))
    height = int(TOP + len(lane_ends) * lane_h + BOTTOM)
    body = []
    for lane, span in placed:
        x = LEFT + (span.start - origin).total_seconds() / total * PLOT_W
        w = max(1.0, (span.end - span.start).total_seconds() / total * PLOT_W)
        seconds = (span.end - span.start).total_seconds()
        body.append(
            f'<rect class="span" x="{x:.1f}" y="{TOP + lane * lane_h:.1f}" width="{w:.1f}" '
            f'height="{lane_h * 0.8:.1f}" fill="{TIMELINE_COLOURS.get(span.kind, "#555")}">'
            f"<title>{escape(span.label)}: {seconds:.1f} s from {span.start:%H:%M:%S}"
            f"{' (' + span.kind + ')' if span.kind != 'done' else ''}</title></rect>"
        )
    for fraction, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        body.append(
            f'<text class="tick" x="{LEFT + fraction * PLOT_W:.1f}" y="{height - 8}" '
            f'text-anchor="{anchor}">+{total * fraction:.0f} s</text>'
        )
    retried = sum(1 for s in spans if s.kind == "retried")
    return _svg(
        label,
        f"{len(spans)} batches over {total:.0f} s in up to {len(lane_ends)} at once; "
        f"{retried} retried",
        body,
        height=height,
    )


def usd(value: float) -> str:
    return f"${value:.4f}" if value < 1 else f"${value:,.2f}"


def percent(value: float) -> str:
    return f"{value * 100:.0f}%"


def millis(value: float) -> str:
    return f"{value:,.0f} ms"
