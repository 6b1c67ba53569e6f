"""The adapter interface: everything the tracer and the methods need to know about one VLM family."""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from dexar.adapters.errors import DexarInputError
from dexar.adapters.geometry import MapGeometry, ProcessorView


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


ARCHITECTURES = ("decoder", "cross")
"""Values of :attr:`VLMAdapter.architecture` (what the tracer instruments)."""


def need_key(need: str) -> str:
    """The key of a trace need in :attr:`VLMAdapter.refused_needs`: its name without a parameter.

    ``hidden_grads:<layer>`` → ``hidden_grads``; plain needs are their own key.
    """
    return need.partition(":")[0]


def method_requirements(method: Any) -> frozenset[str]:
    """What a method asks of the architecture: its trace needs and the probes its extra forwards run.

    ``probe_needs`` (optional on a method) names what its own forwards instrument beyond a plain
    forward of the model (IIA: ``attention_probes``, injected decoder self-attention); the tracer
    never sees them, only :meth:`VLMAdapter.check_method` does.
    """
    return frozenset(method.needs) | frozenset(getattr(method, "probe_needs", ()))


class _RefusedMethodsView:
    """``cls.refused_methods``: method name → reason, derived from ``refused_needs`` (class or instance)."""

    def __get__(self, instance: Any, owner: type[VLMAdapter]) -> dict[str, str]:
        from dexar.methods import METHODS, build_method  # the methods import the adapters

        refused = {}
        for name in METHODS:
            reason = owner.refusal(method_requirements(build_method(name)))
            if reason is not None:
                refused[name] = reason
        return refused


class VLMAdapter(abc.ABC):
    """Knows one VLM family: prompt template, image tokens and their grid, decoder internals.

    The contract has three parts.

    **Declared capabilities** (class attributes, read without a model; checked when the subclass is
    defined): :attr:`model_types`, :attr:`architecture`, :attr:`row_local_text_models` (row-locality),
    :attr:`pixel_perturbation`, :attr:`refused_needs` (the trace needs, by key, the architecture
    cannot serve; every other need is supported), :attr:`prompt_template`, :attr:`paper_prompt`.
    :attr:`row_local_layers`, :attr:`cross_attention` and :attr:`refused_methods` are derived from them.

    **Abstract core** (every family implements it): :meth:`encode_prompts`, :meth:`tokenize_answer`,
    :meth:`image_grid`.

    **Defaults a family overrides when its model or processor differs**: the model internals
    (transformers' common VLM layout: :attr:`decoder_layers`, :attr:`final_norm`, :attr:`unembedding`,
    :meth:`backbone_forward`, ...), the batch hooks (:meth:`batch_inputs`, :meth:`batch_cell_map`,
    :attr:`batch_class`), the image geometry (:meth:`map_geometry`, :meth:`grid_key`) and the pixel
    views of the perturbation baselines (:meth:`pixel_view`, :meth:`repeat_sample`, :meth:`pool_view`).

    Every family runs the conformance suite ``dexar/testing/adapter_checks.py::AdapterConformance`` by
    subclassing it. Instances wrap a loaded model and its processor.
    """

    # -- declared capabilities ------------------------------------------------------------------
    model_types: ClassVar[tuple[str, ...]] = ()
    """``config.model_type`` values this family handles (:func:`dexar.adapters.get_adapter`)."""
    architecture: ClassVar[str] = "decoder"
    """What the tracer instruments: ``"decoder"``, a decoder's self-attention over image and text tokens;
    ``"cross"``, an encoder-decoder's cross-attention over the encoder (``cross_attention_modules``)."""
    prompt_template: ClassVar[str] = "{prompt}"
    """The model's prompt template (paper appendix B); ``{prompt}`` is the user prompt."""
    paper_prompt: ClassVar[str | None] = None
    """The captioning prompt the paper uses with this family, where it names one (``None``: the dataset's)."""
    row_local_text_models: ClassVar[tuple[str, ...]] = ()
    """Language-model ``model_type`` values whose decoder layers are row-local outside attention."""
    pixel_perturbation: ClassVar[bool] = True
    """True if ``pixel_values`` is one ``(C, H, W)`` image per sample, as the perturbation engine needs."""
    refused_needs: ClassVar[dict[str, str]] = {}
    """Trace need key (:func:`need_key`, or a method's ``probe_needs``) → why this architecture cannot serve
    it, in one line. A method is refused when it requires one of them (:meth:`check_method`)."""
    refused_methods = _RefusedMethodsView()
    """Method name → reason, for the registered methods this family refuses (derived from :attr:`refused_needs`;
    ``predict`` reports the reason as the method's ``n/a``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.architecture not in ARCHITECTURES:
            raise TypeError(f"{cls.__name__}.architecture = {cls.architecture!r}; known: {list(ARCHITECTURES)}")
        if not isinstance(cls.pixel_perturbation, bool):
            raise TypeError(f"{cls.__name__}.pixel_perturbation must be a bool")
        if "model_types" in vars(cls) and not (cls.model_types and all(isinstance(t, str) for t in cls.model_types)):
            raise TypeError(f"{cls.__name__}.model_types must name at least one config.model_type")
        multiline = [key for key, why in cls.refused_needs.items() if not why or "\n" in why]
        if multiline:
            raise TypeError(f"{cls.__name__}.refused_needs: give each of {multiline} a one-line reason")

    @property
    def row_local_layers(self) -> bool:
        """Whether the decoder layers are row-local outside attention (pre-norm LLaMA-style blocks).

        If so, the tracer re-runs each layer on the answer rows only to build the gradient graph (see
        ``dexar.trace.instrument.rerun_answer_rows``), holding ``T`` rows in memory instead of ``N``. Declared by
        :attr:`row_local_text_models`.
        """
        return getattr(self.text_config, "model_type", None) in self.row_local_text_models

    @property
    def cross_attention(self) -> bool:
        """``architecture == "cross"`` (kept for readers of the former flag)."""
        return self.architecture == "cross"

    @classmethod
    def refusal(cls, requirements: frozenset[str] | set[str]) -> str | None:
        """Why this family cannot serve ``requirements`` (trace needs, probe needs), or ``None`` if it can."""
        for key in sorted({need_key(need) for need in requirements}):
            if key in cls.refused_needs:
                return cls.refused_needs[key]
        return None

    def check_method(self, method: Any) -> None:
        """Raise a one-line :class:`DexarInputError` if ``method`` requires a need this family refuses.

        Args:
            method: A method, or a registered method's name (built with its default options).

        """
        if isinstance(method, str):
            from dexar.methods import build_method  # the methods import the adapters

            method = build_method(method)
        reason = self.refusal(method_requirements(method))
        if reason is not None:
            raise DexarInputError(self.refusal_message(method.name, reason))

    def refusal_message(self, name: str, reason: str, family: str | None = None) -> str:
        """The one-line error for method ``name`` refused for ``reason``, naming the registered methods that run."""
        from dexar.methods import METHODS  # the methods import the adapters

        usable = [m for m in METHODS if m not in self.refused_methods]
        alternatives = f"{', '.join(usable[:-1])} or {usable[-1]}" if len(usable) > 1 else "".join(usable)
        return f"{name} is not supported for {family or type(self).__name__}: {reason}; use {alternatives}"

    def check_pixel_perturbation(self) -> None:
        """Raise :class:`DexarInputError` if perturbation metrics cannot run on this architecture."""
        if not self.pixel_perturbation:
            raise DexarInputError(
                f"perturbation metrics are not supported for {type(self).__name__} (its pixel_values are "
                "patches or tiles, not one image per sample); use localization metrics"
            )

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor

    # -- abstract core ----------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_prompts(
        self, images: list[Image.Image], prompts: list[str]
    ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        """Encode images and prompts: unpadded prompt ids per sample and the batched image inputs.

        Each sample's ids hold exactly the image tokens its image gives
        (:func:`~dexar.adapters.encoding.check_image_tokens`).
        """

    @abc.abstractmethod
    def tokenize_answer(self, answer: str) -> list[int]:
        """Token ids of an answer text as the model would generate it after the prompt."""

    @abc.abstractmethod
    def image_grid(self, image_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        """``(h, w)`` of the image-token grid (the full-image map, with a cell map) for these image inputs."""

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

    @property
    def num_image_tokens(self) -> int | None:
        """Image tokens per image when every image gives the same number; ``None``: it varies per image."""
        return None

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

    # -- the teacher-forced batch -------------------------------------------------------------
    batch_class: ClassVar[type[TeacherForcedBatch]] = TeacherForcedBatch
    """The batch type :meth:`build_batch` returns (a family whose inputs need their own unpadding)."""

    def build_batch(
        self,
        prompt_ids: list[list[int]],
        answer_ids: list[list[int]],
        image_inputs: dict[str, torch.Tensor],
        device: torch.device | str | None = None,
    ) -> TeacherForcedBatch:
        """Concatenate prompt and answer ids, left-pad, and attach the image inputs.

        The family's hooks then finish it: :meth:`batch_inputs` edits the model inputs (on CPU, before
        they move to ``device``), :meth:`batch_cell_map` gives the tiles' cell map (on CPU).
        """
        if len(prompt_ids) != len(answer_ids):
            raise ValueError("prompt_ids and answer_ids must have one entry per sample")
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        seqs = [list(p) + list(a) for p, a in zip(prompt_ids, answer_ids, strict=True)]
        n = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for b, seq in enumerate(seqs):
            input_ids[b, n - len(seq) :] = torch.tensor(seq)
            attention_mask[b, n - len(seq) :] = 1
        # Positions count real tokens only, so a left-padded sample is computed as if it were alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            **image_inputs,
        }
        inputs = self.batch_inputs(inputs, answer_ids)
        answers, lengths = answer_slots(answer_ids)
        return self.batch_class(
            to_device(inputs, device),
            answers,
            lengths,
            self.image_grid(image_inputs),
            cell_map=self.batch_cell_map(image_inputs),
        )

    def batch_inputs(self, inputs: dict[str, torch.Tensor], answer_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """The model inputs of a left-padded batch (default: as built); a family adds, drops or shifts keys."""
        return inputs

    def batch_cell_map(self, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``(h·w, V)`` merge of the batch's image tokens into the full-image map (tiles); ``None``: they are it."""
        return None

    def explained_prompt_ids(self, inputs: dict[str, torch.Tensor], answer_positions: torch.Tensor) -> list[int]:
        """Prompt ids (template and image placeholders) of one explained sample's unpadded ``inputs``.

        Decoder-only models: ``input_ids`` before the first answer position.
        """
        start = int(answer_positions[0]) if len(answer_positions) else inputs["input_ids"].shape[1]
        return inputs["input_ids"][0, :start].tolist()

    # -- per-sample image geometry (dynamic resolution, tiles) ----------------------------------
    view_span: tuple[int, int] | None = None
    """Pixels of the view the image-token grid spans from its top-left corner (``None``: the whole view)."""

    @cached_property
    def view(self) -> Any:
        """The image processor's view geometry (:class:`~dexar.adapters.geometry.ProcessorView`).

        Single-view families read it at setup, so a processor of unknown geometry fails there; tiling
        and dynamic-resolution families declare their own :meth:`map_geometry`.
        """
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

    # -- pixel views (perturbation baselines: RISE, Integrated Gradients, IIA) -------------------------
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

    # -- images and tokens -----------------------------------------------------------------------
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
        """Readable text of each token on its own (for labels and plots; :func:`dexar.words.display_pieces`)."""
        from dexar.words import display_pieces

        return display_pieces(self.tokenizer, token_ids)


def answer_slots(answer_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` answer ids right-aligned in their slots (padding ``-1``) and the ``(B,)`` answer lengths."""
    t_max = max(1, max(len(a) for a in answer_ids))
    answers = torch.full((len(answer_ids), t_max), -1, dtype=torch.long)
    for b, ans in enumerate(answer_ids):
        if ans:
            answers[b, t_max - len(ans) :] = torch.tensor(ans)
    return answers, torch.tensor([len(a) for a in answer_ids], dtype=torch.long)


def to_device(inputs: dict[str, torch.Tensor], device: torch.device | str | None) -> dict[str, torch.Tensor]:
    """``inputs`` moved to ``device`` (``None``: as they are)."""
    return inputs if device is None else {k: v.to(device) for k, v in inputs.items()}
