"""Idefics3 and SmolVLM adapter: image splitting into tiles + a global view, merged into one full-image map.

The image processor resizes the image (longest edge ``size``), then to multiples of the tile size
``max_image_size``, cuts it into ``rows × cols`` non-overlapping tiles (row-major) and appends the
whole image squashed to one tile (the global view, last); an image no larger than one tile is sent
as the global view alone. The vision tower encodes each tile; the connector's pixel shuffle merges
``scale × scale`` patches, so a tile gives an ``m × m`` token grid, row-major
(``m = image_size / patch_size / scale_factor``, ``m²`` = the processor's ``image_seq_len``).
Prompt (the processor's rule): per tile ``<fake_token_around_image><row_r_col_c>`` + ``m²``
``<image>``, a newline after each tile row, then a newline, ``<fake_token_around_image><global-img>`` + ``m²``
``<image>`` + ``<fake_token_around_image>``. The markers are text tokens.

Geometry: the full-image map is the ``(rows·m) × (cols·m)`` grid of tile tokens (the resized image
covers the whole original image). Merge rule (:mod:`dexar.adapters.tiles`): a tile token's value goes
to its cell (weight 1, tiles do not overlap); a global-view token covers ``1/m × 1/m`` of the image
and its value is shared among the cells it overlaps in proportion to the area (Σ of the map = Σ over
tokens). Without splitting the map is the global view's ``m × m`` grid.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dexar.adapters.base import DexarInputError, TeacherForcedBatch, VLMAdapter
from dexar.adapters.encoding import answer_after_prompt, check_image_tokens
from dexar.adapters.geometry import MapGeometry
from dexar.adapters.tiles import box_cell_map, grid_boxes

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
TEMPLATES = {
    "idefics3": "User:<image>{prompt}<end_of_utterance>\nAssistant:",
    "smolvlm": "<|im_start|>User:<image>{prompt}<end_of_utterance>\nAssistant:",
}
LAYOUT_KEYS = ("image_rows", "image_cols")
"""Batch-building inputs that never reach the model (the tile grid of each sample)."""


def image_prompt(rows: int, cols: int, seq_len: int) -> str:
    """The processor's expansion of one ``<image>`` for ``rows × cols`` tiles (``0 × 0``: global view only)."""
    tile_tokens = IMAGE_TOKEN * seq_len
    global_view = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{tile_tokens}{FAKE_TOKEN}"
    if rows == 0 and cols == 0:
        return global_view
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{tile_tokens}"
        text += "\n"
    return text + "\n" + global_view


class Idefics3Adapter(VLMAdapter):
    r"""``Idefics3ForConditionalGeneration`` (Idefics3-8B-Llama3) and ``SmolVLMForConditionalGeneration`` (SmolVLM).

    Prompt template: ``User:<image>{prompt}<end_of_utterance>\nAssistant:`` (the models' chat
    template; SmolVLM prefixes ``<|im_start|>``).
    """

    model_types = ("idefics3", "smolvlm")
    pixel_perturbation = False  # patches/tiles: perturbation would need per-view re-encoding
    row_local_text_models = ("llama", "mistral", "qwen2")  # pre-norm blocks: row-local outside attention

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        self.prompt_template = TEMPLATES[model.config.model_type]

    @property
    def _inner(self) -> nn.Module:
        return self.model.model

    @property
    def _lm(self) -> nn.Module:
        return self._inner.text_model

    @property
    def image_processor(self) -> Any:
        """The processor's image processor."""
        return self.processor.image_processor

    @property
    def side(self) -> int:
        """Tokens per tile side ``m``."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size // self.model.config.scale_factor

    # -- vision: every tile is real (no all-zero "padding image" dropping) ---------------------------
    def image_features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``(B·tiles·m², D)`` connector outputs of every tile, in sequence order.

        The model's own ``get_image_features`` drops all-zero tiles as batch padding, which would
        drop the mean-image baseline (zero in normalised space) of Integrated Gradients and IIA; a
        batch here holds one tile layout, so every tile is real.
        """
        b, n = pixel_values.shape[:2]
        pixels = pixel_values.reshape(b * n, *pixel_values.shape[2:]).to(self._inner.dtype)
        if pixel_attention_mask is None:
            mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool, device=pixels.device)
        else:
            mask = pixel_attention_mask.reshape(b * n, *pixel_attention_mask.shape[2:]).bool()
        patch = self.model.config.vision_config.patch_size
        cells = mask.unfold(1, patch, patch).unfold(2, patch, patch)
        patch_mask = cells.sum(dim=(-1, -2)) > 0
        hidden = self._inner.vision_model(pixel_values=pixels, patch_attention_mask=patch_mask).last_hidden_state
        features = self._inner.connector(hidden)
        return features.reshape(-1, features.shape[-1])

    def backbone_forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        inputs = dict(inputs)
        pixels = inputs.pop("pixel_values")
        features = self.image_features(pixels, inputs.pop("pixel_attention_mask", None))
        encoded = {"image": BaseModelOutputWithPooling(pooler_output=[features])}
        return self._inner(**inputs, mm_encoder_outputs=encoded, use_cache=False)

    # -- encoding ---------------------------------------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        if IMAGE_TOKEN in prompt:
            raise DexarInputError(f"the prompt must not contain {IMAGE_TOKEN!r}: the adapter inserts the image")
        return super().format_prompt(prompt)

    def _process(self, images: list[Image.Image]) -> dict[str, Any]:
        images = [[im] for im in self.prepare_images(images)]
        return self.image_processor(images=images, return_row_col_info=True, return_tensors="pt")

    def map_geometry(self, image: Image.Image) -> MapGeometry:
        """The whole image: resizes (longest edge, then multiples of the tile) and tiles cover it, nothing is cropped.

        The tiles are all ``max_image_size`` squares and the global view is the whole image squashed to
        one, so the batch padding of ``do_pad`` never pads one image of this adapter's batches.
        """
        return MapGeometry.whole((image.height, image.width))

    def grid_key(self, image: Image.Image) -> tuple[int, int]:
        """``(rows, cols)`` of the image's tiles: samples with equal tilings share a batch."""
        out = self._process([image])
        return int(out["rows"][0][0]), int(out["cols"][0][0])

    def encode_prompts(
        self, images: list[Image.Image], prompts: list[str]
    ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        out = self._process(images)
        rows = [int(r[0]) for r in out["rows"]]
        cols = [int(c[0]) for c in out["cols"]]
        seq_len = self.side**2
        ids = []
        for b, prompt in enumerate(prompts):
            text = self.format_prompt(prompt).replace(IMAGE_TOKEN, image_prompt(rows[b], cols[b], seq_len))
            ids.append(list(self.tokenizer(text)["input_ids"]))
        expected = [(r * c + 1) * seq_len for r, c in zip(rows, cols, strict=True)]
        check_image_tokens(self, ids, expected, "the image gives")
        image_inputs = {"pixel_values": out["pixel_values"], "image_rows": torch.tensor(rows)}
        image_inputs["image_cols"] = torch.tensor(cols)
        if "pixel_attention_mask" in out:
            image_inputs["pixel_attention_mask"] = out["pixel_attention_mask"]
        return ids, image_inputs

    def tokenize_answer(self, answer: str) -> list[int]:
        """Answer ids as they follow ``Assistant:`` after a space (:meth:`answer_after_prompt`)."""
        return answer_after_prompt(self, answer, " ")

    def _tiling(self, image_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        rows, cols = image_inputs["image_rows"], image_inputs["image_cols"]
        if (rows != rows[0]).any() or (cols != cols[0]).any():
            raise DexarInputError(
                f"one batch needs one tiling, got rows {rows.tolist()} cols {cols.tolist()}: group samples by grid_key "
                "(the Explainer does)"
            )
        return int(rows[0]), int(cols[0])

    def image_grid(self, image_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        rows, cols = self._tiling(image_inputs)
        m = self.side
        return (max(rows, 1) * m, max(cols, 1) * m)

    def cell_map(self, rows: int, cols: int) -> torch.Tensor:
        """``(rows·m·cols·m, V)`` merge of the image tokens (tiles row-major, global view last)."""
        m = self.side
        local = torch.arange(m * m)
        r, c = local // m, local % m
        global_boxes = grid_boxes(r, c, m, m)
        if rows == 0 and cols == 0:
            return box_cell_map(global_boxes, torch.ones(m * m, dtype=torch.bool), (m, m))
        tile = torch.arange(rows * cols).repeat_interleave(m * m)
        big_r = (tile // cols) * m + r.repeat(rows * cols)
        big_c = (tile % cols) * m + c.repeat(rows * cols)
        boxes = torch.cat([grid_boxes(big_r, big_c, rows * m, cols * m), global_boxes])
        return box_cell_map(boxes, torch.ones(len(boxes), dtype=torch.bool), (rows * m, cols * m))

    def batch_inputs(self, inputs: dict[str, torch.Tensor], answer_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """The inputs without the tile grid (:data:`LAYOUT_KEYS`), which never reaches the model."""
        return {k: v for k, v in inputs.items() if k not in LAYOUT_KEYS}

    def batch_cell_map(self, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The cell map that merges the batch's (one) tiling."""
        return self.cell_map(*self._tiling(image_inputs))

    # -- pixel views: the tiles ------------------------------------------------------------------
    def pool_view(self, batch: TeacherForcedBatch, values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Pool tile maps ``(..., tiles, H, W)`` onto each tile's ``m × m`` tokens: sequence order."""
        from dexar.methods.base import pool_to_grid

        return pool_to_grid(values, (self.side, self.side), reduce).flatten(-2)
