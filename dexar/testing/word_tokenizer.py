"""The word-level tokenizers of the tiny test models: one builder, one token per word, nothing downloaded.

:func:`word_tokenizer` builds every family's (a ``tokenizers`` ``WordLevel`` model wrapped in
``PreTrainedTokenizerFast``); :func:`shapes_word_tokenizer` is the Shapes one the random LLaVA models use
by default, :func:`prompt_word_tokenizer` PaliGemma's and Florence-2's (:data:`PROMPT_WORDS`). Each
family's vocabulary is given whole, in id order: the tests' random weights are drawn against those ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from dexar.shapes.model import tokenizer_specials
from dexar.shapes.vocabulary import COLORS, SHAPES, WORDS

NEWLINE_AND_PUNCTUATION = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="removed", invert=True)
"""A pre-tokenizer keeping ``\\n`` and each punctuation mark as tokens (PaliGemma's and Florence-2's prompts).

The default, ``Whitespace``, splits ``\\w+|[^\\w\\s]+``: newlines dropped, a run of punctuation one token.
"""

SHAPES_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
"""The Shapes word tokenizer's special tokens, ids 0–4 (the Shapes :data:`~dexar.shapes.vocabulary.WORDS` follow)."""


def word_tokenizer(
    vocabulary: Sequence[str],
    *,
    specials: Sequence[str] = (),
    pre_tokenizer: Any = None,
    prepend_bos: bool = False,
    **tokens: Any,
) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over ``vocabulary`` (id = position), left padding.

    Args:
        vocabulary: Every token, special ones included, in id order.
        specials: Tokens registered as additional special tokens (never split, never lower-cased).
        pre_tokenizer: How text splits into words; default ``Whitespace`` (:data:`NEWLINE_AND_PUNCTUATION`
            keeps newlines and single punctuation marks).
        prepend_bos: Add ``bos_token`` in front of every text (a template post-processor).
        **tokens: Passed to ``PreTrainedTokenizerFast``: ``bos_token``, ``eos_token``,
            ``extra_special_tokens={"image_token": ...}``, ...; ``unk_token="<unk>"``, ``pad_token="<pad>"``
            and ``padding_side="left"`` unless given.

    """
    settings = {"unk_token": "<unk>", "pad_token": "<pad>", "padding_side": "left", **tokens}
    vocab = {tok: i for i, tok in enumerate(vocabulary)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=settings["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizer if pre_tokenizer is not None else pre_tokenizers.Whitespace()
    if prepend_bos:
        bos = settings["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **settings)
    if specials:
        fast.add_special_tokens({"additional_special_tokens": list(specials)})
    return fast


def shapes_word_tokenizer() -> PreTrainedTokenizerFast:
    """The Shapes words (:data:`~dexar.shapes.vocabulary.WORDS`) one token each, ``<s>`` added in front.

    Special tokens and padding as every Shapes tokenizer (:func:`dexar.shapes.model.tokenizer_specials`);
    the bundled model has the sub-word tokenizer of :mod:`dexar.shapes.tokenizer`.
    """
    return word_tokenizer([*SHAPES_SPECIALS, *WORDS], prepend_bos=True, **tokenizer_specials())


PROMPT_WORDS = (
    "cap",
    "describe",
    "in",
    "detail",
    "what",
    "is",
    "shown",
    "the",
    "image",
    "a",
    "an",
    "and",
    *COLORS,
    *SHAPES,
    "left",
    "right",
    "top",
    "bottom",
    "of",
    "on",
    ".",
    ",",
    "?",
    "\n",
)
"""The PaliGemma and Florence-2 test vocabulary after the special tokens: their task prompts' words, the
Shapes colours and shapes (:mod:`dexar.shapes.vocabulary`), positions, punctuation and the newline."""


def prompt_word_tokenizer(specials: list[str], bos_token: str, eos_token: str) -> PreTrainedTokenizerFast:
    """PaliGemma's / Florence-2's test tokenizer: ``specials``, ``<image>``, then :data:`PROMPT_WORDS`.

    Newlines and single punctuation marks are tokens (:data:`NEWLINE_AND_PUNCTUATION`).
    """
    return word_tokenizer(
        [*specials, "<image>", *PROMPT_WORDS],
        pre_tokenizer=NEWLINE_AND_PUNCTUATION,
        bos_token=bos_token,
        eos_token=eos_token,
        extra_special_tokens={"image_token": "<image>"},
    )
