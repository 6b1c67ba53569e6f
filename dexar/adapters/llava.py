"""LLaVA-family adapter: LLaVA-1.5, BakLLaVA and the bundled Shapes model (``LlavaForConditionalGeneration``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image
from torch import nn

from dexar.adapters.base import DexarInputError, VLMAdapter
from dexar.adapters.encoding import answer_after_prompt, check_image_tokens, processor_encode


class LlavaAdapter(VLMAdapter):
    r"""Decoder-only LLaVA: image features replace ``<image>`` placeholders in the LLM's input.

    Prompt template (paper appendix B): ``USER: <image>\n{prompt} ASSISTANT:``. The image grid is
    square: 24×24 for LLaVA-1.5-336 (patch 14, CLS dropped), 8×8 for the Shapes model.

    Geometry (:attr:`view`): the ``llava-hf`` processors resize the shortest edge to 336 and center-crop
    336×336, so on a non-square image the grid covers only the central crop; the grid spans the
    crop's top-left ``side · patch`` pixels (the patch convolution's reach), mapped back to the image.
    """

    model_types = ("llava",)
    prompt_template = "USER: <image>\n{prompt} ASSISTANT:"
    row_local_text_models = ("llama", "mistral", "qwen2")  # pre-norm blocks: row-local outside attention

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        _ = self.view  # an image processor of unknown geometry fails here, at setup

    @property
    def view_span(self) -> tuple[int, int]:
        """The patch convolution's reach over the view: ``side · patch`` pixels a side."""
        side = self.image_grid({})[0] * self.model.config.vision_config.patch_size
        return side, side

    def format_prompt(self, prompt: str) -> str:
        if "<image>" in prompt:
            raise DexarInputError(
                "the prompt must not contain '<image>': the adapter inserts the image into the template "
                f"{self.prompt_template!r}"
            )
        return super().format_prompt(prompt)

    def encode_prompts(
        self, images: list[Image.Image], prompts: list[str]
    ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        ids, enc = processor_encode(self, images, [self.format_prompt(p) for p in prompts])
        check_image_tokens(self, ids, [self.num_image_tokens] * len(ids))
        return ids, {"pixel_values": enc["pixel_values"]}

    def tokenize_answer(self, answer: str) -> list[int]:
        """Answer ids as they follow the prompt after a space (:meth:`answer_after_prompt`)."""
        return answer_after_prompt(self, answer, " ")

    @property
    def num_image_tokens(self) -> int:
        """Image features per image: (size/patch)² (+1 CLS unless the strategy drops it)."""
        vision = self.model.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        if self.model.config.vision_feature_select_strategy != "default":
            n += 1
        return n

    def image_grid(self, image_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        n = self.num_image_tokens
        side = math.isqrt(n)
        if side * side != n:
            raise DexarInputError(f"LLaVA image tokens ({n}) do not form a square grid (full strategy keeps CLS)")
        return side, side
