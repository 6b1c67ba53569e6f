"""The explorer's input: a plain description of one explained image, independent of dexar's classes.

Everything here is built from plain values — strings, floats, and ``(h, w)`` maps given as NumPy
arrays, torch tensors or nested lists — so the explorer does not depend on where ``Explanation``,
the tracer or the adapters live. :func:`dexar.explorer.adapter.payload_from_explanations` builds a
payload from today's :class:`~dexar.explanation.Explanation` objects.

Maps are in [0, 1] (a small tolerance is clipped; anything else is an error naming the map). A map
is either a token grid (``h × w`` patches) or already placed on the image (the image's own size):
either way it is stretched over :attr:`ExplanationPayload.grid_box`, the rectangle of the image the
model saw (the whole image by default; a center crop's rectangle for processors that crop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from dexar.words import BYTE_LEVEL_SPACE, METASPACE

MapLike = Any
"""An ``(h, w)`` map: NumPy array, torch tensor (any device/dtype) or nested lists of floats."""

MAP_TOLERANCE = 1e-4
"""Map values within this distance outside [0, 1] are clipped; further out is an error."""

SPACE_MARKERS = METASPACE + BYTE_LEVEL_SPACE
"""Word-start markers of SentencePiece (``▁``) and byte-level BPE (``Ġ``), removed for display."""


def display_text(token: str) -> str:
    """A token string as a person reads it: without SentencePiece ``▁`` / byte-BPE ``Ġ`` markers (now spaces).

    For token strings of any origin (explanation-like objects may hold raw pieces); an Explanation's
    ``tokens`` are already readable (:func:`dexar.words.display_pieces` decodes them from the ids, with
    the tokenizer), so this leaves them as they are.
    """
    for marker in SPACE_MARKERS:
        token = token.replace(marker, " ")
    return token.strip() or token


@dataclass
class PieceView:
    """One token (sub-word piece) of a word.

    Attributes:
        text: The token string as the tokenizer gives it (``▁tri``); shown without ``▁``.
        weight: The token's weight in the sequence map (λ_t for DEX-AR).
        map: The token's ``(h, w)`` map in [0, 1].
        empty: True when the token had no visual evidence (its map is zero).
    """

    text: str
    weight: float
    map: MapLike
    empty: bool = False


@dataclass
class WordView:
    """One whitespace-separated word of the answer and the pieces it is made of.

    Attributes:
        pieces: The word's tokens, in order (at least one).
        weight: The word's weight (e.g. the max λ of its pieces); tints the word.
        map: The word's ``(h, w)`` map in [0, 1] (e.g. the λ-weighted mean of its pieces' maps).
        filler: True for a filler word, False for a content word, None when unknown.
        empty: True when the word had no visual evidence.
        text: Display text; default: the pieces joined, markers removed.
    """

    pieces: list[PieceView]
    weight: float
    map: MapLike
    filler: bool | None = None
    empty: bool = False
    text: str | None = None

    @property
    def display(self) -> str:
        """The word as shown."""
        if self.text is not None:
            return self.text
        return display_text("".join(p.text for p in self.pieces))


@dataclass
class MethodView:
    """What one method says about the answer.

    Attributes:
        name: Method name (``dexar``, ``attention``, ...), unique within a payload.
        words: The answer's words, identical in text across the methods of a payload.
        sequence_map: The sequence map ``(h, w)`` in [0, 1], shown by default.
        options: Method options, shown as ``key = value``.
        sequence_empty: True when the sequence map had no visual evidence.
        label: Display name; default: ``name``.
    """

    name: str
    words: list[WordView]
    sequence_map: MapLike
    options: dict[str, Any] = field(default_factory=dict)
    sequence_empty: bool = False
    label: str | None = None


@dataclass
class ExplanationPayload:
    """One image explained by one or more methods: everything ``explanation.html`` shows.

    Attributes:
        image: The explained image (PIL image of any mode, or an ``(H, W)`` / ``(H, W, 3)`` uint8 array).
        methods: One view per method (at least one), in display order.
        answer: The answer text.
        prompt: The prompt, if any.
        sample_id: The sample's id, if any.
        grid_box: ``(left, top, right, bottom)`` in pixels of ``image``: the region the maps cover
            (the model's view, e.g. its center crop); ``None`` = the whole image.
        title: Page title; default: the sample id or "dexar explanation".
    """

    image: Image.Image | np.ndarray
    methods: list[MethodView]
    answer: str = ""
    prompt: str | None = None
    sample_id: str | None = None
    grid_box: tuple[float, float, float, float] | None = None
    title: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the method/word/key at fault if the payload cannot be shown."""
        if not self.methods:
            raise ValueError("explorer payload: `methods` is empty (need at least one method)")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"explorer payload: method names repeat: {names}")
        width, height = image_size(self.image)
        if self.grid_box is not None:
            left, top, right, bottom = (float(v) for v in self.grid_box)
            if not (0 <= left < right <= width and 0 <= top < bottom <= height):
                raise ValueError(
                    f"explorer payload: grid_box {self.grid_box} is not a non-empty box inside the "
                    f"{width}×{height} image"
                )
        first = self.methods[0]
        for method in self.methods:
            where = f"method {method.name!r}"
            _check_map(method.sequence_map, f"{where}: sequence_map")
            texts = [w.display for w in method.words]
            if texts != [w.display for w in first.words]:
                raise ValueError(
                    f"explorer payload: {where} has words {texts}, method {first.name!r} has "
                    f"{[w.display for w in first.words]}: every method must explain the same answer"
                )
            for i, word in enumerate(method.words):
                at = f"{where}, word {i} ({word.display!r})"
                if not word.pieces:
                    raise ValueError(f"explorer payload: {at} has no pieces")
                _check_weight(word.weight, f"{at}: weight")
                _check_map(word.map, f"{at}: map")
                for j, piece in enumerate(word.pieces):
                    _check_weight(piece.weight, f"{at}, piece {j} ({piece.text!r}): weight")
                    _check_map(piece.map, f"{at}, piece {j} ({piece.text!r}): map")


def image_size(image: Image.Image | np.ndarray) -> tuple[int, int]:
    """``(width, height)`` of a PIL image or an ``(H, W[, C])`` array."""
    if isinstance(image, Image.Image):
        return image.size
    shape = np.shape(image)
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise ValueError(f"explorer payload: image must be a PIL image or an (H, W[, 1|3|4]) array, got {shape}")
    return int(shape[1]), int(shape[0])


def as_array(values: MapLike, where: str) -> np.ndarray:
    """A map as a float64 ``(h, w)`` array in [0, 1]; ``ValueError`` naming ``where`` otherwise."""
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"explorer payload: {where} must be a non-empty (h, w) map, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"explorer payload: {where} has non-finite values")
    low, high = float(array.min()), float(array.max())
    if low < -MAP_TOLERANCE or high > 1 + MAP_TOLERANCE:
        raise ValueError(f"explorer payload: {where} has values in [{low:.4g}, {high:.4g}], outside [0, 1]")
    return np.clip(array, 0.0, 1.0)


def _check_map(values: MapLike, where: str) -> None:
    as_array(values, where)


def _check_weight(weight: float, where: str) -> None:
    if not math.isfinite(float(weight)):
        raise ValueError(f"explorer payload: {where} is not finite ({weight})")
