"""PNG figures of `dexar report`: mean perturbation curves and an overlay gallery.

Drawn with Pillow only, like :mod:`dexar.plotting`: no plotting library is needed. Every figure is meant to
be read at its real size: text at 13-16 px, round tick labels, labelled axes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from dexar.plotting import TRANSPARENT_BELOW, colour_bar, fit, font
from dexar.report_names import display
from dexar.resume import natural_key

if TYPE_CHECKING:
    from dexar.report import Run, TableSpec

PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def _series_label(spec: TableSpec, attrs: dict[str, str], skip: Sequence[str] = ()) -> str:
    return " ".join(
        f"{k}={attrs[k]}" if k not in ("model", "method") else display(attrs[k])
        for k in spec.rows
        if k in attrs and k not in skip
    )


def _shared(spec: TableSpec, series_attrs: Sequence[dict[str, str]]) -> list[str]:
    """Row attributes with one value in every series (said once in the subtitle, not in each legend entry)."""
    keys = [k for k in spec.rows if all(k in a for a in series_attrs)]
    shared = [k for k in keys if len({a[k] for a in series_attrs}) == 1]
    return shared if len(shared) < len(keys) else shared[:-1]  # keep at least one attribute per entry


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "all"


def nice_step(span: float, count: int = 6) -> float:
    """A 1-2-2.5-5 × 10^k step giving about ``count`` ticks over ``span``."""
    raw = span / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * 0.999)


def linear_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values covering ``[lo, hi]`` (the axis is widened to the outer ticks)."""
    step = nice_step(hi - lo, count)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks of a log axis covering ``[lo, hi]`` (decades only when it spans more than 3 decades)."""
    first, last = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    mantissas = (1,) if last - first > 3 else (1, 2, 5)
    ticks = [m * 10.0**e for e in range(first, last + 1) for m in mantissas]
    below = [t for t in ticks if t <= lo * (1 + 1e-9)]
    above = [t for t in ticks if t >= hi * (1 - 1e-9)]
    return [t for t in ticks if (below[-1] if below else ticks[0]) <= t <= (above[0] if above else ticks[-1])]


def tick_label(value: float, step: float | None = None) -> str:
    """``value`` with the decimals its tick step needs (``0.2``, ``55``, ``0.05``); ``step=None``: log ticks."""
    if step is None:
        return f"{value:g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if f"{step:g}".endswith("25") else 0)
    return f"{value:.{decimals}f}"


def wants_log_axis(values: Sequence[float]) -> bool:
    """A log axis when every value is positive and they span at least a factor 20 (curves near 1 and near 60)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 20


def line_chart(
    series: dict[str, tuple[list[float], list[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool | None = None,
    subtitle: str = "",
) -> Image.Image:
    """A line chart of ``{name: (x, y)}``: round ticks, labelled axes, a legend; ``log_y=None`` picks the y scale.

    The y axis is logarithmic (``log_y=None``: when :func:`wants_log_axis`), so curves near 1 stay apart when
    others reach 60.
    """
    width, height, left, right, top, bottom = 820, 490, 84, 230, 56, 58
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    small, face = font(13), font(14)
    xs = [v for x, _ in series.values() for v in x if math.isfinite(v)]
    ys = [v for _, y in series.values() for v in y if math.isfinite(v)]
    if not xs or not ys:
        draw.text((left, top), f"{title}: no finite values", fill="black", font=face)
        return img
    log = wants_log_axis(ys) if log_y is None else log_y and min(ys) > 0
    xticks = linear_ticks(min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1)
    x0, x1 = xticks[0], xticks[-1]
    if log:
        yticks, ystep = log_ticks(min(ys), max(ys)), None
        y0, y1 = math.log10(yticks[0]), math.log10(yticks[-1])
    else:
        lo, hi = min(ys), max(ys)
        lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)
        yticks = linear_ticks(lo, hi)
        ystep, y0, y1 = yticks[1] - yticks[0], yticks[0], yticks[-1]
    pw, ph = width - left - right, height - top - bottom

    def px(x: float, y: float) -> tuple[float, float]:
        yv = math.log10(y) if log else y
        return left + (x - x0) / (x1 - x0) * pw, top + (1 - (yv - y0) / (y1 - y0)) * ph

    xstep = xticks[1] - xticks[0]
    for fx in xticks:
        gx, _ = px(fx, yticks[0])
        draw.line([(gx, top), (gx, top + ph)], fill=(232, 232, 232))
        text = tick_label(fx, xstep)
        draw.text((gx - small.getlength(text) / 2, top + ph + 6), text, fill="black", font=small)
    for fy in yticks:
        _, gy = px(x0, fy)
        draw.line([(left, gy), (left + pw, gy)], fill=(232, 232, 232))
        text = tick_label(fy, ystep)
        draw.text((left - 8 - small.getlength(text), gy - 8), text, fill="black", font=small)
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    draw.text((left, 8), fit(title, width - left - 10, font(16)), fill="black", font=font(16))
    draw.text((left, 30), fit(subtitle, width - left - 10, small), fill=(80, 80, 80), font=small)
    draw.text((left + pw / 2 - face.getlength(xlabel) / 2, height - 24), xlabel, fill="black", font=face)
    axis = f"{ylabel} (log scale)" if log else ylabel
    label = Image.new("RGB", (int(face.getlength(axis)) + 4, 20), "white")
    ImageDraw.Draw(label).text((2, 1), axis, fill="black", font=face)
    label = label.rotate(90, expand=True)
    img.paste(label, (8, top + ph // 2 - label.height // 2))
    for i, (name, (x, y)) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        points = [px(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a + b) and (b > 0 or not log)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for p in points:
            _marker(draw, p, i, color)
        ly = top + 4 + 20 * i
        draw.line([(left + pw + 12, ly + 8), (left + pw + 36, ly + 8)], fill=color, width=3)
        _marker(draw, (left + pw + 24, ly + 8), i, color)
        draw.text((left + pw + 42, ly), fit(name, right - 48, small), fill="black", font=small)
    return img


def _marker(draw: ImageDraw.ImageDraw, p: tuple[float, float], i: int, color: tuple[int, int, int]) -> None:
    """Series ``i``'s marker (circle, square, triangle, diamond in turn), so lines are told apart without colour."""
    x, y, r = p[0], p[1], 3.5
    shape = i % 4
    if shape == 0:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
    elif shape == 1:
        draw.rectangle([x - r, y - r, x + r, y + r], fill=color)
    elif shape == 2:
        draw.polygon([(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)], fill=color)
    else:
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=color)


_NPPL = "normalized perplexity PPL(x_p) / PPL(x)"
CURVES = {
    "pos": ("positive perturbation (most relevant pixels removed first)", "fraction of pixels removed", _NPPL),
    "neg": ("negative perturbation (least relevant pixels removed first)", "fraction of pixels removed", _NPPL),
    "insertion": (
        "insertion (most relevant pixels revealed first)",
        "fraction of pixels revealed",
        "normalized perplexity",
    ),
    "deletion": (
        "deletion (most relevant pixels deleted first)",
        "fraction of pixels deleted",
        "normalized perplexity",
    ),
    "pic": (
        "PIC (pixels revealed from the mean image)",
        "normalized file size (lossless WebP)",
        "normalized perplexity gain",
    ),
}
"""Curve metric name without ``_auc`` (``pos_auc``, ``pic``, ``insertion_auc``, ...) → (what the curve shows,
x-axis label, y-axis label); other curve metrics show their names."""


def draw_curves(spec: TableSpec, runs: Sequence[Run], out: Path) -> list[Path]:
    """One chart per curve metric and setting outside the table's rows; one line per row. Returns the files."""
    figures: dict[tuple[str, str], list[tuple[dict[str, str], tuple[list[float], list[float]]]]] = {}
    for run in runs:
        for label, curves in run.curves.items():
            attrs = {**run.attrs, "method": label}
            setting = " ".join(f"{v}" for k, v in sorted(attrs.items()) if k not in spec.rows and k != "method")
            for metric, curve in curves.items():
                figures.setdefault((metric, setting), []).append((attrs, (curve.get("x", curve["levels"]), curve["y"])))
    paths = []
    for (metric, setting), entries in sorted(figures.items()):
        shared = _shared(spec, [attrs for attrs, _ in entries])
        series = {_series_label(spec, attrs, shared) or attrs["method"]: xy for attrs, xy in entries}
        context = [f"{k} {display(entries[0][0][k])}" for k in shared] + ([f"dataset {setting}"] if setting else [])
        what, xlabel, ylabel = CURVES.get(metric.removesuffix("_auc"), (metric, "level", "value"))
        img = line_chart(series, f"{spec.title.split(':')[0]}: {what}", xlabel, ylabel, subtitle=", ".join(context))
        path = out / f"{spec.key}_curve_{_slug(metric)}_{_slug(setting)}.png"
        img.save(path)
        paths.append(path)
    return paths


def draw_gallery(spec: TableSpec, runs: Sequence[Run], out: Path, num_samples: int = 3) -> list[Path]:
    """Per-token strips of a few samples, every row of the table (method and/or variant) one under the other.

    Reads ``overlays/<method>/<sample>/tokens.png`` of each run and pastes the strips at their real size
    (128 px per token, labels readable), under one colour bar. Returns the file (none without overlays).
    """
    found = [({**run.attrs, "method": d.name}, d) for run in runs for d in sorted((run.path / "overlays").glob("*"))]
    if not found:
        return []
    shared = _shared(spec, [attrs for attrs, _ in found])
    entries = [(_series_label(spec, attrs, shared) or d.name, d) for attrs, d in found]
    entries.sort(key=lambda e: natural_key(e[0]))
    common = set.intersection(*[{p.name for p in d.iterdir() if (p / "tokens.png").is_file()} for _, d in entries])
    samples = sorted(common, key=natural_key)[:num_samples]
    if not samples:
        return []
    face, heading = font(14), font(16)
    label_width = min(240, 16 + max(int(face.getlength(name)) for name, _ in entries))
    blocks = []
    for sample in samples:
        meta = json.loads((entries[0][1] / sample / "explanation.json").read_text())
        strips = [(name, Image.open(d / sample / "tokens.png").convert("RGB")) for name, d in entries]
        width = label_width + max(s.width for _, s in strips)
        block = Image.new("RGB", (width, 30 + sum(s.height + 6 for _, s in strips)), "white")
        draw = ImageDraw.Draw(block)
        title = fit(f"{sample}: {meta.get('answer', '')}", width - 8, heading)
        draw.text((4, 4), title, fill="black", font=heading)
        y = 30
        for name, strip in strips:
            draw.text((4, y + 128 // 2 - 9), fit(name, label_width - 12, face), fill="black", font=face)
            block.paste(strip, (label_width, y))
            y += strip.height + 6
        blocks.append(block)
    bar = colour_bar(240, label=f"map value (each map min-max normalized; transparent up to {TRANSPARENT_BELOW:g})")
    width = max(max(b.width for b in blocks), label_width + bar.width + 8)
    gallery = Image.new("RGB", (width, bar.height + 16 + sum(b.height + 16 for b in blocks)), "white")
    gallery.paste(bar, (label_width, 8))
    y = bar.height + 16
    for block in blocks:
        ImageDraw.Draw(gallery).line([(0, y - 8), (width, y - 8)], fill=(200, 200, 200))
        gallery.paste(block, (0, y))
        y += block.height + 16
    path = out / f"{spec.key}_gallery.png"
    gallery.save(path)
    return [path]
