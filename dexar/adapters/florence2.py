"""Florence-2 adapter (native ``Florence2ForConditionalGeneration``): DaViT features → BART encoder-decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from dexar.adapters.base import DexarInputError, TeacherForcedBatch, VLMAdapter, answer_slots, to_device
from dexar.adapters.encoding import answer_alone, check_image_tokens, processor_encode


@dataclass
class Seq2SeqBatch(TeacherForcedBatch):
    """A teacher-forced encoder-decoder batch; both sequences are right-padded.

    BART's learned positions count from the first position of each sequence, so the real tokens of
    every sample must start at position 0: ``input_ids`` / ``attention_mask`` hold the encoder
    sequence (image features, then the prompt), ``decoder_input_ids`` / ``decoder_attention_mask``
    the decoder prefix (:attr:`prefix_length` tokens, e.g. ``</s> <s>``) followed by the answer.
    ``answer_ids`` stay right-aligned in their ``T`` slots like every batch.

    Attributes:
        prefix_length: Decoder tokens before the answer (same for every sample).

    """

    prefix_length: int = 1

    @property
    def input_ids(self) -> torch.Tensor:
        """``(B, M)`` the decoder sequence, the one that holds the answer (what generation extends)."""
        return self.inputs["decoder_input_ids"]

    def answer_positions(self, index: int) -> torch.Tensor:
        """Indices in ``decoder_input_ids[index]`` of sample ``index``'s answer tokens."""
        length = int(self.answer_lengths[index])
        return torch.arange(self.prefix_length, self.prefix_length + length)

    def unpadded_answer_positions(self, index: int) -> torch.Tensor:
        """The same indices (the decoder is right-padded, so they hold in the unpadded sequence)."""
        return self.answer_positions(index)

    def sample_inputs(self, index: int) -> dict[str, torch.Tensor]:
        """The exact, unpadded model inputs of one sample (batch dimension kept)."""
        encoder = self.inputs["attention_mask"][index].bool()
        decoder = self.inputs["decoder_attention_mask"][index].bool()
        out: dict[str, torch.Tensor] = {}
        for key, value in self.inputs.items():
            row = value[index : index + 1]
            if key in ("input_ids", "attention_mask"):
                row = row[:, encoder]
            elif key in ("decoder_input_ids", "decoder_attention_mask"):
                row = row[:, decoder]
            out[key] = row.detach().cpu().clone()
        return out


class Florence2Adapter(VLMAdapter):
    """Florence-2: DEX-AR over the BART decoder's cross-attention (paper appendix D).

    The encoder reads ``V + 1`` image features (one pooled feature, the mean over the grid, then
    the DaViT grid row-major: ``Florence2MultiModalProjector``'s order) followed by
    ``<s> prompt </s>``; task tokens such as ``<DETAILED_CAPTION>`` are expanded by the processor.
    The decoder reads ``</s> <s>`` and the answer. The traced attention is each decoder layer's
    cross-attention: its columns are the encoder positions, the image columns are the grid
    features, the head filter's text columns are the prompt tokens (the pooled feature is neither:
    it has no place in the grid). Logit lens: ``U[w] · h^l`` of the decoder layer outputs (post-norm
    layers, no final norm).

    Needs refused (:attr:`refused_needs`; the methods refused follow, :attr:`refused_methods`): those
    defined on a decoder's self-attention over image and text tokens or on image hidden states in the
    decoder. Each refused need has one user today; its reason says what that method does with it.

    Geometry (:attr:`view`): the processor resizes the whole image to 768×768 (no crop); the DaViT
    grid is taken as the even partition of that view (the stem's padded convolutions centre each
    feature's receptive field up to half a cell above-left of its cell; not modelled), so it covers
    the whole image.
    """

    model_types = ("florence2",)
    prompt_template = "{prompt}"
    paper_prompt: ClassVar[str] = "<DETAILED_CAPTION>"
    architecture: ClassVar[str] = "cross"
    refused_needs: ClassVar[dict[str, str]] = {
        "full_attention": "attention rollout multiplies self-attention matrices over image and text tokens",
        "final_logit_grads": "CheferCAM propagates relevance through self-attention over image and text tokens",
        "attention_probes": "IIA integrates and rolls out self-attention over image and text tokens",
        "hidden_grads": "GradCAM reads image hidden states in the decoder, which holds none",
        "hidden_states": "TAM reads image hidden states through the LM head, which the decoder holds none of",
    }

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        self._identity = nn.Identity()
        _ = self.view  # an image processor of unknown geometry fails here, at setup (the grid spans the view)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self._lm.decoder.layers

    @property
    def cross_attention_modules(self) -> list[nn.Module]:
        """Each decoder layer's cross-attention module, in layer order."""
        return [layer.encoder_attn for layer in self.decoder_layers]

    @property
    def final_norm(self) -> nn.Module:
        return self._identity

    @property
    def decoder_prefix(self) -> list[int]:
        """Decoder tokens before the answer: the decoder start token and ``<s>`` (``</s> <s>`` for BART)."""
        start = getattr(self.model.generation_config, "decoder_start_token_id", None)
        if start is None:
            start = self.text_config.decoder_start_token_id
        bos = self.tokenizer.bos_token_id
        return [int(start)] + ([int(bos)] if bos is not None else [])

    def explained_prompt_ids(self, inputs: dict[str, torch.Tensor], answer_positions: torch.Tensor) -> list[int]:
        """The encoder's prompt ids (the answer lives in ``decoder_input_ids``)."""
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"][0]
        return (ids[mask[0].bool()] if mask is not None else ids).tolist()

    def refusal_message(self, name: str, reason: str, family: str | None = None) -> str:
        return super().refusal_message(name, reason, family or "Florence-2 (encoder-decoder, cross-attention)")

    def format_prompt(self, prompt: str) -> str:
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token in prompt:
            raise DexarInputError(f"the prompt must not contain {image_token!r}: the processor inserts the image")
        return super().format_prompt(prompt)

    @property
    def num_image_tokens(self) -> int:
        """Image features per image in the encoder (grid + pooled feature)."""
        return int(self.processor.num_image_tokens)

    def encode_prompts(
        self, images: list[Image.Image], prompts: list[str]
    ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        try:
            ids, enc = processor_encode(self, images, [self.format_prompt(p) for p in prompts])
        except ValueError as err:  # e.g. a task token with extra text
            raise DexarInputError(f"Florence-2 prompt rejected: {err}") from err
        h, w = self.image_grid({"pixel_values": enc["pixel_values"]})
        check_image_tokens(self, ids, [h * w + 1] * len(ids), "the model makes")
        return ids, {"pixel_values": enc["pixel_values"]}

    def tokenize_answer(self, answer: str) -> list[int]:
        """Answer ids as they follow ``<s>`` in the decoder: tokenized on their own, no special tokens."""
        return answer_alone(self, answer)

    def image_grid(self, image_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        """The DaViT feature grid: each stage's convolutional embedding applied to the pixel size."""
        vision = self.model.config.vision_config
        pixels = image_inputs.get("pixel_values")
        if pixels is None:
            raise DexarInputError("Florence-2 needs pixel_values to know its image grid")
        h, w = pixels.shape[-2:]
        for k, s, p in zip(vision.patch_size, vision.patch_stride, vision.patch_padding, strict=True):
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        return int(h), int(w)

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` True at the encoder positions of the grid features (the pooled feature excluded)."""
        mask = input_ids == self.image_token_id
        rank = mask.long().cumsum(1)
        return mask & (rank > 1)  # the projector puts the pooled (grid-mean) feature first

    def build_batch(
        self,
        prompt_ids: list[list[int]],
        answer_ids: list[list[int]],
        image_inputs: dict[str, torch.Tensor],
        device: torch.device | str | None = None,
    ) -> Seq2SeqBatch:
        """Right-pad encoder (prompt) and decoder (prefix + answer) sequences; right-align the answer slots."""
        if len(prompt_ids) != len(answer_ids):
            raise ValueError("prompt_ids and answer_ids must have one entry per sample")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        prefix = self.decoder_prefix
        n = max(len(p) for p in prompt_ids)
        m = len(prefix) + max(len(a) for a in answer_ids)
        count = len(prompt_ids)
        input_ids = torch.full((count, n), pad, dtype=torch.long)
        attention_mask = torch.zeros((count, n), dtype=torch.long)
        decoder_ids = torch.full((count, m), pad, dtype=torch.long)
        decoder_mask = torch.zeros((count, m), dtype=torch.long)
        for b, (p, a) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
            input_ids[b, : len(p)] = torch.tensor(p)
            attention_mask[b, : len(p)] = 1
            seq = prefix + list(a)
            decoder_ids[b, : len(seq)] = torch.tensor(seq)
            decoder_mask[b, : len(seq)] = 1
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": decoder_ids,
            "decoder_attention_mask": decoder_mask,
            **image_inputs,
        }
        answers, lengths = answer_slots(answer_ids)
        grid = self.image_grid(image_inputs)
        return Seq2SeqBatch(to_device(inputs, device), answers, lengths, grid, prefix_length=len(prefix))

    def backbone_forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        return self.model.model(**inputs, use_cache=False)
