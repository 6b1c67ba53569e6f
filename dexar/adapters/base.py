"""The adapter interface: everything the tracer and the methods need to know about one VLM family."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image
from torch import nn

if TYPE_CHECKING:
    from dexar.adapters.geometry import MapGeometry


class DexarInputError(ValueError):
    """Bad user input (image, prompt, model): the message says what is wrong, in one line."""


@dataclass
class TeacherForcedBatch:
    """A left-padded batch of prompt + answer sequences, ready for one forward.

    Attributes:
        inputs: Model keyword inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...).
        answer_ids: ``(B, T)`` answer token ids, right-aligned; padding is ``-1``.
        answer_lengths: ``(B,)`` number of answer tokens of each sample.
        image_grid: ``(h, w)`` of the image-token grid (same for every sample of the batch); with a
            ``cell_map``, the grid of the full-image map.
        cell_map: ``(h·w, V)`` linear map from the ``V`` image-token values (sequence order) to the
            full-image cells (row-major), for tiled images; ``None``: the tokens are the grid.

    """

    inputs: dict[str, torch.Tensor]
    answer_ids: torch.Tensor
    answer_lengths: torch.Tensor
    image_grid: tuple[int, int]
    cell_map: torch.Tensor | None = None

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

    def unpadded_answer_positions(self, index: int) -> torch.Tensor:
        """Indices of sample ``index``'s answer tokens in its unpadded ``input_ids`` (left padding removed)."""
        pad = int((self.inputs["attention_mask"][index] == 0).sum())
        return self.answer_positions(index) - pad

    def sample_inputs(self, index: int) -> dict[str, torch.Tensor]:
        """The exact, unpadded model inputs of one sample (batch dimension kept)."""
        mask = self.inputs["attention_mask"][index].bool()
        out: dict[str, torch.Tensor] = {}
        for key, value in self.inputs.items():
            row = value[index : index + 1]
            if key in ("input_ids", "attention_mask", "position_ids", "token_type_ids"):
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
    row_local_text_models: ClassVar[tuple[str, ...]] = ()
    """Language-model ``model_type`` values whose decoder layers are row-local outside attention."""

    @property
    def row_local_layers(self) -> bool:
        """Whether the decoder layers are row-local outside attention (pre-norm LLaMA-style blocks).

        If so, the tracer re-runs each layer on the answer rows only to build the gradient graph (see
        ``tracing._detach_layer_inputs``), holding ``T`` rows in memory instead of ``N``.
        """
        return getattr(self.text_config, "model_type", None) in self.row_local_text_models

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor

    # -- model internals (defaults: transformers' common VLM layout) -------------------------
    @property
    def _lm(self) -> nn.Module:
        """The language model (``model.model.language_model`` in transformers' VLM classes)."""
        return self.model.model.language_model

    @property
    def text_config(self) -> Any:
        """Config of the language model whose attention is traced."""
        return self._lm.config

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers, in order."""
        return self._lm.layers

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied to the last hidden state before the unembedding."""
        return self._lm.norm

    @property
    def unembedding(self) -> nn.Linear:
        """The LM head (hidden → vocabulary logits)."""
        return self.model.lm_head

    @property
    def image_token_id(self) -> int:
        """Id of the image placeholder token in ``input_ids``."""
        return int(self.model.config.image_token_id)

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

    # -- per-sample image geometry (dynamic resolution, tiles) ----------------------------------
    view_span: tuple[int, int] | None = None
    """Pixels of the view the image-token grid spans from its top-left corner (``None``: the whole view)."""

    @cached_property
    def view(self) -> Any:
        """The image processor's view geometry (:class:`~dexar.adapters.geometry.ProcessorView`).

        Single-view families read it at setup, so a processor of unknown geometry fails there; tiling
        and dynamic-resolution families declare their own :meth:`map_geometry`.
        """
        from dexar.adapters.geometry import ProcessorView  # it imports this module

        return ProcessorView.of(self.processor.image_processor)

    def map_geometry(self, image: Image.Image) -> MapGeometry:
        """Where the explanation maps of ``image`` lie on it: the grid mapped back through the processor's view.

        Each family declares it from its image processor's real steps (resize, center crop, pad, tiles);
        :meth:`dexar.explanation.Explanation.upsample` places the maps with it and ``seen`` comes from it.
        Default: a single-view processor (:attr:`view`), the grid over :attr:`view_span`.
        """
        return self.view.geometry((image.height, image.width), span=self.view_span)

    def grid_key(self, image: Image.Image) -> Any:
        """Samples whose images give equal keys share one batch (same image-token layout); ``None``: any."""
        return None

    def pixel_view(self, batch: TeacherForcedBatch, index: int) -> torch.Tensor:
        """Sample ``index``'s pixels as ``(..., C, H, W)`` images that :meth:`repeat_sample` takes back."""
        return batch.inputs["pixel_values"][index]

    def repeat_sample(self, batch: TeacherForcedBatch, index: int, views: torch.Tensor) -> TeacherForcedBatch:
        """Row ``index`` of ``batch`` repeated once per pixel view in ``views`` (``(K, *pixel_view.shape)``)."""
        k = views.shape[0]
        inputs = {}
        for name, value in batch.inputs.items():
            inputs[name] = views if name == "pixel_values" else value[index : index + 1].expand(k, *value.shape[1:])
        answer_ids = batch.answer_ids[index : index + 1].expand(k, -1)
        return dataclasses.replace(batch, inputs=inputs, answer_ids=answer_ids)

    def pool_view(self, batch: TeacherForcedBatch, values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Pool pixel-view maps ``(..., *pixel_view.shape[:-3], H, W)`` onto the image tokens: ``(..., V)``."""
        from dexar.methods.base import pool_to_grid  # the methods import this module

        return pool_to_grid(values, batch.image_grid, reduce)

    def check_method(self, name: str) -> None:
        """Raise :class:`DexarInputError` if method ``name`` is not defined for this architecture."""

    pixel_perturbation: ClassVar[bool] = True
    """True if ``pixel_values`` is one ``(C, H, W)`` image per sample, as the perturbation engine needs."""

    def check_pixel_perturbation(self) -> None:
        """Raise :class:`DexarInputError` if perturbation metrics cannot run on this architecture."""
        if not self.pixel_perturbation:
            raise DexarInputError(
                f"perturbation metrics are not supported for {type(self).__name__} (its pixel_values are "
                "patches or tiles, not one image per sample); use localization metrics"
            )

    def explained_prompt_ids(self, inputs: dict[str, torch.Tensor], answer_positions: torch.Tensor) -> list[int]:
        """Prompt ids (template and image placeholders) of one explained sample's unpadded ``inputs``.

        Decoder-only models: ``input_ids`` before the first answer position.
        """
        start = int(answer_positions[0]) if len(answer_positions) else inputs["input_ids"].shape[1]
        return inputs["input_ids"][0, :start].tolist()

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
