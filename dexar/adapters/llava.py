"""LLaVA-family adapter: LLaVA-1.5, BakLLaVA and the bundled Shapes model (``LlavaForConditionalGeneration``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image
from torch import nn

from dexar.adapters.base import DexarInputError, VLMAdapter


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
        texts = [self.format_prompt(p) for p in prompts]
        enc = self.processor(images=self.prepare_images(images), text=texts, padding=True, return_tensors="pt")
        ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        expected = self.num_image_tokens
        for b, row in enumerate(ids):
            found = sum(1 for t in row if t == self.image_token_id)
            if found != expected:
                raise DexarInputError(f"sample {b}: prompt holds {found} image tokens, the model expects {expected}")
        return ids, {"pixel_values": enc["pixel_values"]}

    def tokenize_answer(self, answer: str) -> list[int]:
        """Answer ids as they follow the prompt: the suffix of tokenize(prompt + " " + answer).

        Tokenizing in context keeps SentencePiece word-boundary markers right; if the prompt's ids are
        not a prefix of the joint ids, the answer is tokenized on its own.
        """
        prompt = self.format_prompt("x")
        joint = self.tokenizer(prompt + " " + answer.strip(), add_special_tokens=False)["input_ids"]
        alone = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if joint[: len(alone)] == alone:
            return list(joint[len(alone) :])
        return list(self.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"])

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
