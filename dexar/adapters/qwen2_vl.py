"""Qwen2-VL and Qwen2.5-VL adapter: dynamic resolution, one image-token grid per image.

The image processor resizes each image to multiples of ``patch × merge`` pixels (``smart_resize``)
and returns flattened patches (``pixel_values``, ``(Σ patches, C·t·P·P)``) with ``image_grid_thw``
(``(images, 3)``, in patches). The vision tower merges ``merge × merge`` patches into one LLM token,
so an image gives ``(h/merge) × (w/merge)`` image tokens, row-major over the resized image. Each
sample carries its own grid: samples with different grids are traced in different sub-batches
(:meth:`Qwen2VLAdapter.grid_key`). Positions are the model's own M-RoPE ids: the adapter passes no
``position_ids``; the model derives them from ``input_ids``, ``mm_token_type_ids``,
``image_grid_thw`` and the attention mask, so a left-padded sample gets the positions it has alone.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from dexar.adapters.base import DexarInputError, TeacherForcedBatch, VLMAdapter
from dexar.adapters.encoding import answer_after_prompt, check_image_tokens
from dexar.adapters.geometry import MapGeometry

IMAGE_TOKEN = "<|image_pad|>"
ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
"""Inputs with one entry per sequence position (unpadded with the attention mask)."""


class Qwen2VLBatch(TeacherForcedBatch):
    """A Qwen2-VL batch: pixel patches are concatenated over images, one ``image_grid_thw`` row each."""

    def patch_span(self, index: int) -> slice:
        """Rows of ``pixel_values`` holding sample ``index``'s patches."""
        sizes = self.inputs["image_grid_thw"].prod(-1)
        start = int(sizes[:index].sum())
        return slice(start, start + int(sizes[index]))

    def sample_inputs(self, index: int) -> dict[str, torch.Tensor]:
        """The exact, unpadded model inputs of one sample (batch dimension kept)."""
        mask = self.inputs["attention_mask"][index].bool()
        out: dict[str, torch.Tensor] = {}
        for key, value in self.inputs.items():
            if key == "pixel_values":
                row = value[self.patch_span(index)]
            else:
                row = value[index : index + 1]
                if key in ROW_KEYS:
                    row = row[:, mask]
            out[key] = row.detach().cpu().clone()
        return out


class Qwen2VLAdapter(VLMAdapter):
    r"""Qwen2-VL / Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

    Prompt template: the models' chat template with its default system turn,
    ``<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n``
    ``<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n``.
    The single ``<|image_pad|>`` is expanded to ``t·h·w / merge²`` copies (the processor's rule).
    Image-token grid: ``(h/merge, w/merge)`` from the image's ``image_grid_thw`` row.
    """

    model_types = ("qwen2_vl", "qwen2_5_vl")
    pixel_perturbation = False  # patches/tiles: perturbation would need per-view re-encoding
    # pre-norm Qwen2 blocks: row-local outside attention (M-RoPE cos/sin are sliced)
    row_local_text_models = ("qwen2_vl_text", "qwen2_5_vl_text", "qwen2_vl", "qwen2_5_vl")
    batch_class = Qwen2VLBatch
    prompt_template = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )

    @property
    def image_processor(self) -> Any:
        """The processor's image processor."""
        return self.processor.image_processor

    @property
    def merge(self) -> int:
        """Patches merged per side into one LLM token (``spatial_merge_size``)."""
        return int(self.model.config.vision_config.spatial_merge_size)

    def format_prompt(self, prompt: str) -> str:
        if IMAGE_TOKEN in prompt or "<|vision_start|>" in prompt:
            raise DexarInputError(
                f"the prompt must not contain {IMAGE_TOKEN!r}: the adapter inserts the image into the template"
            )
        return super().format_prompt(prompt)

    def _process(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=self.prepare_images(images), return_tensors="pt")
        processor_merge = getattr(self.image_processor, "merge_size", self.merge)
        if processor_merge != self.merge:
            raise DexarInputError(f"image processor merge_size {processor_merge} != model's {self.merge}")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def map_geometry(self, image: Image.Image) -> MapGeometry:
        """The whole image: ``smart_resize`` rescales it to multiples of ``patch · merge`` (no crop, no padding)."""
        return MapGeometry.whole((image.height, image.width))

    def grid_key(self, image: Image.Image) -> tuple[int, ...]:
        """The image's ``(t, h, w)`` patch grid: samples with equal grids share a batch."""
        return tuple(int(x) for x in self._process([image])["image_grid_thw"][0])

    def encode_prompts(
        self, images: list[Image.Image], prompts: list[str]
    ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        image_inputs = self._process(images)
        counts = (image_inputs["image_grid_thw"].prod(-1) // self.merge**2).tolist()
        ids = []
        for prompt, count in zip(prompts, counts, strict=True):
            text = self.format_prompt(prompt).replace(IMAGE_TOKEN, IMAGE_TOKEN * int(count))
            ids.append(list(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
        check_image_tokens(self, ids, counts, "the image gives")
        return ids, image_inputs

    def tokenize_answer(self, answer: str) -> list[int]:
        """Answer ids as they follow the prompt, no space in between (:meth:`answer_after_prompt`)."""
        return answer_after_prompt(self, answer, "")

    def image_grid(self, image_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        grids = image_inputs["image_grid_thw"]
        if (grids != grids[:1]).any():
            raise DexarInputError(
                f"one batch needs one image grid, got {grids.tolist()}: group samples by grid_key (the Explainer does)"
            )
        t, h, w = (int(x) for x in grids[0])
        if t != 1:
            raise DexarInputError(f"expected a still image (temporal grid 1), got t={t}")
        return h // self.merge, w // self.merge

    def batch_inputs(self, inputs: dict[str, torch.Tensor], answer_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """No ``position_ids`` (the model computes M-RoPE) and ``mm_token_type_ids`` (1 at image tokens)."""
        inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).to(torch.int32)
        return inputs

    # -- pixel views: the resized image behind the flattened patches ----------------------------
    def _patch_shape(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        return int(vision.patch_size), int(vision.temporal_patch_size)

    def pixel_view(self, batch: TeacherForcedBatch, index: int) -> torch.Tensor:
        """Sample ``index``'s normalised, resized image ``(C, H, W)`` rebuilt from its patches.

        The ``t`` temporal copies of a still image are equal; the view is their mean.
        """
        if not isinstance(batch, Qwen2VLBatch):
            raise TypeError("expected a batch from Qwen2VLAdapter.build_batch")
        patches = batch.inputs["pixel_values"][batch.patch_span(index)]
        _, gh, gw = (int(x) for x in batch.inputs["image_grid_thw"][index])
        patch, temporal = self._patch_shape()
        m = self.merge
        channels = patches.shape[-1] // (temporal * patch * patch)
        x = patches.reshape(gh // m, gw // m, m, m, channels, temporal, patch, patch).mean(5)
        return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, gh * patch, gw * patch)

    def view_to_patches(self, views: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pixel_view` for ``(K, C, H, W)`` views: ``(K·patches, C·t·P·P)``."""
        patch, temporal = self._patch_shape()
        m = self.merge
        k, channels, height, width = views.shape
        a, b = height // (patch * m), width // (patch * m)
        x = views.reshape(k, channels, a, m, patch, b, m, patch).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(k, a, b, m, m, channels, temporal, patch, patch)
        return x.reshape(k * a * b * m * m, channels * temporal * patch * patch)

    def repeat_sample(self, batch: TeacherForcedBatch, index: int, views: torch.Tensor) -> TeacherForcedBatch:
        k = views.shape[0]
        inputs = {}
        for name, value in batch.inputs.items():
            if name == "pixel_values":
                inputs[name] = self.view_to_patches(views)
            else:
                inputs[name] = value[index : index + 1].expand(k, *value.shape[1:])
        answer_ids = batch.answer_ids[index : index + 1].expand(k, -1)
        return Qwen2VLBatch(inputs, answer_ids, batch.answer_lengths[index : index + 1].expand(k), batch.image_grid)
