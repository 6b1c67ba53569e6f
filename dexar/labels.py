"""Per-word labels (content/filler, mask index) → per-token labels for a model's own tokenizer.

Datamodules label the whitespace-separated words of an answer (``Sample.word_is_content``,
``Sample.word_mask_index``). A model sees tokens: :func:`token_labels` tokenizes the answer with any
Hugging Face *fast* tokenizer, reads each token's character span (``return_offsets_mapping``) and gives
it the labels of the words it overlaps, so every piece of a multi-token word (``pot`` ``ted`` →
``potted``) is content. Tokens covering only whitespace or nothing (special tokens) are filler.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dexar.schema import Sample


@dataclass
class TokenLabels:
    """Labels of an answer's tokens.

    Attributes:
        ids: Token ids of the answer, as they follow ``context``.
        tokens: The tokens' strings.
        offsets: Character span of each token in the answer text (may start before 0 when a token
            carries the separating space of the context).
        is_content: Per token: does it belong to a content word?
        mask_index: Per token: mask index of the content word it belongs to, or -1.

    """

    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    is_content: list[bool]
    mask_index: list[int]

    def token_masks(self, masks: np.ndarray | None) -> np.ndarray | None:
        """``(T, H, W)`` mask of the object each token names (all ``False`` for filler tokens)."""
        if masks is None:
            return None
        out = np.zeros((len(self.ids), *masks.shape[1:]), dtype=bool)
        for t, k in enumerate(self.mask_index):
            if k >= 0:
                out[t] = masks[k]
        return out


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the whitespace-separated words of ``text`` (the words of ``text.split()``)."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def token_labels(
    tokenizer: Any,
    answer: str,
    word_is_content: Sequence[bool],
    word_mask_index: Sequence[int] | None = None,
    context: str = "",
    separator: str = " ",
) -> TokenLabels:
    """Per-token content flags and mask indices of ``answer`` for ``tokenizer``.

    Args:
        tokenizer: A Hugging Face fast tokenizer (``PreTrainedTokenizerFast``), e.g. ``processor.tokenizer``.
        answer: The answer text whose words are labelled.
        word_is_content: One flag per ``answer.split()`` word.
        word_mask_index: One mask index per word (``-1``: none); default all ``-1``.
        context: Text the answer follows, as the model sees it, without the separator (e.g. the
            adapter's formatted prompt). The answer's tokens are then the suffix of
            ``tokenize(context + separator + answer)`` after ``tokenize(context)``, as the LLaVA adapter's
            ``tokenize_answer`` computes them, so SentencePiece word-boundary pieces match the model's. If
            the context's tokens are not a prefix of the joint tokens, or there is no context, the answer
            is tokenized on its own.
        separator: Text between context and answer.

    Returns:
        The answer's tokens and their labels.

    Raises:
        ValueError: The tokenizer is not fast, or the labels do not match the answer's words.

    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("token_labels needs a fast tokenizer (return_offsets_mapping)")
    spans = word_spans(answer)
    mask_index = list(word_mask_index) if word_mask_index is not None else [-1] * len(spans)
    if not len(spans) == len(word_is_content) == len(mask_index):
        raise ValueError(
            f"{len(spans)} words in {answer!r} but {len(word_is_content)} content flags "
            f"and {len(mask_index)} mask indices"
        )
    ids: list[int] = []
    if context:
        enc = tokenizer(context + separator + answer, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets, shift = list(enc["input_ids"]), list(enc["offset_mapping"]), len(context + separator)
        prefix = list(tokenizer(context, add_special_tokens=False)["input_ids"])
        start = len(prefix)
        if ids[:start] != prefix:
            ids = []
    if not ids:
        enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets, shift, start = list(enc["input_ids"]), list(enc["offset_mapping"]), 0, 0
    out = TokenLabels([], [], [], [], [])
    for token_id, (a, b) in zip(ids[start:], offsets[start:], strict=True):
        a, b = a - shift, b - shift
        words = [w for w, (ws, we) in enumerate(spans) if a < we and b > ws]
        content = [w for w in words if word_is_content[w]]
        out.ids.append(int(token_id))
        out.tokens.append(tokenizer.convert_ids_to_tokens(int(token_id)))
        out.offsets.append((a, b))
        out.is_content.append(bool(content))
        out.mask_index.append(next((mask_index[w] for w in content if mask_index[w] >= 0), -1))
    return out


def sample_token_labels(sample: Sample, tokenizer: Any, context: str = "", separator: str = " ") -> TokenLabels:
    """:func:`token_labels` of a sample's ground-truth answer and word labels.

    Raises:
        ValueError: The sample has no answer or no word labels.

    """
    if sample.answer is None or sample.word_is_content is None:
        raise ValueError(f"sample {sample.id} has no labelled answer")
    return token_labels(tokenizer, sample.answer, sample.word_is_content, sample.word_mask_index, context, separator)
