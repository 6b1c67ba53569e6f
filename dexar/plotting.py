"""Heatmap overlays, per-token strips and colour bars, drawn with Pillow and NumPy only.

A map value ``v`` in [0, 1] is drawn in a viridis-like colour with opacity :func:`opacity` ``(v)``: zero up to
:data:`TRANSPARENT_BELOW`, rising linearly to :data:`MAX_ALPHA` at 1. Low values leave the image as it is, so
the map marks the regions that matter without washing over the rest; the image keeps half its colour
saturation so that the map's colours stand out. :func:`colour_bar` shows the same colours and opacities (over
a checkerboard where the map is transparent).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Anchors of a perceptually ordered dark-blue → yellow colour map (viridis-like).
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)], axis=1
).astype(np.uint8)

TRANSPARENT_BELOW = 0.2
"""Map values up to this are not drawn at all."""
MAX_ALPHA = 0.75
"""Opacity of the map where its value is 1."""
SATURATION = 0.5
"""Colour saturation the image keeps under an overlay (1: as it is, 0: grey)."""
MIN_SIDE = 256
"""Sequence overlays of smaller images are enlarged (nearest neighbour) to this shorter side."""
FONT_SIZE = 13
LINE = FONT_SIZE + 4
"""Height of one line of text."""


def font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font at ``size`` px (its fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def opacity(values: np.ndarray) -> np.ndarray:
    """Blend weight of each map value: 0 up to :data:`TRANSPARENT_BELOW`, then linear up to :data:`MAX_ALPHA`."""
    return MAX_ALPHA * np.clip((values - TRANSPARENT_BELOW) / (1.0 - TRANSPARENT_BELOW), 0.0, 1.0)


def _values(heatmap: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A ``(h, w)`` map resized (bilinear, in float) to ``size = (width, height)``, clipped to [0, 1]."""
    values = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    resized = Image.fromarray(values.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)


def colour_table() -> np.ndarray:
    """The ``(256, 3)`` uint8 colour map: entry ``i`` colours map values that round to ``i / 255``."""
    return _LUT.copy()


def colorize(heatmap: torch.Tensor | np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Colour a ``(h, w)`` map in [0, 1] and resize it (bilinear) to ``size = (width, height)`` (opaque)."""
    return Image.fromarray(_LUT[np.round(_values(heatmap, size) * 255).astype(np.uint8)], mode="RGB")


def blend(image: Image.Image, heatmap: torch.Tensor | np.ndarray) -> Image.Image:
    """Draw a map over an image (resized to the image): colour by value, opacity by :func:`opacity`.

    The image is shown at :data:`SATURATION` of its colour saturation, so that the map's colours stand out
    from coloured objects (a yellow map peak on a yellow object) while every object keeps its hue.
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    gray = base.mean(axis=2, keepdims=True)
    base = gray + SATURATION * (base - gray)
    values = _values(heatmap, image.size)
    alpha = opacity(values)[..., None]
    out = base * (1.0 - alpha) + _LUT[np.round(values * 255).astype(np.uint8)] * alpha
    return Image.fromarray(np.round(out).astype(np.uint8), mode="RGB")


def fit(text: str, width: int, face: ImageFont.ImageFont | None = None) -> str:
    """``text`` cut to fit ``width`` px, with ``…`` where it was cut."""
    face = face or font()
    if face.getlength(text) <= width:
        return text
    while text and face.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def wrap(text: str, width: int, face: ImageFont.ImageFont | None = None) -> list[str]:
    """Greedy word wrap of ``text`` into lines of at most ``width`` px (a word too long alone is cut)."""
    face = face or font()
    lines: list[str] = []
    for word in text.split():
        if lines and face.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(fit(word, width, face))
    return lines or [""]


def _with_text(image: Image.Image, lines: list[str], face: ImageFont.ImageFont | None = None) -> Image.Image:
    """``image`` above a white band holding ``lines`` (each already fitted to the width)."""
    face = face or font()
    canvas = Image.new("RGB", (image.width, image.height + LINE * len(lines) + 4), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((3, image.height + 2 + LINE * i), line, fill="black", font=face)
    return canvas


def colour_bar(width: int, height: int = 12, label: str = "map value") -> Image.Image:
    """The overlay colours from 0 to 1 as drawn (checkerboard where transparent), ticks below, ``label`` right."""
    face = font()
    values = np.linspace(0.0, 1.0, width)
    ys, xs = np.mgrid[0:height, 0:width]
    checker = np.where(((xs // 6) + (ys // 6)) % 2 == 0, 255.0, 200.0)[..., None]
    alpha = opacity(values)[None, :, None]
    bar = checker * (1.0 - alpha) + _LUT[np.round(values * 255).astype(np.uint8)][None] * alpha
    canvas = Image.new("RGB", (width + 12 + int(face.getlength(label)) + 4, height + LINE + 2), "white")
    canvas.paste(Image.fromarray(np.round(bar).astype(np.uint8), mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, width - 1, height - 1], outline=(120, 120, 120))
    for value in (0.0, TRANSPARENT_BELOW, 0.5, 1.0):
        x, text = round(value * (width - 1)), f"{value:g}"
        draw.line([(x, height - 4), (x, height + 1)], fill="black")
        w = face.getlength(text)
        draw.text((min(max(0, x - w / 2), width - w), height + 2), text, fill="black", font=face)
    draw.text((width + 12, (height - LINE) / 2 + 1), label, fill="black", font=face)
    return canvas


def overlay(image: Image.Image, heatmap: torch.Tensor, caption: str | None = None) -> Image.Image:
    """A map over an image (shorter side at least :data:`MIN_SIDE`), the wrapped caption and a colour bar below."""
    base = image.convert("RGB")
    if min(base.size) < MIN_SIDE:
        scale = MIN_SIDE / min(base.size)
        base = base.resize((round(base.width * scale), round(base.height * scale)), Image.Resampling.NEAREST)
    blended = blend(base, heatmap)
    if caption:
        blended = _with_text(blended, wrap(caption, blended.width - 6))
    bar = colour_bar(min(blended.width - 90, 240))
    canvas = Image.new("RGB", (blended.width, blended.height + bar.height + 6), "white")
    canvas.paste(blended, (0, 0))
    canvas.paste(bar, (3, blended.height + 2))
    return canvas


def token_strip(
    image: Image.Image,
    token_maps: torch.Tensor,
    tokens: list[str],
    weights: torch.Tensor,
    tile: int = 128,
    empty: str = "(no answer tokens)",
) -> Image.Image:
    """One overlay per answer token or word, left to right, each labelled with its text and weight.

    Called with an explanation's word view (``word_maps``, ``word_texts``, ``word_weights``) it draws one
    panel per word, labelled with the word (``potted``, not ``p`` ``otted``). Each panel is ``tile`` px
    high and keeps the image's aspect ratio (a 4:3 image gives ``4/3 · tile`` px wide panels).
    """
    width = max(1, round(tile * image.width / image.height))
    small = image.convert("RGB").resize((width, tile), Image.Resampling.BILINEAR)
    tiles = [
        _with_text(blend(small, m), [fit(tok.replace("\n", "\\n"), width - 6), f"w={float(w):.3g}"])
        for m, tok, w in zip(token_maps, tokens, weights, strict=True)
    ]
    if not tiles:
        return _with_text(small, [fit(empty, width - 6)])
    strip = Image.new("RGB", (width * len(tiles), tiles[0].height), "white")
    for i, t in enumerate(tiles):
        strip.paste(t, (i * width, 0))
    return strip
