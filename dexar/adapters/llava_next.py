"""LLaVA-NeXT (LLaVA-1.6) adapter: anyres tiles + a global view, merged into one full-image map.

The image processor picks the best grid resolution among ``image_grid_pinpoints``, resizes the image
into it keeping the aspect ratio, pads it (centred), and cuts ``crop × crop`` tiles; the whole image
squashed to ``crop × crop`` is the global view (tile 0). Each tile gives a ``g × g`` token grid
(``g = image_size / patch_size``, CLS dropped). The model sends the global view's ``g²`` tokens
first, then the tiles' tokens reassembled into one ``(rows·g) × (cols·g)`` grid, with the padding's
token rows/columns removed (``unpad_image``) and an ``image_newline`` token after every row.

Geometry: the unpadded high-resolution grid ``(H_u, W_u)`` is the full-image map (it spans the
original image); the token order is read off the model's own ``pack_image_features``. Merge rule
(:mod:`dexar.adapters.tiles`): a tile token's value goes to its cell (weight 1); a global-view token
covers ``1/g × 1/g`` of the image and its value is shared among the cells it overlaps in proportion
to the overlap area (Σ of the map = Σ over tokens); newline tokens show no region (weight 0).
Tiles do not overlap. Different images give different layouts: samples are batched by layout
(:meth:`LlavaNextAdapter.grid_key`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from dexar.adapters.base import DexarInputError, TeacherForcedBatch
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

    """

    source: torch.Tensor
    grid: tuple[int, int]
    offset: tuple[int, int]
    tiles: int
    side: int
    per_row: int

    @property
    def key(self) -> tuple[int, ...]:
        """Equal keys, equal layouts."""
        return (self.tiles, *self.grid, *self.offset)


class LlavaNextAdapter(LlavaAdapter):
    r"""``LlavaNextForConditionalGeneration`` (llava-v1.6-mistral / vicuna, llava-next-\*).

    Prompt template: ``[INST] <image>\n{prompt} [/INST]`` for a Mistral LLM, else LLaVA-1.5's
    ``USER: <image>\n{prompt} ASSISTANT:`` (vicuna checkpoints).
    """

    model_types = ("llava_next",)
    pixel_perturbation = False  # patches/tiles: perturbation would need per-view re-encoding

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
            cache[size] = anyres_layout(self.model, size)
        return cache[size]

    def grid_key(self, image: Image.Image) -> tuple[int, ...]:
        return self.layout((image.height, image.width)).key

    def _batch_layout(self, image_sizes: torch.Tensor) -> AnyresLayout:
        layouts = [self.layout(tuple(size.tolist())) for size in image_sizes]
        if any(lay.key != layouts[0].key for lay in layouts):
            raise DexarInputError(
                f"one batch needs one tile layout, got {[lay.key for lay in layouts]}: group samples by grid_key "
                "(the Explainer does)"
            )
        return layouts[0]

    def cell_map(self, layout: AnyresLayout) -> torch.Tensor:
        """``(H_u·W_u, V)`` merge of the image tokens into the full-image map (module docstring)."""
        g, (h, w), (top, left) = layout.side, layout.grid, layout.offset
        valid = layout.source >= 0
        source = layout.source.clamp(min=0)
        tile, local = source // (g * g), source % (g * g)
        row, col = local // g, local % g
        global_boxes = grid_boxes(row, col, g, g)
        tile_row, tile_col = (tile - 1).clamp(min=0) // layout.per_row, (tile - 1).clamp(min=0) % layout.per_row
        big_row, big_col = tile_row * g + row - top, tile_col * g + col - left
        tile_boxes = grid_boxes(big_row, big_col, h, w)
        boxes = torch.where((tile == 0)[:, None], global_boxes, tile_boxes)
        return box_cell_map(boxes, valid, (h, w))

    # -- encoding -----------------------------------------------------------------------------
    def encode_prompts(
        self, images: list[Image.Image], prompts: list[str]
    ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        texts = [self.format_prompt(p) for p in prompts]
        enc = self.processor(images=self.prepare_images(images), text=texts, padding=True, return_tensors="pt")
        ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        for b, (row, size) in enumerate(zip(ids, enc["image_sizes"], strict=True)):
            found = sum(1 for t in row if t == self.image_token_id)
            expected = len(self.layout(tuple(size.tolist())).source)
            if found != expected:
                raise DexarInputError(f"sample {b}: prompt holds {found} image tokens, the model expects {expected}")
        return ids, {"pixel_values": enc["pixel_values"], "image_sizes": enc["image_sizes"]}

    def image_grid(self, image_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        return self._batch_layout(image_inputs["image_sizes"]).grid

    def build_batch(
        self,
        prompt_ids: list[list[int]],
        answer_ids: list[list[int]],
        image_inputs: dict[str, torch.Tensor],
        device: torch.device | str | None = None,
    ) -> TeacherForcedBatch:
        """The LLaVA batch plus the cell map of its (shared) tile layout."""
        batch = super().build_batch(prompt_ids, answer_ids, image_inputs, device=device)
        layout = self._batch_layout(image_inputs["image_sizes"])
        return dataclasses.replace(batch, cell_map=self.cell_map(layout))

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
