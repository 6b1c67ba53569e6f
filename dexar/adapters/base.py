"""The adapter interface: everything the tracer and the methods need to know about one VLM family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn


class DexarInputError(ValueError):
    """Bad user input (image, prompt, model): the message says what is wrong, in one line."""


@dataclass
class TeacherForcedBatch:
    """A left-padded batch of prompt + answer sequences, ready for one forward.

    Attributes:
        inputs: Model keyword inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...).
        answer_ids: ``(B, T)`` answer token ids, right-aligned; padding is ``-1``.
        answer_lengths: ``(B,)`` number of answer tokens of each sample.
        image_grid: ``(h, w)`` of the image-token grid (same for every sample of the batch).

    """

    inputs: dict[str, torch.Tensor]
    answer_ids: torch.Tensor
    answer_lengths: torch.Tensor
    image_grid: tuple[int, int]

    @property
    def input_ids(self) -> torch.Tensor:
        """``(B, N)`` token ids of the whole sequence."""
        return self.inputs["input_ids"]

    @property
    def answer_mask(self) -> torch.Tensor:
        """``(B, T)`` True where the right-aligned answer slot holds a real token."""
        return self.answer_ids >= 0

    def answer_positions(self, index: int) -> torch.Tensor:
        """Indices in ``input_ids[index]`` of sample ``index``'s answer tokens."""
        n = self.input_ids.shape[1]
        length = int(self.answer_lengths[index])
        return torch.arange(n - length, n)

    def sample_inputs(self, index: int) -> dict[str, torch.Tensor]:
        """The exact, unpadded model inputs of one sample (batch dimension kept)."""
        mask = self.inputs["attention_mask"][index].bool()
        out: dict[str, torch.Tensor] = {}
        for key, value in self.inputs.items():
            row = value[index : index + 1]
            if key in ("input_ids", "attention_mask", "position_ids"):
                row = row[:, mask]
            out[key] = row.detach().cpu().clone()
        return out


class VLMAdapter:
    """Knows one VLM family: prompt template, image tokens and their grid, decoder internals.

    Subclasses set ``model_types`` (``config.model_type`` values they handle) and implement the
    abstract accessors. Instances wrap a loaded model and its processor.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    prompt_template: ClassVar[str] = "{prompt}"

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor

    # -- model internals -------------------------------------------------------------------
    @property
    def text_config(self) -> Any:
        """Config of the language model whose attention is traced."""
        raise NotImplementedError

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers, in order."""
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied to the last hidden state before the unembedding."""
        raise NotImplementedError

    @property
    def unembedding(self) -> nn.Linear:
        """The LM head (hidden → vocabulary logits)."""
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        """Id of the image placeholder token in ``input_ids``."""
        raise NotImplementedError

    def backbone_forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        """Forward through vision tower and LLM without the LM head over all positions."""
        return self.model.model(**inputs, use_cache=False)

    # -- encoding --------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer."""
        return self.processor.tokenizer

    def format_prompt(self, prompt: str) -> str:
        """Apply the model's prompt template (paper appendix B)."""
        return self.prompt_template.format(prompt=prompt)

    def encode_prompts(
        self, images: list[Image.Image], prompts: list[str]
    ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        """Encode images and prompts: unpadded prompt ids per sample and the batched image inputs."""
        raise NotImplementedError

    def tokenize_answer(self, answer: str) -> list[int]:
        """Token ids of an answer text as the model would generate it after the prompt."""
        raise NotImplementedError

    def image_grid(self, image_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        """``(h, w)`` of the image-token grid for these image inputs."""
        raise NotImplementedError

    def build_batch(
        self,
        prompt_ids: list[list[int]],
        answer_ids: list[list[int]],
        image_inputs: dict[str, torch.Tensor],
        device: torch.device | str | None = None,
    ) -> TeacherForcedBatch:
        """Concatenate prompt and answer ids, left-pad, and attach the image inputs."""
        if len(prompt_ids) != len(answer_ids):
            raise ValueError("prompt_ids and answer_ids must have one entry per sample")
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        seqs = [list(p) + list(a) for p, a in zip(prompt_ids, answer_ids, strict=True)]
        n = max(len(s) for s in seqs)
        t_max = max(1, max(len(a) for a in answer_ids))
        input_ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), n), dtype=torch.long)
        answers = torch.full((len(seqs), t_max), -1, dtype=torch.long)
        for b, (seq, ans) in enumerate(zip(seqs, answer_ids, strict=True)):
            input_ids[b, n - len(seq) :] = torch.tensor(seq)
            attention_mask[b, n - len(seq) :] = 1
            if ans:
                answers[b, t_max - len(ans) :] = torch.tensor(ans)
        # Positions count real tokens only, so a left-padded sample is computed as if it were alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            **image_inputs,
        }
        if device is not None:
            inputs = {k: v.to(device) for k, v in inputs.items()}
        lengths = torch.tensor([len(a) for a in answer_ids], dtype=torch.long)
        return TeacherForcedBatch(inputs, answers, lengths, self.image_grid(image_inputs))

    def prepare_images(self, images: list[Image.Image]) -> list[Image.Image]:
        """Convert any PIL mode (L, RGBA, CMYK, P, ...) to RGB; RGBA/P alpha is composited on white."""
        out = []
        for image in images:
            if not isinstance(image, Image.Image):
                raise DexarInputError(f"expected a PIL image, got {type(image).__name__}")
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(canvas, rgba)
            out.append(image.convert("RGB"))
        return out

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` True at image-token positions."""
        return input_ids == self.image_token_id

    def decode_tokens(self, token_ids: list[int]) -> list[str]:
        """Readable text of each token on its own (for labels and plots)."""
        return [self.tokenizer.decode([t]).strip() or self.tokenizer.convert_ids_to_tokens(t) for t in token_ids]
