"""Heatmap overlays and per-token strips, drawn with Pillow and NumPy only."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Anchors of a perceptually ordered dark-blue → yellow colour map (viridis-like).
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)], axis=1
).astype(np.uint8)


def colorize(heatmap: torch.Tensor | np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Colour a ``(h, w)`` map in [0, 1] and resize it (bilinear) to ``size = (width, height)``."""
    values = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    grey = Image.fromarray(np.clip(values * 255.0, 0, 255).astype(np.uint8), mode="L").resize(size, Image.BILINEAR)
    return Image.fromarray(_LUT[np.asarray(grey)], mode="RGB")


def overlay(image: Image.Image, heatmap: torch.Tensor, alpha: float = 0.5, caption: str | None = None) -> Image.Image:
    """Blend a heatmap over an image (its own size), with an optional caption band below."""
    base = image.convert("RGB")
    if min(base.size) < 128:
        scale = 128 / min(base.size)
        base = base.resize((round(base.width * scale), round(base.height * scale)), Image.NEAREST)
    blended = Image.blend(base, colorize(heatmap, base.size), alpha)
    if not caption:
        return blended
    return _with_text(blended, [caption])


def _with_text(image: Image.Image, lines: list[str]) -> Image.Image:
    font = ImageFont.load_default()
    band = 14 * len(lines) + 4
    canvas = Image.new("RGB", (image.width, image.height + band), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((3, image.height + 2 + 14 * i), line, fill="black", font=font)
    return canvas


def token_strip(
    image: Image.Image, token_maps: torch.Tensor, tokens: list[str], weights: torch.Tensor, tile: int = 128
) -> Image.Image:
    """One overlay per answer token, left to right, each labelled with its token and weight."""
    small = image.convert("RGB").resize((tile, tile), Image.BILINEAR)
    tiles = [
        _with_text(Image.blend(small, colorize(m, (tile, tile)), 0.5), [tok[:18], f"w={float(w):.3g}"])
        for m, tok, w in zip(token_maps, tokens, weights, strict=True)
    ]
    if not tiles:
        return _with_text(small, ["(no answer tokens)"])
    strip = Image.new("RGB", (tile * len(tiles), tiles[0].height), "white")
    for i, t in enumerate(tiles):
        strip.paste(t, (i * tile, 0))
    return strip
