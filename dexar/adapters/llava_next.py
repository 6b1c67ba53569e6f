"""LLaVA-NeXT (LLaVA-1.6) adapter: anyres tiles + a global view, merged into one full-image map.

The image processor picks the best grid resolution among ``image_grid_pinpoints``, resizes the image
into it keeping the aspect ratio, pads it (centred), and cuts ``crop × crop`` tiles; the whole image
squashed to ``crop × crop`` is the global view (tile 0). Each tile gives a ``g × g`` token grid
(``g = image_size / patch_size``, CLS dropped). The model sends the global view's ``g²`` tokens
first, then the tiles' tokens reassembled into one ``(rows·g) × (cols·g)`` grid, with the padding's
token rows/columns removed (``unpad_image``) and an ``image_newline`` token after every row.

Geometry: the unpadded high-resolution grid ``(H_u, W_u)`` is the full-image map; the token order is
read off the model's own ``pack_image_features``. ``unpad_image`` drops token rows (columns) by its
own rounding, on the token grid, not where the processor's pixel padding ends: the kept tokens cover
the canvas pixels ``[top·s, (top + H_u)·s)`` (``s = crop / g`` pixels a token), which reach up to half a
token into the padding or stop up to half a token short of the image edge. :class:`AnyresView`
maps that box back through the centred padding and the aspect-keeping resize (the processor's own
rounding), so the map lies exactly on the pixels its tile tokens show; a sliver the kept tokens stop
short of was seen only through the global view and counts as unseen (zero in the placed map).

Merge rule (:mod:`dexar.adapters.tiles`): a tile token's value goes to its cell (weight 1); a
global-view token shows ``1/g × 1/g`` of the image (the whole image squashed to one tile) and its
value is shared among the cells its box overlaps in proportion to the overlap area (Σ of the map =
Σ over tokens, less the share of a global token's box that falls on such an unseen sliver); newline
tokens show no region (weight 0). Tiles do not overlap. Different images give different layouts and
canvases: samples are batched by both (:meth:`LlavaNextAdapter.grid_key`).
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from dexar.adapters.base import DexarInputError, TeacherForcedBatch
from dexar.adapters.encoding import check_image_tokens, processor_encode
from dexar.adapters.geometry import MapGeometry, resize_output_size, size_dict
from dexar.adapters.llava import LlavaAdapter
from dexar.adapters.tiles import box_cell_map, grid_boxes

VICUNA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
MISTRAL_TEMPLATE = "[INST] <image>\n{prompt} [/INST]"


@dataclasses.dataclass(frozen=True)
class AnyresLayout:
    """Token layout of one image size.

    Attributes:
        source: ``(V,)`` per image token, the index ``tile·g² + row·g + col`` of the tile token it
            carries (tile 0: global view), ``-1`` for ``image_newline``.
        grid: ``(H_u, W_u)`` the unpadded high-resolution grid (the full-image map).
        offset: ``(top, left)`` of the unpadded grid inside the padded one.
        tiles: Tiles including the global view.
        side: ``g``, tokens per tile side.
        per_row: Tiles per row of the high-resolution grid.
        canvas: ``(height, width, top, left)`` of the resized image inside the padded best-resolution
            canvas, in processor pixels (:meth:`AnyresView.canvas`).

    """

    source: torch.Tensor
    grid: tuple[int, int]
    offset: tuple[int, int]
    tiles: int
    side: int
    per_row: int
    canvas: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def key(self) -> tuple[int, ...]:
        """Equal keys, equal token layouts and cell maps."""
        return (self.tiles, *self.grid, *self.offset, *self.canvas)


@dataclasses.dataclass(frozen=True)
class AnyresView:
    """The LLaVA-NeXT image processor's geometry (``LlavaNextImageProcessor``, either backend).

    ``select_best_resolution`` picks a canvas among the grid pinpoints, ``get_patch_output_size``
    resizes the image into it keeping the aspect ratio, the canvas is padded around it
    (``(canvas − resized) // 2`` before), cut into ``tile × tile`` tiles; the global view is the
    whole image resized to ``tile × tile``. Only configurations where the tiles and the global view
    reach the vision tower without a further resize or crop are accepted (every hub checkpoint).

    Attributes:
        pinpoints: The processor's ``image_grid_pinpoints`` (``(height, width)`` canvases).
        tile: Tile side in pixels.

    """

    pinpoints: tuple[tuple[int, int], ...]
    tile: int

    @classmethod
    def of(cls, image_processor: Any, config: Any) -> AnyresView:
        """Read and check the processor's settings against the model's ``config``.

        Raises:
            DexarInputError: Tiles or the global view are resized or cropped again, or the processor's
                pinpoints or tile size are not the model's.
        """
        name = type(image_processor).__name__
        size = size_dict(image_processor.size)
        crop = size_dict(getattr(image_processor, "crop_size", None))
        tile = int(crop.height if crop is not None and crop.height else size.height or size.shortest_edge)
        global_size = (size.height, size.width) if size.height and size.width else (size.shortest_edge,) * 2
        steps = []
        if getattr(image_processor, "do_resize", True):
            steps.append(resize_output_size(size, (tile, tile)))
        if getattr(image_processor, "do_center_crop", False):
            steps.append((int(crop.height), int(crop.width)))
        if tuple(global_size) != (tile, tile) or any(tuple(step) != (tile, tile) for step in steps):
            raise DexarInputError(
                f"{name}: size {size} / crop_size {crop} resize or crop the {tile}-pixel tiles or the global view "
                "again; only processors that pass them to the vision tower unchanged are supported"
            )
        pinpoints = tuple(tuple(int(v) for v in p) for p in image_processor.image_grid_pinpoints)
        model_pinpoints = tuple(tuple(int(v) for v in p) for p in config.image_grid_pinpoints)
        if tile != config.vision_config.image_size or pinpoints != model_pinpoints:
            raise DexarInputError(
                f"{name}: tile {tile} px and pinpoints {list(pinpoints)} differ from the model's "
                f"{config.vision_config.image_size} px and {list(model_pinpoints)}"
            )
        return cls(pinpoints, tile)

    def canvas(self, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(height, width, top, left)`` of the resized image in its canvas (the processor's own rounding)."""
        target = select_best_resolution(tuple(image_size), [list(p) for p in self.pinpoints])
        shape_only = np.broadcast_to(np.zeros((), dtype=np.uint8), (1, *image_size))
        height, width = get_patch_output_size(shape_only, target, ChannelDimension.FIRST)
        return int(height), int(width), (target[0] - height) // 2, (target[1] - width) // 2

    def geometry(self, image_size: tuple[int, int], layout: AnyresLayout) -> MapGeometry:
        """Where the kept high-resolution tokens of ``layout`` lie on an image of ``image_size``."""
        height, width, top, left = layout.canvas
        pixels = self.tile / layout.side  # canvas pixels per token
        (rows, cols), (row0, col0) = layout.grid, layout.offset
        sy, sx = image_size[0] / height, image_size[1] / width
        box = (
            (row0 * pixels - top) * sy,
            (col0 * pixels - left) * sx,
            ((row0 + rows) * pixels - top) * sy,
            ((col0 + cols) * pixels - left) * sx,
        )
        return MapGeometry((int(image_size[0]), int(image_size[1])), box)


class LlavaNextAdapter(LlavaAdapter):
    r"""``LlavaNextForConditionalGeneration`` (llava-v1.6-mistral / vicuna, llava-next-\*).

    Prompt template: ``[INST] <image>\n{prompt} [/INST]`` for a Mistral LLM, else LLaVA-1.5's
    ``USER: <image>\n{prompt} ASSISTANT:`` (vicuna checkpoints).
    """

    model_types = ("llava_next",)
    pixel_perturbation = False  # patches/tiles: perturbation would need per-view re-encoding

    @cached_property
    def view(self) -> Any:
        """The anyres processor's geometry (:class:`AnyresView`)."""
        return AnyresView.of(self.processor.image_processor, self.model.config)

    def __init__(self, model: Any, processor: Any) -> None:
        super().__init__(model, processor)
        text_type = getattr(model.config.text_config, "model_type", "")
        self.prompt_template = MISTRAL_TEMPLATE if text_type == "mistral" else VICUNA_TEMPLATE
        if model.config.vision_feature_select_strategy != "default":
            raise DexarInputError("LLaVA-NeXT: only vision_feature_select_strategy='default' (no CLS) is supported")

    # -- layout -------------------------------------------------------------------------------
    @property
    def side(self) -> int:
        """Tokens per tile side ``g``."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def layout(self, image_size: tuple[int, int]) -> AnyresLayout:
        """The token layout of an image of ``(height, width)`` pixels, read off the model's own packing."""
        size = (int(image_size[0]), int(image_size[1]))
        cache = self.__dict__.setdefault("_layouts", {})
        if size not in cache:
            cache[size] = dataclasses.replace(anyres_layout(self.model, size), canvas=self.view.canvas(size))
        return cache[size]

    def grid_key(self, image: Image.Image) -> tuple[int, ...]:
        return self.layout((image.height, image.width)).key

    def map_geometry(self, image: Image.Image) -> MapGeometry:
        """The kept high-resolution tokens' box, mapped back through the canvas padding and resize."""
        size = (image.height, image.width)
        return self.view.geometry(size, self.layout(size))

    def _batch_layout(self, image_sizes: torch.Tensor) -> AnyresLayout:
        layouts = [self.layout(tuple(size.tolist())) for size in image_sizes]
        if any(lay.key != layouts[0].key for lay in layouts):
            raise DexarInputError(
                f"one batch needs one tile layout and canvas, got {[lay.key for lay in layouts]}: group samples by "
                "grid_key (the Explainer does)"
            )
        return layouts[0]

    def cell_map(self, layout: AnyresLayout) -> torch.Tensor:
        """``(H_u·W_u, V)`` merge of the image tokens into the full-image map (module docstring).

        Boxes are in the frame of the kept tokens' grid: a global-view token's box (a ``1/g`` share of
        the resized image on the canvas) is moved into it through the canvas geometry.
        """
        g, (h, w), (top, left) = layout.side, layout.grid, layout.offset
        valid = layout.source >= 0
        source = layout.source.clamp(min=0)
        tile, local = source // (g * g), source % (g * g)
        row, col = local // g, local % g
        height, width, pad_top, pad_left = layout.canvas
        pixels = self.view.tile / g
        scale = torch.tensor([height / (h * pixels), width / (w * pixels)] * 2, dtype=torch.float64)
        shift = [(pad_top - top * pixels) / (h * pixels), (pad_left - left * pixels) / (w * pixels)]
        global_boxes = grid_boxes(row, col, g, g) * scale + torch.tensor(shift * 2, dtype=torch.float64)
        tile_row, tile_col = (tile - 1).clamp(min=0) // layout.per_row, (tile - 1).clamp(min=0) % layout.per_row
        big_row, big_col = tile_row * g + row - top, tile_col * g + col - left
        tile_boxes = grid_boxes(big_row, big_col, h, w)
        boxes = torch.where((tile == 0)[:, None], global_boxes, tile_boxes)
        return box_cell_map(boxes, valid, (h, w))

    # -- encoding -----------------------------------------------------------------------------
    def encode_prompts(
        self, images: list[Image.Image], prompts: list[str]
    ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        ids, enc = processor_encode(self, images, [self.format_prompt(p) for p in prompts])
        check_image_tokens(self, ids, [len(self.layout(tuple(size.tolist())).source) for size in enc["image_sizes"]])
        return ids, {"pixel_values": enc["pixel_values"], "image_sizes": enc["image_sizes"]}

    def image_grid(self, image_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        return self._batch_layout(image_inputs["image_sizes"]).grid

    def batch_cell_map(self, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The cell map of the batch's (shared) tile layout."""
        return self.cell_map(self._batch_layout(image_inputs["image_sizes"]))

    # -- pixel views: the tiles --------------------------------------------------------------------
    def pixel_view(self, batch: TeacherForcedBatch, index: int) -> torch.Tensor:
        """Sample ``index``'s tiles ``(tiles, C, H, W)``, global view first (batch padding dropped)."""
        layout = self._batch_layout(batch.inputs["image_sizes"])
        return batch.inputs["pixel_values"][index, : layout.tiles]

    def pool_view(self, batch: TeacherForcedBatch, values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Pool tile maps ``(..., tiles, H, W)`` per tile token, then gather them in sequence order (newline: 0)."""
        from dexar.methods.base import pool_to_grid

        layout = self._batch_layout(batch.inputs["image_sizes"])
        pooled = pool_to_grid(values, (layout.side, layout.side), reduce).flatten(-2)  # (..., tiles·g²)
        source = layout.source.to(values.device)
        out = pooled[..., source.clamp(min=0)]
        return out * (source >= 0)


def anyres_layout(model: Any, image_size: tuple[int, int]) -> AnyresLayout:
    """Run the model's ``pack_image_features`` on features that hold their own tile-token index."""
    config = model.config
    g = config.vision_config.image_size // config.vision_config.patch_size
    sizes = torch.tensor([image_size])
    rows, cols = get_anyres_image_grid_shape(sizes[0], config.image_grid_pinpoints, config.vision_config.image_size)
    tiles = 1 + rows * cols
    index = torch.arange(tiles * g * g, dtype=torch.float64).view(tiles, g * g, 1)
    newline = torch.tensor([-1.0], dtype=torch.float64)
    packed, _ = model.model.pack_image_features([index], sizes, config.vision_feature_select_strategy, newline)
    source = packed[0][:, 0].round().long()
    high = source[g * g :]
    height = int((high < 0).sum())
    width = len(high) // height - 1
    first = int(high[0]) - g * g  # the top-left kept token of the tiles
    tile, local = divmod(first, g * g)
    top = (tile // cols) * g + local // g
    left = (tile % cols) * g + local % g
    return AnyresLayout(source, (height, width), (top, left), tiles, g, cols)
