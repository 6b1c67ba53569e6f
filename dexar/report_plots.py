"""PNG figures of `dexar report`: mean perturbation curves and an overlay gallery.

Drawn with Pillow only, like :mod:`dexar.plotting`: no plotting library is needed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from dexar.report_names import display
from dexar.resume import natural_key

if TYPE_CHECKING:
    from dexar.report import Run, TableSpec

PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _series_label(spec: TableSpec, attrs: dict[str, str]) -> str:
    return " ".join(
        f"{k}={attrs[k]}" if k not in ("model", "method") else display(attrs[k]) for k in spec.rows if k in attrs
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "all"


def line_chart(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str) -> Image.Image:
    """A line chart of ``{name: (x, y)}`` with axes, ticks and a legend."""
    width, height, left, right, top, bottom = 720, 440, 64, 200, 36, 48
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = _font(12)
    xs = [v for x, _ in series.values() for v in x if math.isfinite(v)]
    ys = [v for _, y in series.values() for v in y if math.isfinite(v)]
    if not xs or not ys:
        draw.text((left, top), f"{title}: no finite values", fill="black", font=font)
        return img
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or abs(y1) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    x1 = x1 if x1 > x0 else x0 + 1
    pw, ph = width - left - right, height - top - bottom

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * pw, top + (1 - (y - y0) / (y1 - y0)) * ph

    for i in range(6):
        fx, fy = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        gx, _ = px(fx, y0)
        _, gy = px(x0, fy)
        draw.line([(gx, top), (gx, top + ph)], fill=(232, 232, 232))
        draw.line([(left, gy), (left + pw, gy)], fill=(232, 232, 232))
        draw.text((gx - 10, top + ph + 6), f"{fx:.2g}", fill="black", font=font)
        draw.text((6, gy - 7), f"{fy:.3g}", fill="black", font=font)
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    draw.text((left, 8), f"{title}: {ylabel}", fill="black", font=_font(14))
    draw.text((left + pw / 2 - 30, height - 20), xlabel, fill="black", font=font)
    for i, (name, (x, y)) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        points = [px(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for p in points:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        ly = top + 4 + 16 * i
        draw.line([(left + pw + 10, ly + 7), (left + pw + 30, ly + 7)], fill=color, width=3)
        draw.text((left + pw + 36, ly), name[:24], fill="black", font=font)
    return img


def draw_curves(spec: TableSpec, runs: Sequence[Run], out: Path) -> list[Path]:
    """One chart per curve metric and setting outside the table's rows; one line per row. Returns the files."""
    figures: dict[tuple[str, str], dict[str, tuple[list[float], list[float]]]] = {}
    for run in runs:
        for label, curves in run.curves.items():
            attrs = {**run.attrs, "method": label}
            setting = " ".join(f"{v}" for k, v in sorted(attrs.items()) if k not in spec.rows and k != "method")
            for metric, curve in curves.items():
                x = curve.get("x", curve["levels"])
                figures.setdefault((metric, setting), {})[_series_label(spec, attrs) or label] = (x, curve["y"])
    paths = []
    for (metric, setting), series in sorted(figures.items()):
        pic = metric.startswith("pic")
        img = line_chart(
            series,
            f"{spec.key} {metric} {setting}".strip(),
            "normalized size" if pic else "fraction of pixels",
            "normalized ppl gain" if pic else "normalized perplexity",
        )
        path = out / f"{spec.key}_curve_{_slug(metric)}_{_slug(setting)}.png"
        img.save(path)
        paths.append(path)
    return paths


def draw_gallery(spec: TableSpec, runs: Sequence[Run], out: Path, num_samples: int = 3) -> list[Path]:
    """Per-token strips of a few samples, every row of the table (method and/or variant) one under the other.

    Reads ``overlays/<method>/<sample>/tokens.png`` of each run. Returns the file (none without overlays).
    """
    entries = []
    for run in runs:
        for method_dir in sorted((run.path / "overlays").glob("*")):
            attrs = {**run.attrs, "method": method_dir.name}
            entries.append((_series_label(spec, attrs) or method_dir.name, method_dir))
    if not entries:
        return []
    entries.sort(key=lambda e: natural_key(e[0]))
    common = set.intersection(*[{p.name for p in d.iterdir() if (p / "tokens.png").is_file()} for _, d in entries])
    samples = sorted(common, key=natural_key)[:num_samples]
    if not samples:
        return []
    scale = 0.5  # strips are drawn at 128 px per token: half is enough to compare methods
    font, label_width = _font(13), 190
    blocks = []
    for sample in samples:
        meta = json.loads((entries[0][1] / sample / "explanation.json").read_text())
        strips = []
        for name, method_dir in entries:
            strip = Image.open(method_dir / sample / "tokens.png").convert("RGB")
            strip = strip.resize((max(1, int(strip.width * scale)), max(1, int(strip.height * scale))))
            strips.append((name, strip))
        width = label_width + max(s.width for _, s in strips)
        block = Image.new("RGB", (width, 24 + sum(s.height + 4 for _, s in strips)), "white")
        draw = ImageDraw.Draw(block)
        draw.text((4, 4), f"{sample}: {meta.get('answer', '')}", fill="black", font=_font(15))
        y = 24
        for name, strip in strips:
            draw.text((4, y + strip.height // 2 - 7), name[:28], fill="black", font=font)
            block.paste(strip, (label_width, y))
            y += strip.height + 4
        blocks.append(block)
    gallery = Image.new("RGB", (max(b.width for b in blocks), sum(b.height + 12 for b in blocks)), "white")
    y = 0
    for block in blocks:
        gallery.paste(block, (0, y))
        y += block.height + 12
    path = out / f"{spec.key}_gallery.png"
    gallery.save(path)
    return [path]
