"""PaliGemma adapter (``PaliGemmaForConditionalGeneration``): a prefix-LM over SigLIP image tokens."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from dexar.adapters.base import DexarInputError, VLMAdapter
from dexar.adapters.encoding import answer_alone, check_image_tokens, processor_encode


class PaliGemmaAdapter(VLMAdapter):
    r"""PaliGemma: ``<image>×V <bos> {prompt}\n`` is the prefix, the answer follows it.

    The prefix (image and prompt tokens, ``token_type_ids == 0``) attends bidirectionally within
    itself; answer tokens (``token_type_ids == 1``) attend causally. The predicting row ``p_t`` of
    answer token ``w_t`` is the last prefix token (the ``\n``) for ``t = 0`` and answer token
    ``w_{t-1}`` after that; its unmasked columns are the whole prefix and ``w_{<t}``, so the head
    filter's text columns (non-image, unmasked, at or before ``p_t``) are the prompt tokens and the
    earlier answer tokens, never a masked or future column.

    The image grid is the SigLIP patch grid, row-major: ``(image_size / patch_size)²`` (16×16 at 224 px).
    Geometry (:attr:`view`): the SigLIP processor resizes the whole image to 224×224 (no crop), so the
    grid covers the whole image.
    Positions are 1-indexed as in ``PaliGemmaModel``. Prompt template (paper appendix B): the prompt
    as is; the paper's captioning prompt is :attr:`paper_prompt`.
    """

    model_types = ("paligemma",)
    row_local_text_models = ("gemma",)  # Gemma 1 blocks: pre-norm, row-local outside attention
    prompt_template = "{prompt}"
    paper_prompt: ClassVar[str] = "Cap."

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        text = model.config.text_config
        if getattr(text, "attn_logit_softcapping", None) is not None or getattr(text, "sliding_window", None):
            raise DexarInputError(
                f"PaliGemma with a {text.model_type} text model (attention soft-capping / sliding window, "
                "e.g. PaliGemma 2) is not supported; use a PaliGemma (Gemma) checkpoint such as "
                "google/paligemma-3b-pt-224"
            )
        _ = self.view  # an image processor of unknown geometry fails here, at setup

    @property
    def view_span(self) -> tuple[int, int]:
        """The patch convolution's reach over the view: ``side · patch`` pixels a side."""
        side = self.image_grid({})[0] * self.model.config.vision_config.patch_size
        return side, side

    @property
    def _image_token(self) -> str:
        return str(getattr(self.processor, "image_token", "<image>"))

    def format_prompt(self, prompt: str) -> str:
        if self._image_token in prompt:
            raise DexarInputError(
                f"the prompt must not contain {self._image_token!r}: the adapter puts the image tokens in front"
            )
        return super().format_prompt(prompt)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: the SigLIP patch count."""
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def encode_prompts(
        self, images: list[Image.Image], prompts: list[str]
    ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        ids, enc = processor_encode(self, images, [self._image_token + self.format_prompt(p) for p in prompts])
        check_image_tokens(self, ids, [self.num_image_tokens] * len(ids))
        return ids, {"pixel_values": enc["pixel_values"]}

    def tokenize_answer(self, answer: str) -> list[int]:
        r"""Answer ids as the processor encodes a suffix: tokenized on its own, right after the ``\n``."""
        return answer_alone(self, answer)

    def image_grid(self, image_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        n = self.num_image_tokens
        side = math.isqrt(n)
        return side, side

    def batch_inputs(self, inputs: dict[str, torch.Tensor], answer_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """1-indexed positions and ``token_type_ids`` (0: prefix and padding, 1: answer)."""
        n = inputs["input_ids"].shape[1]
        token_type = torch.zeros_like(inputs["input_ids"])
        for b, answer in enumerate(answer_ids):
            if answer:
                token_type[b, n - len(answer) :] = 1
        inputs["position_ids"] = inputs["position_ids"] + 1  # PaliGemmaModel's positions start at 1
        inputs["token_type_ids"] = token_type
        return inputs
