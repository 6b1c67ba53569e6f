"""Images and maps as data URIs: what makes an explorer page self-contained and small.

* The image: PNG when small or a drawing, else JPEG (see :func:`image_uri`), its longer side capped at
  ``max_side`` pixels (the maps are placed relative to it, so nothing is lost but pixels a screen
  would not show).
* A map: an 8-bit greyscale PNG of its values × 255, its longer side capped at ``max_side`` with a box
  (area) filter. Token grids (8×8 … 48×48) pass through untouched; a map already placed on a large
  image is reduced. Quantizing to 8 bits changes a value by at most 1/510.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from dexar.explorer.payload import MapLike, as_array
from dexar.plotting import colour_table

IMAGE_MAX_SIDE = 512
MAP_MAX_SIDE = 128
THUMB_SIDE = 56
LOSSLESS_UP_TO = 128


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,<data>``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """Any PIL image or ``(H, W[, C])`` uint8 array as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"explorer payload: an image array must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array).convert("RGB")


def fit(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` shrunk (Lanczos) so its longer side is at most ``max_side``; unchanged if already."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)


def image_uri(image: Image.Image | np.ndarray, max_side: int = IMAGE_MAX_SIDE, quality: int = 88) -> str:
    """The image as a data URI, longer side ≤ ``max_side``.

    A small image (≤ ``LOSSLESS_UP_TO`` px) is a PNG: the page magnifies it and JPEG blocks would show.
    A larger one is a JPEG, or a palette PNG when it has ≤ 256 colours and that is smaller (drawings);
    an RGB PNG of a photo would be several times larger and slow to write.
    """
    rgb = fit(to_rgb(image), max_side)
    jpeg = _jpeg(rgb, quality)
    if max(rgb.size) <= LOSSLESS_UP_TO:
        return data_uri(_png(rgb), "image/png")
    if rgb.getcolors(maxcolors=256) is not None:
        png = _png(rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE))
        if len(png) <= len(jpeg):
            return data_uri(png, "image/png")
    return data_uri(jpeg, "image/jpeg")


def thumbnail_uri(image: Image.Image | np.ndarray, side: int = THUMB_SIDE) -> str:
    """A small JPEG thumbnail (longer side ``side``) for sample lists."""
    return data_uri(_jpeg(fit(to_rgb(image), side), quality=80), "image/jpeg")


def map_uri(values: MapLike, where: str, max_side: int = MAP_MAX_SIDE) -> str:
    """An ``(h, w)`` map in [0, 1] as an 8-bit greyscale PNG data URI (``ValueError`` naming ``where``)."""
    array = as_array(values, where)
    grey = Image.fromarray(np.round(array * 255.0).astype(np.uint8), mode="L")
    scale = max_side / max(grey.size)
    if scale < 1:
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))), Image.BOX)
    return data_uri(_png(grey), "image/png")


def colormap_hex() -> str:
    """The 256-entry colour map of :mod:`dexar.plotting` (the PNG overlays') as one hex string (6 chars each)."""
    ramp = colour_table()
    return "".join(f"{r:02x}{g:02x}{b:02x}" for r, g, b in ramp)
