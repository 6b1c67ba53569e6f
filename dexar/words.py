"""The words of an answer, segmented by its tokenizer, and the word view of per-piece maps.

A person reads words; a model's tokenizer cuts them into pieces (LLaVA's SentencePiece:
``▁p`` ``otted`` ``▁plant``). :func:`segment_words` groups an answer's token ids into words with the
tokenizer's own word-start marks, never by splitting decoded text:

* a piece that starts with SentencePiece's metaspace ``▁`` or byte-level BPE's ``Ġ`` starts a word; in a
  word-level tokenizer (``tokenizers`` ``WordLevel`` model) every piece is a word;
* byte-fallback pieces (``<0xE2>`` ``<0x98>`` ``<0x95>``) join the word they are in, and the word's text is
  the UTF-8 decoding of all its bytes (``☕``, not three ``�``);
* a lone ``▁`` (the space before a digit or a byte-fallback character, which Llama/Mistral vocabularies
  split off) is not a word: it joins the word that follows it (or, at the very end, the one before);
* punctuation stays with the whitespace-delimited word it touches (``cat,``), as datasets label words
  (``Sample.word_is_content`` is per ``answer.split()`` word); a piece after a space (``▁.``) is a word;
* special tokens (``</s>``) are words of their own.

So the words are the answer's whitespace words exactly when the answer follows a space, as it does
after ``ASSISTANT:`` in every adapter. :func:`word_aggregate` turns per-piece maps and weights into one
map and one weight per word (the aggregation is argued in its docstring).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

METASPACE = "▁"
BYTE_LEVEL_SPACE = "Ġ"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class Word:
    """One word of an answer: its text and the half-open span ``[start, end)`` of its pieces.

    Not frozen: Lightning's ``apply_to_collection`` rebuilds every dataclass inside a step's output
    (an :class:`~dexar.explanation.Explanation` holds its words) and refuses frozen ones.
    """

    text: str
    start: int
    end: int

    @property
    def pieces(self) -> range:
        """Indices of the word's pieces (tokens) in the answer."""
        return range(self.start, self.end)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "start": self.start, "end": self.end}


def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _is_word_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"


def _piece(tokenizer: Any, token_id: int, special: set[int], byte_level: bool) -> tuple[bool, bytes, bool]:
    """``(starts_word, utf8_bytes, is_special)`` of one piece."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
        raise ValueError(f"token id {token_id} is not in the vocabulary of {type(tokenizer).__name__}")
    if int(token_id) in special:
        return True, piece.encode(), True
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte:
        return False, bytes([int(byte.group(1), 16)]), False
    if piece.startswith(METASPACE):
        return True, piece[1:].replace(METASPACE, " ").encode(), False
    if byte_level:
        decoder = _byte_decoder()
        if all(c in decoder for c in piece):
            raw = bytes(decoder[c] for c in piece)
            return raw[:1] == b" ", raw.lstrip(b" "), False
    return False, piece.replace(METASPACE, " ").encode(), False


def segment_words(tokenizer: Any, token_ids: Sequence[int]) -> list[Word]:
    """The words of an answer's ``token_ids`` (see the module docstring for the rules).

    Args:
        tokenizer: A Hugging Face tokenizer (the adapter's ``tokenizer``).
        token_ids: The answer's token ids as the model saw them (after the prompt's space).

    Returns:
        The words in order; their spans cover ``range(len(token_ids))`` without gaps or overlaps.

    """
    ids = [int(t) for t in token_ids]
    if not ids:
        return []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    word_level = _is_word_level(tokenizer)
    byte_level = not word_level and any(
        (p or "").startswith(BYTE_LEVEL_SPACE) for p in tokenizer.convert_ids_to_tokens(ids)
    )
    groups: list[tuple[list[int], bytearray, bool]] = []  # pieces, bytes, special
    for t, token_id in enumerate(ids):
        starts, raw, is_special = _piece(tokenizer, token_id, special, byte_level)
        prev = groups[-1] if groups else None
        joins = (
            prev is not None
            and not is_special
            and not prev[2]
            and (not (starts or word_level) or not prev[1])  # a lone ▁ before it: same word
        )
        if joins:
            prev[0].append(t)
            prev[1].extend(raw)
        else:
            groups.append(([t], bytearray(raw), is_special))
    k = 0
    while len(groups) > 1 and k < len(groups):  # a lone ▁ left alone (at the end, before </s>): not a word
        pieces, raw, is_special = groups[k]
        if raw or is_special:
            k += 1
            continue
        groups.pop(k)
        if k > 0 and not groups[k - 1][2]:
            groups[k - 1][0].extend(pieces)
        elif k < len(groups) and not groups[k][2]:
            groups[k][0][:0] = pieces
        else:
            groups.insert(k, (pieces, raw, is_special))
            k += 1
    return [Word(bytes(raw).decode("utf-8", errors="replace"), pieces[0], pieces[-1] + 1) for pieces, raw, _ in groups]


def display_pieces(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """Each piece as a person reads it: no ``▁``/``Ġ`` marker; a byte-fallback piece as ``<0xE2>``.

    A piece that is only the word-start space (a lone ``▁``) shows as ``␣``: visible, and not a word
    (the word view joins it to the next word).
    """
    out = []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id in token_ids:
        piece = tokenizer.convert_ids_to_tokens(int(token_id))
        if int(token_id) in special or _BYTE_PIECE.fullmatch(piece or ""):
            out.append(piece)
            continue
        text = tokenizer.decode([int(token_id)]).strip()
        out.append(text if text and "\ufffd" not in text else piece.lstrip(METASPACE + BYTE_LEVEL_SPACE) or "␣")
    return out


def word_aggregate(
    token_maps: torch.Tensor, token_weights: torch.Tensor, words: Sequence[Word]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, h, w)`` word maps in [0, 1] and ``(W,)`` word weights from per-piece maps and weights.

    Word map = MinMax(Σ_t λ_t⁺ E_t) over the word's pieces (the λ-weighted mean, min-max normalised like
    every token map; the plain mean when every λ_t ≤ 0, e.g. methods without λ, whose weights are 1);
    word weight = max_t λ_t. Reading of the paper: DEX-AR's sequence map weighs each token map by its
    visual necessity λ_t (sec. 3) and appendix's ``suit`` + ``case`` example shows the gate zeroing the
    linguistically completed piece while the first piece localizes the object: the λ-weighted mean keeps
    ``suit``'s map as the word's map where a plain mean would dilute it with ``case``'s noise, and the
    max says the word is visual because one of its pieces needed the image (a sum would grow with the
    number of pieces, a mean would halve ``suitcase``'s weight). A one-piece word is its piece.
    """
    maps, weights = [], []
    for word in words:
        m = token_maps[word.start : word.end].double()
        w = token_weights[word.start : word.end].double()
        if len(m) == 1:
            maps.append(m[0])
        else:
            positive = w.clamp(min=0)
            if not positive.sum() > 0:
                positive = torch.ones_like(positive)
            combined = torch.tensordot(positive, m, dims=1)
            low, high = combined.min(), combined.max()
            maps.append((combined - low) / (high - low) if high > low else torch.zeros_like(combined))
        weights.append(w.max())
    if not words:
        return token_maps.new_zeros((0, *token_maps.shape[1:])), token_weights.new_zeros(0)
    return torch.stack(maps).to(token_maps.dtype), torch.stack(weights).to(token_weights.dtype)


def piece_words(count: int, tokens: Sequence[str] | None = None) -> list[Word]:
    """One word per piece (explanations built without a tokenizer's segmentation)."""
    return [Word(tokens[t] if tokens is not None else str(t), t, t + 1) for t in range(count)]
