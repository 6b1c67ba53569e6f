"""Mean perturbation curves as inline SVG (no plotting library, no script): one chart per metric."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

# Okabe–Ito: distinguishable with every common colour-vision deficiency.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")

WIDTH, HEIGHT = 320, 210
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 30, 34


def method_colour(index: int) -> str:
    """The colour of the ``index``-th method (cycled)."""
    return PALETTE[index % len(PALETTE)]


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    """About ``count`` round tick values covering ``[low, high]``."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + k * step for k in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}"


def curve_svg(
    title: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    colours: Mapping[str, str],
    x_label: str = "fraction perturbed",
    y_label: str = "normalized PPL",
) -> str:
    """One chart: a polyline per method over shared axes, with ticks, a title and accessible text.

    Args:
        title: Chart title (e.g. ``pos_perturbation ↑``).
        series: ``{method: (x, y)}``; non-finite points are skipped.
        colours: ``{method: css colour}``.
        x_label: Axis label.
        y_label: Axis label.
    """
    points = {
        name: [(float(a), float(b)) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
        for name, (x, y) in series.items()
    }
    flat = [p for pts in points.values() for p in pts]
    if not flat:
        return ""
    x0, x1 = min(p[0] for p in flat), max(p[0] for p in flat)
    y0, y1 = min(0.0, min(p[1] for p in flat)), max(p[1] for p in flat)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    y_ticks = _ticks(y0, y1)
    y1 = max(y1, y_ticks[-1])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(v: float) -> float:
        return LEFT + (v - x0) / (x1 - x0) * plot_w

    def sy(v: float) -> float:
        return TOP + plot_h - (v - y0) / (y1 - y0) * plot_h

    out = [
        f'<svg class="dx-chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="{_id(title)}">',
        f'<title id="{_id(title)}">{html.escape(title)}: mean curve per method '
        + "; ".join(f"{html.escape(n)}: " + ", ".join(f"{b:.3g}" for _, b in pts) for n, pts in points.items())
        + "</title>",
        f'<text class="dx-chart-title" x="{LEFT}" y="18">{html.escape(title)}</text>',
    ]
    for t in y_ticks:
        out.append(f'<line class="dx-grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>')
        out.append(f'<text class="dx-tick" x="{LEFT - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>')
    for t in _ticks(x0, x1):
        out.append(
            f'<text class="dx-tick" x="{sx(t):.1f}" y="{TOP + plot_h + 14}" text-anchor="middle">{_label(t)}</text>'
        )
    out.append(f'<line class="dx-axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" y2="{TOP + plot_h}"/>')
    out.append(
        f'<text class="dx-axis-label" x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 4}" text-anchor="middle">'
        f"{html.escape(x_label)}</text>"
    )
    out.append(
        f'<text class="dx-axis-label" transform="translate(11 {TOP + plot_h / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle">{html.escape(y_label)}</text>'
    )
    for name, pts in points.items():
        path = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in pts)
        colour = colours.get(name, "currentColor")
        out.append(f'<polyline class="dx-line" points="{path}" stroke="{colour}" data-method="{html.escape(name)}"/>')
        out += [f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="2.2" fill="{colour}"/>' for a, b in pts]
    out.append("</svg>")
    return "".join(out)


def _id(title: str) -> str:
    return "dx-chart-" + "".join(c if c.isalnum() else "-" for c in title)
