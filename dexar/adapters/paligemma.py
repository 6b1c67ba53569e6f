"""PaliGemma adapter (``PaliGemmaForConditionalGeneration``): a prefix-LM over SigLIP image tokens."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from dexar.adapters.base import DexarInputError, TeacherForcedBatch, VLMAdapter


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
        texts = [self._image_token + self.format_prompt(p) for p in prompts]
        enc = self.processor(images=self.prepare_images(images), text=texts, padding=True, return_tensors="pt")
        ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        expected = self.num_image_tokens
        for b, row in enumerate(ids):
            found = sum(1 for t in row if t == self.image_token_id)
            if found != expected:
                raise DexarInputError(f"sample {b}: prompt holds {found} image tokens, the model expects {expected}")
        return ids, {"pixel_values": enc["pixel_values"]}

    def tokenize_answer(self, answer: str) -> list[int]:
        r"""Answer ids as the processor encodes a suffix: tokenized on its own, right after the ``\n``."""
        return list(self.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"])

    def image_grid(self, image_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        n = self.num_image_tokens
        side = math.isqrt(n)
        return side, side

    def build_batch(
        self,
        prompt_ids: list[list[int]],
        answer_ids: list[list[int]],
        image_inputs: dict[str, torch.Tensor],
        device: torch.device | str | None = None,
    ) -> TeacherForcedBatch:
        """The base batch with 1-indexed positions and ``token_type_ids`` (0: prefix and padding, 1: answer)."""
        batch = super().build_batch(prompt_ids, answer_ids, image_inputs, device=None)
        inputs = batch.inputs
        n = inputs["input_ids"].shape[1]
        token_type = torch.zeros_like(inputs["input_ids"])
        for b, answer in enumerate(answer_ids):
            if answer:
                token_type[b, n - len(answer) :] = 1
        inputs["position_ids"] = inputs["position_ids"] + 1  # PaliGemmaModel's positions start at 1
        inputs["token_type_ids"] = token_type
        if device is not None:
            batch.inputs = {k: v.to(device) for k, v in inputs.items()}
        return batch
