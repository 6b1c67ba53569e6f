"""Where a map's grid lies on the original image: the image processor's view, mapped back.

An image processor turns the original ``H × W`` image into the model's view by axis-aligned steps
(pad, resize, center crop, pad). Each step maps view coordinates affinely onto the coordinates before
it, so the view, and the token grid that spans it, is a box in original-image coordinates (continuous
pixel units, pixel ``i`` spans ``[i, i + 1)``). The box may reach past the image (padding: the model saw
padding there) or cover only part of it (a center crop: the rest was never seen).

:class:`MapGeometry` carries that box for one image. Placing a map (:meth:`MapGeometry.place`) samples
the grid bilinearly at each output pixel's centre (``align_corners=False``, clamped at the grid's
border; with the box equal to the image this is exactly ``F.interpolate(mode="bilinear")``), and sets
every pixel whose centre lies outside the seen region to zero; :meth:`MapGeometry.seen` is that
region as a bool mask. A pixel counts as seen when its centre lies in the box (half-open).

:class:`ProcessorView` reads the steps off a standard single-view image processor
(``CLIPImageProcessor``, ``LlavaImageProcessor``, ``SiglipImageProcessor``, both backends): the rounding
of each step follows those processors' own code in transformers 5.x (sizes from transformers' own
helpers, center-crop offsets as each backend computes them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
from transformers.image_utils import ChannelDimension, SizeDict, get_image_size_for_max_height_width

from dexar.adapters.errors import DexarInputError

Box = tuple[float, float, float, float]
"""``(y0, x0, y1, x1)``: a box in original-image pixel coordinates, half-open."""

SINGLE_VIEW_PROCESSORS = ("CLIPImageProcessor", "LlavaImageProcessor", "SiglipImageProcessor")
"""Image processors whose geometry :class:`ProcessorView` reproduces (either backend)."""


@dataclass
class MapGeometry:
    """Where one explanation's maps lie on its original image.

    A plain (not frozen) dataclass: Lightning rebuilds the dataclasses of predict outputs field by field.

    Attributes:
        image_size: ``(H, W)`` of the original image.
        box: Extent of the maps' grid in original pixel coordinates (may reach past the image).
        seen_box: The region the model saw, in the same coordinates (``None``: ``box`` clipped to the
            image). It differs from ``box`` once the maps are placed on the whole image.
        placed: The maps are already placed on the whole image (:meth:`on_image`), at their own size.

    """

    image_size: tuple[int, int]
    box: Box
    seen_box: Box | None = None
    placed: bool = False

    @classmethod
    def whole(cls, image_size: tuple[int, int]) -> MapGeometry:
        """A grid spanning exactly the whole image (plain resize, dynamic resolution, tiles of the whole image)."""
        h, w = (int(s) for s in image_size)
        return cls((h, w), (0.0, 0.0, float(h), float(w)))

    @property
    def seen_region(self) -> Box:
        """The seen region clipped to the image."""
        y0, x0, y1, x1 = self.box if self.seen_box is None else self.seen_box
        h, w = self.image_size
        return (max(y0, 0.0), max(x0, 0.0), min(y1, float(h)), min(x1, float(w)))

    def on_image(self) -> MapGeometry:
        """The geometry of maps already placed on the whole image (what :meth:`place` returns)."""
        whole = (0.0, 0.0, float(self.image_size[0]), float(self.image_size[1]))
        return replace(self, box=whole, seen_box=self.seen_region, placed=True)

    def seen(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(H', W')`` bool: pixels (of the image drawn at ``size``, default its own) whose centre the model saw."""
        size = tuple(self.image_size if size is None else size)
        y0, x0, y1, x1 = self.seen_region
        rows = _inside(_centres(size[0], self.image_size[0]), y0, y1)
        cols = _inside(_centres(size[1], self.image_size[1]), x0, x1)
        return rows[:, None] & cols[None, :]

    def place(self, maps: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Place ``(..., h, w)`` grid maps on the image drawn at ``size`` (default its own): ``(..., H', W')``.

        Bilinear inside the box, zero at every pixel the model did not see (module docstring).
        """
        size = tuple(self.image_size if size is None else size)
        y0, x0, y1, x1 = self.box
        s0, t0, s1, t1 = self.seen_region
        ry = _axis_weights(size[0], maps.shape[-2], self.image_size[0], (y0, y1), (s0, s1))
        rx = _axis_weights(size[1], maps.shape[-1], self.image_size[1], (x0, x1), (t0, t1))
        out = ry @ maps.to(torch.float64) @ rx.T
        return out.to(maps.dtype if maps.is_floating_point() else torch.float64)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MapGeometry:
        """The geometry written by :meth:`to_dict` (e.g. a shard record's ``geometry``)."""
        return cls(
            tuple(data["image_size"]), tuple(data["box"]), tuple(data["seen_box"]), bool(data.get("placed", False))
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "image_size": list(self.image_size),
            "box": list(self.box),
            "seen_box": list(self.seen_region),
            "placed": self.placed,
        }


def _centres(count: int, extent: int) -> torch.Tensor:
    """Original-image coordinates of the centres of ``count`` pixels spanning ``extent`` original pixels."""
    return (torch.arange(count, dtype=torch.float64) + 0.5) * (extent / count)


def _inside(values: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return (values >= lo) & (values < hi)


def _axis_weights(
    count: int, cells: int, extent: int, span: tuple[float, float], seen: tuple[float, float]
) -> torch.Tensor:
    """``(count, cells)`` bilinear weights (``align_corners=False``, clamped) of cells spanning ``span``.

    Rows of pixels whose centre lies outside ``seen`` are zero.
    """
    centre = _centres(count, extent)
    lo, hi = span
    u = ((centre - lo) / (hi - lo) * cells - 0.5).clamp(0.0, cells - 1)
    left = u.floor().long()
    right = (left + 1).clamp(max=cells - 1)
    frac = u - left
    weights = torch.zeros(count, cells, dtype=torch.float64)
    rows = torch.arange(count)
    weights[rows, left] += 1.0 - frac
    weights[rows, right] += frac
    return weights * _inside(centre, *seen)[:, None]


# -- single-view image processors ------------------------------------------------------------------
@dataclass
class _Axis:
    """One axis of the view → original map: ``original = offset + scale · view``."""

    size: int
    offset: float = 0.0
    scale: float = 1.0

    def moved(self, by: int) -> None:
        """The content moved by ``by`` pixels (pad before: ``by > 0``; crop: ``by < 0``)."""
        self.offset -= self.scale * by

    def resized(self, size: int) -> None:
        self.scale *= self.size / size
        self.size = size


@dataclass(frozen=True)
class ProcessorView:
    """The view geometry of a single-view image processor: [pad to square] → resize → [center crop] → [pad].

    Attributes:
        name: The processor's class (backend suffix dropped), for messages.
        backend: ``pil`` or ``torchvision`` (their center crops pad differently when the crop is larger).
        pad_square: ``LlavaImageProcessor(do_pad=True)``: pad to a square first, content centred.
        size: The resize target (``None``: no resize).
        crop: ``(height, width)`` of the center crop (``None``: none).
        pad: ``(height, width)`` of the bottom/right padding after the crop (``None``: none).

    """

    name: str
    backend: str
    pad_square: bool
    size: SizeDict | None
    crop: tuple[int, int] | None
    pad: tuple[int, int] | None

    @classmethod
    def of(cls, image_processor: Any) -> ProcessorView:
        """Read the steps off an image processor.

        Raises:
            DexarInputError: Not one of :data:`SINGLE_VIEW_PROCESSORS`, or a setting whose view depends
                on the rest of the batch (padding to the batch's largest image).
        """
        name = type(image_processor).__name__.removesuffix("Pil").removesuffix("Fast")
        if name not in SINGLE_VIEW_PROCESSORS:
            raise DexarInputError(
                f"image processor {type(image_processor).__name__}: its view geometry is not known; "
                f"supported: {', '.join(SINGLE_VIEW_PROCESSORS)}"
            )
        do_pad = bool(getattr(image_processor, "do_pad", False))
        pad_square = do_pad and name == "LlavaImageProcessor"
        pad = None
        if do_pad and not pad_square:
            pad_size = size_dict(getattr(image_processor, "pad_size", None))
            if pad_size is None or not (pad_size.height and pad_size.width):
                raise DexarInputError(
                    f"image processor {name}: do_pad without pad_size pads each image to the batch's largest, "
                    "so its view depends on the batch; set pad_size or do_pad=False"
                )
            pad = (int(pad_size.height), int(pad_size.width))
        size = size_dict(image_processor.size) if getattr(image_processor, "do_resize", True) else None
        crop = None
        if getattr(image_processor, "do_center_crop", False):
            crop_size = size_dict(image_processor.crop_size)
            crop = (int(crop_size.height), int(crop_size.width))
        return cls(name, str(getattr(image_processor, "backend", "pil")), pad_square, size, crop, pad)

    def view_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(height, width)`` of the view (``pixel_values``) of an image of ``image_size``."""
        y, x = self._axes(image_size)
        return y.size, x.size

    def geometry(self, image_size: tuple[int, int], span: tuple[int, int] | None = None) -> MapGeometry:
        """Where a grid spanning the view's top-left ``span`` pixels (default: the whole view) lies on the image."""
        y, x = self._axes(image_size)
        span_h, span_w = (y.size, x.size) if span is None else span
        box = (y.offset, x.offset, y.offset + y.scale * span_h, x.offset + x.scale * span_w)
        return MapGeometry((int(image_size[0]), int(image_size[1])), box)

    def _axes(self, image_size: tuple[int, int]) -> tuple[_Axis, _Axis]:
        y, x = _Axis(int(image_size[0])), _Axis(int(image_size[1]))
        if self.pad_square and y.size != x.size:  # LlavaImageProcessor.pad_to_square: (max − short) // 2 before
            short, side = (y, x.size) if y.size < x.size else (x, y.size)
            short.moved((side - short.size) // 2)
            short.size = side
        if self.size is not None:
            new_h, new_w = resize_output_size(self.size, (y.size, x.size))
            y.resized(new_h)
            x.resized(new_w)
        if self.crop is not None:
            for axis, crop in ((y, self.crop[0]), (x, self.crop[1])):
                axis.moved(-center_crop_start(axis.size, crop, self.backend))
                axis.size = crop
        if self.pad is not None:  # bottom/right padding: the origin stays
            y.size, x.size = self.pad
        return y, x


def size_dict(size: Any) -> SizeDict | None:
    """An image processor's ``size`` / ``crop_size`` / ``pad_size`` (dict or ``SizeDict``) as a ``SizeDict``."""
    if size is None or isinstance(size, SizeDict):
        return size
    return SizeDict(**dict(size))


def resize_output_size(size: SizeDict, image_size: tuple[int, int]) -> tuple[int, int]:
    """The ``(height, width)`` a backend's ``resize`` produces (``TorchvisionBackend`` / ``PilBackend.resize``)."""
    height, width = image_size
    if size.shortest_edge and size.longest_edge:
        return tuple(get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge))
    if size.shortest_edge:
        shape_only = np.broadcast_to(np.zeros((), dtype=np.uint8), (1, height, width))
        out = get_resize_output_image_size(
            shape_only, size=size.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
        )
        return int(out[0]), int(out[1])
    if size.max_height and size.max_width:
        return tuple(get_image_size_for_max_height_width((height, width), size.max_height, size.max_width))
    if size.height and size.width:
        return int(size.height), int(size.width)
    raise DexarInputError(f"image processor size {size} has no height/width, shortest_edge or max_height/max_width")


def center_crop_start(size: int, crop: int, backend: str) -> int:
    """First kept pixel of a center crop of one axis (negative: the crop pads before the content).

    ``PilBackend`` (``image_transforms.center_crop``): ``(size − crop) // 2``, also when it pads (its
    padding is ``ceil((crop − size) / 2)`` before the content). ``TorchvisionBackend.center_crop`` pads
    ``(crop − size) // 2`` before the content, else crops at ``int((size − crop) / 2)``.
    """
    if backend == "torchvision" and crop > size:
        return -((crop - size) // 2)
    return (size - crop) // 2
