"""Today's :class:`~dexar.explanation.Explanation` objects → an :class:`ExplanationPayload`.

An :class:`~dexar.explanation.Explanation` gives its own word view (``word_list``: the tokenizer's words,
issue 15, or one word per token when built without them; ``word_view()``: their maps and weights), so
the page shows the words the explanation saves; for explanation-like objects without one, this module
groups the answer's tokens into whitespace-separated words itself (:func:`group_pieces`) and aggregates
each word's pieces by the same rule:

* word weight = the max λ of its pieces (a word is as visual as its most visual piece);
* word map = MinMax(Σ_i λ_i E_i), the λ-weighted sum of its pieces' maps (the plain sum when every λ
  is 0), i.e. the sequence-map rule (eq. 6) restricted to the word; a one-piece word keeps its map;
* a word is empty (no visual evidence) when all its pieces are.

Explanations are read by attribute (``tokens``, ``token_maps``, ``token_weights``, ``token_empty``,
``sequence_map``, ``sequence_empty``, ``options``, ``answer``, ``image``, ``sample_id``, ``geometry``), so
this works on any object with those fields, wherever its class lives.

Where the maps lie (:func:`placement`): an explanation's ``geometry``
(:class:`~dexar.adapters.geometry.MapGeometry`, ``box = (y0, x0, y1, x1)`` in original pixels) becomes the
page's ``grid_box = (x0, y0, x1, y1)`` when the box lies inside the image and is all seen (a plain resize, a
center crop): the page stretches the small grid over it, nothing is lost. A box reaching past the image
(padding: ``LlavaImageProcessor(do_pad=True)``, LLaVA-NeXT's canvas) or with an unseen part cannot be drawn
as one rectangle on the image, so the maps are placed on the image first (``Explanation.upsample``:
bilinear over the box, zero where the model saw nothing) at the image's aspect, longer side
:data:`~dexar.explorer.encode.MAP_MAX_SIDE`, and cover the whole image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from dexar.explorer.encode import MAP_MAX_SIDE
from dexar.explorer.payload import (
    SPACE_MARKERS,
    ExplanationPayload,
    MethodView,
    PieceView,
    WordView,
    display_text,
    image_size,
)
from dexar.words import Word, word_aggregate

_SPECIAL = re.compile(r"<[^<>\s]+>|\[[A-Z_]+\]")  # </s>, <|im_end|>, [SEP] — but see _BYTE
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte-fallback pieces belong to their word


def group_pieces(tokens: Sequence[str], answer: str = "") -> list[list[int]]:
    """Token indices of each word of the answer.

    A token starts a new word when it is the first, when it carries a word-start marker (``▁``, ``Ġ``,
    a leading space), when the answer text has whitespace before it (tokens already stripped for
    display, e.g. ``decode_tokens``), or when it is a special token (``</s>``), which stands alone.
    Tokens are matched against ``answer`` left to right; tokens not found there (special tokens,
    byte pieces, ``�``) do not move the cursor.
    """
    groups: list[list[int]] = []
    cursor = 0
    for i, token in enumerate(tokens):
        marked = token[:1] in SPACE_MARKERS or token[:1].isspace()
        special = _is_special(token)
        core = display_text(token).strip()
        start = cursor
        while start < len(answer) and answer[start].isspace():
            start += 1
        found = bool(core) and not special and answer.startswith(core, start)
        spaced = found and start > cursor  # whitespace in the answer between the previous match and this token
        if found:
            cursor = start + len(core)
        if not groups or marked or special or spaced or _is_special(tokens[groups[-1][-1]]):
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def explanation_groups(explanation: Any) -> list[list[int]]:
    """Token indices of each word, as the explanation itself counts its words.

    An :class:`~dexar.explanation.Explanation` has its word view (``word_list``: the tokenizer's words, or
    one word per token when it was built without them), which its saved word maps and weights follow;
    any other explanation-like object is grouped by :func:`group_pieces`.
    """
    if hasattr(explanation, "word_list"):
        return [list(w.pieces) for w in explanation.word_list]
    return group_pieces(list(explanation.tokens), getattr(explanation, "answer", "") or "")


def filler_flags(
    tokens: Sequence[str],
    answer: str,
    labelled_answer: str | None,
    word_is_content: Sequence[bool] | None,
    groups: Sequence[Sequence[int]] | None = None,
) -> list[bool | None] | None:
    """Per word of :func:`group_pieces`: filler (True) / content (False), from a dataset's per-word labels.

    The labels (``Sample.word_is_content``, one per whitespace word of ``labelled_answer``) apply only when
    the explained ``answer`` is that answer word for word (a teacher-forced ground truth; a generated
    answer that happens to match); special tokens (``</s>``) are their own words and get None. Otherwise
    None: unknown. ``groups``: the words' token indices (:func:`explanation_groups`); default: :func:`group_pieces`.
    """
    if word_is_content is None or labelled_answer is None or answer.split() != labelled_answer.split():
        return None
    groups = [list(g) for g in groups] if groups is not None else group_pieces(tokens, answer)
    plain = [k for k, group in enumerate(groups) if not all(_is_special(tokens[t]) for t in group)]
    if len(plain) != len(word_is_content):
        return None
    flags: list[bool | None] = [None] * len(groups)
    for k, content in zip(plain, word_is_content, strict=True):
        flags[k] = not content
    return flags


def _is_special(token: str) -> bool:
    core = display_text(token).strip()
    return bool(_SPECIAL.fullmatch(core)) and not _BYTE.fullmatch(core)


def word_view(pieces: list[PieceView], maps: np.ndarray, weights: np.ndarray, filler: bool | None) -> WordView:
    """A word from its pieces: weight = max λ, map = MinMax(Σ λ_i E_i) (:func:`dexar.words.word_aggregate`)."""
    merged = maps[0]
    if len(pieces) > 1:
        whole = [Word("", 0, len(pieces))]
        merged = word_aggregate(torch.from_numpy(maps), torch.from_numpy(weights), whole)[0][0].numpy()
    return WordView(
        pieces=pieces,
        weight=float(weights.max()),
        map=merged,
        filler=filler,
        empty=all(p.empty for p in pieces),
    )


LABELS = {
    "dexar": "DEX-AR",
    "attention": "Attention",
    "rollout": "Rollout",
    "gradcam": "GradCAM",
    "chefercam": "CheferCAM",
    "attngrad": "AttnGrad",
    "integrated_gradients": "Integrated Gradients",
    "rise": "RISE",
    "iia": "IIA",
    "tam": "TAM",
}
"""Display names of the registered methods (other names are shown as they are)."""


def method_view(explanation: Any, name: str | None = None, filler: Sequence[bool | None] | None = None) -> MethodView:
    """One method's view from an explanation-like object (see the module docstring)."""
    tokens = list(explanation.tokens)
    maps = _numpy(explanation.token_maps)
    weights = _numpy(explanation.token_weights).astype(np.float64)
    empty = _numpy(explanation.token_empty).astype(bool) if explanation.token_empty is not None else None
    name = name or getattr(explanation, "method", None) or "method"
    if maps.shape[0] != len(tokens) or weights.shape != (len(tokens),):
        raise ValueError(
            f"explanation {name!r}: {len(tokens)} tokens but token_maps {tuple(maps.shape)} and "
            f"token_weights {tuple(weights.shape)}"
        )
    groups = explanation_groups(explanation)
    own_words = hasattr(explanation, "word_list")  # an Explanation: its word view's maps and weights
    if own_words:
        word_maps, word_weights = (_numpy(x) for x in explanation.word_view())
        segmented = explanation.words  # None: one word per piece, shown as its piece
    if filler is not None and len(filler) != len(groups):
        raise ValueError(f"explanation {name!r}: {len(filler)} filler flags for {len(groups)} words {tokens}")
    words = []
    for k, group in enumerate(groups):
        pieces = [
            PieceView(
                text=tokens[t],
                weight=float(weights[t]),
                map=maps[t],
                empty=bool(empty[t]) if empty is not None else False,
            )
            for t in group
        ]
        flag = None if filler is None else filler[k]
        if not own_words:
            words.append(word_view(pieces, maps[group], weights[group], flag))
            continue
        words.append(
            WordView(
                pieces=pieces,
                weight=float(word_weights[k]),
                map=word_maps[k],
                filler=flag,
                empty=all(p.empty for p in pieces),
                text=None if segmented is None else segmented[k].text,
            )
        )
    return MethodView(
        name=name,
        words=words,
        sequence_map=_numpy(explanation.sequence_map),
        options=dict(getattr(explanation, "options", {}) or {}),
        sequence_empty=bool(getattr(explanation, "sequence_empty", False)),
        label=LABELS.get(name, name),
    )


Box = tuple[float, float, float, float]
BOX_TOLERANCE = 1e-6
"""Pixels a grid box may reach past the image and still count as inside (float rounding of the geometry)."""


def placement(
    explanations: Sequence[Any], image_size: tuple[int, int], map_max_side: int = MAP_MAX_SIDE
) -> tuple[list[Any], Box | None]:
    """The explanations as the page should draw them and the ``grid_box`` they cover (module docstring).

    Args:
        explanations: One sample's explanations (they share the first one's ``geometry``).
        image_size: ``(width, height)`` of the shown image.
        map_max_side: Longer side of the maps when they must be placed on the image.

    Returns:
        ``(explanations, grid_box)``: unchanged with the box ``(left, top, right, bottom)`` (``None``: the
        whole image), or placed on the image (``Explanation.upsample``) with ``None``.
    """
    geometry = getattr(explanations[0], "geometry", None) if explanations else None
    if geometry is None or geometry.placed:
        return list(explanations), None
    width, height = image_size
    if tuple(geometry.image_size) != (height, width):
        raise ValueError(
            f"explanation of sample {getattr(explanations[0], 'sample_id', None)!r}: its geometry is for a "
            f"{geometry.image_size[1]}×{geometry.image_size[0]} image, the image given is {width}×{height}"
        )
    y0, x0, y1, x1 = (float(v) for v in geometry.box)
    inside = -BOX_TOLERANCE <= x0 < x1 <= width + BOX_TOLERANCE and -BOX_TOLERANCE <= y0 < y1 <= height + BOX_TOLERANCE
    if inside and np.allclose(geometry.seen_region, (y0, x0, y1, x1), atol=BOX_TOLERANCE):
        box = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
        return list(explanations), None if box == (0.0, 0.0, float(width), float(height)) else box
    scale = min(1.0, map_max_side / max(width, height))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return [e.upsample(size) for e in explanations], None


def payload_from_explanations(
    explanations: Mapping[str, Any] | Sequence[Any],
    image: Image.Image | np.ndarray | None = None,
    prompt: str | None = None,
    filler: Sequence[bool | None] | None = None,
    grid_box: Box | None = None,
    title: str | None = None,
) -> ExplanationPayload:
    """A payload from explanations of one sample: ``{label: explanation}`` or a list (named by ``.method``).

    Args:
        explanations: The sample's explanations, one per method, all of the same answer.
        image: The explained image; default: the first explanation's ``image``.
        prompt: The prompt shown above the answer.
        filler: Per word of the answer: filler (True), content (False) or unknown (None).
        grid_box: The region of ``image`` the maps cover (see :class:`ExplanationPayload`); default:
            read off the explanations' ``geometry`` (:func:`placement`, which may place the maps).
        title: Page title.
    """
    named = list(explanations.items()) if isinstance(explanations, Mapping) else [(None, e) for e in explanations]
    if not named:
        raise ValueError("payload_from_explanations: no explanations given")
    first = named[0][1]
    image = image if image is not None else getattr(first, "image", None)
    if image is None:
        raise ValueError(
            f"payload_from_explanations: sample {getattr(first, 'sample_id', None)!r} has no image: pass image="
        )
    if grid_box is None:
        exps, grid_box = placement([e for _, e in named], image_size(image))
        named = [(name, exp) for (name, _), exp in zip(named, exps, strict=True)]
    return ExplanationPayload(
        image=image,
        methods=[method_view(exp, name, filler) for name, exp in named],
        answer=getattr(first, "answer", "") or "",
        prompt=prompt,
        sample_id=getattr(first, "sample_id", None),
        grid_box=grid_box,
        title=title,
    )


def _numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        return values.detach().float().cpu().numpy()
    return np.asarray(values)
