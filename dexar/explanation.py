"""The :class:`Explanation` of one sample: per-token maps, token weights, sequence map, and their word view."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dexar.adapters.geometry import MapGeometry
from dexar.words import Word, piece_words, word_aggregate


@dataclass
class Explanation:
    """What a method says about one answer, per token (piece) and per word.

    The word view (:attr:`words`, :attr:`word_maps`, :attr:`word_weights`) is what a person reads: the
    tokenizer's words (:func:`dexar.words.segment_words`: ``▁`` word starts, byte-fallback pieces merged,
    punctuation kept with its whitespace word), each with one map and one weight aggregated from its
    pieces: word map = MinMax of the λ-weighted mean of its pieces' maps (the plain mean when a method
    has no λ: its weights are all 1), word weight = max λ of its pieces
    (:func:`dexar.words.word_aggregate` argues this reading against the paper). Piece-level data
    (``tokens``, ``token_maps``, ``token_weights``) stays as it was.

    Attributes:
        tokens: Answer tokens (pieces) as text, for display (no ``▁``; byte-fallback pieces as ``<0xE2>``).
        token_ids: Answer token ids.
        token_maps: ``(T, h, w)`` per-token maps in [0, 1].
        token_weights: ``(T,)`` weights of the tokens in the sequence map (λ_t for DEX-AR).
        sequence_map: ``(h, w)`` sequence map in [0, 1].
        inputs: The exact teacher-forced model inputs (unpadded, batch dim 1) that were traced.
        answer_positions: ``(T,)`` indices in ``inputs["input_ids"][0]`` of the answer tokens.
        method: Method name.
        options: Method options.
        token_empty: ``(T,)`` True where a token had no visual evidence (its map is zero).
        sequence_empty: True where the sequence map had no visual evidence (it is zero).
        answer: Answer text.
        image: The explained image (for overlays), if kept.
        sample_id: Id of the sample, if any.
        geometry: Where the maps' grid lies on the original image (the processor's view mapped back,
            :meth:`dexar.adapters.VLMAdapter.map_geometry`); ``None``: the grid spans the whole image.
        words: The answer's words with their piece spans (from the tokenizer); ``None``: one word per
            token (explanations built without a tokenizer).

    """

    tokens: list[str]
    token_ids: list[int]
    token_maps: torch.Tensor
    token_weights: torch.Tensor
    sequence_map: torch.Tensor
    inputs: dict[str, torch.Tensor]
    answer_positions: torch.Tensor
    method: str = "dexar"
    options: dict[str, Any] = field(default_factory=dict)
    token_empty: torch.Tensor | None = None
    sequence_empty: bool = False
    answer: str = ""
    image: Image.Image | None = None
    sample_id: str | None = None
    geometry: MapGeometry | None = None
    words: list[Word] | None = None

    @property
    def word_list(self) -> list[Word]:
        """:attr:`words`, or one word per token when no segmentation was given."""
        return self.words if self.words is not None else piece_words(len(self.tokens), self.tokens)

    @property
    def word_texts(self) -> list[str]:
        """The words' texts."""
        return [w.text for w in self.word_list]

    def word_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:attr:`word_maps` and :attr:`word_weights` from one aggregation (for callers that need both)."""
        return word_aggregate(self.token_maps, self.token_weights, self.word_list)

    @property
    def word_maps(self) -> torch.Tensor:
        """``(W, h, w)`` one map per word in [0, 1] (see the class docstring)."""
        return self.word_view()[0]

    @property
    def word_weights(self) -> torch.Tensor:
        """``(W,)`` one weight per word: the max λ of its pieces."""
        return self.word_view()[1]

    def placement(self, size: tuple[int, int]) -> MapGeometry:
        """The geometry that places the maps on the image drawn at ``size`` (the whole image when unknown)."""
        return self.geometry if self.geometry is not None else MapGeometry.whole(size)

    def upsample(self, size: tuple[int, int]) -> Explanation:
        """Place every map on the image drawn at ``size = (height, width)``; returns a new Explanation.

        Each map goes on the pixels the model saw (bilinear over its grid's box, see
        :mod:`dexar.adapters.geometry`) and is zero elsewhere; :attr:`seen` of the result is that
        ``(height, width)`` mask. Without a geometry the grid is stretched over the whole image.
        """
        size = (int(size[0]), int(size[1]))
        geometry = self.placement(size)
        maps = torch.cat([self.token_maps.double(), self.sequence_map[None].double()], dim=0)
        up = geometry.place(maps, size)
        return replace(
            self,
            token_maps=up[:-1].to(self.token_maps.dtype),
            sequence_map=up[-1].to(self.sequence_map.dtype),
            geometry=geometry.on_image(),
        )

    @property
    def seen(self) -> torch.Tensor:
        """``(H, W)`` bool: the pixels the model saw, at the maps' size once placed (:meth:`upsample`).

        Before placement, at the original image's size; without a geometry, all True at the maps' size.
        """
        if self.geometry is None:
            return torch.ones(tuple(self.sequence_map.shape), dtype=torch.bool)
        return self.geometry.seen(tuple(self.sequence_map.shape) if self.geometry.placed else None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary: tokens, weights, flags, method and options."""
        empty = self.token_empty.tolist() if self.token_empty is not None else [False] * len(self.tokens)
        return {
            "sample_id": self.sample_id,
            "method": self.method,
            "options": self.options,
            "answer": self.answer,
            "tokens": self.tokens,
            "words": [w.to_dict() for w in self.word_list],
            "word_weights": [float(w) for w in self.word_weights],
            "token_ids": self.token_ids,
            "token_weights": [float(w) for w in self.token_weights],
            "token_empty": [bool(e) for e in empty],
            "sequence_empty": bool(self.sequence_empty),
            "answer_positions": self.answer_positions.tolist(),
            "grid": list(self.sequence_map.shape),
            "geometry": self.geometry.to_dict() if self.geometry is not None else None,
        }

    def save(self, directory: str | Path, html: bool = False, prompt: str | None = None) -> Path:
        """Write ``sequence.png`` (overlay), ``words.png`` (one panel per word), ``tokens.png`` (per piece), JSON.

        With ``html``, also ``explanation.html``: the answer's words over the image, one map per word on
        hover, in one self-contained page (:mod:`dexar.explorer`; ``prompt`` is shown above the answer).
        """
        from dexar.plotting import overlay, token_strip

        directory = Path(directory)
        if html and self.image is None:
            raise ValueError(f"explanation of {self.sample_id!r}: html=True needs the image (explained without it)")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "explanation.json").write_text(json.dumps(self.to_dict(), indent=2))
        if self.image is not None:
            placed = self.upsample((self.image.height, self.image.width))  # maps on the pixels the model saw
            overlay(self.image, placed.sequence_map, caption=self.answer).save(directory / "sequence.png")
            word_maps, word_weights = placed.word_view()
            strip = token_strip(self.image, word_maps, placed.word_texts, word_weights, empty="(no answer words)")
            strip.save(directory / "words.png")
            token_strip(self.image, placed.token_maps, self.tokens, self.token_weights).save(directory / "tokens.png")
        if html:
            from dexar.explorer import payload_from_explanations, write_explanation_html

            write_explanation_html(payload_from_explanations([self], prompt=prompt), directory / "explanation.html")
        return directory
