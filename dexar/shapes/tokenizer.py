r"""The Shapes model's tokenizer: a LLaVA-1.5-style SentencePiece BPE trained on the Shapes conversations.

Same design as LLaVA-1.5's Llama tokenizer, at a vocabulary small enough that most content words split:
a ``tokenizers`` BPE with ``▁`` (metaspace) word-boundary markers, byte fallback (256 ``<0x..>`` pieces
for any character outside the learned alphabet, e.g. the template's ``\n``), ``<unk>`` = 0, ``<s>`` = 1,
``</s>`` = 2, and ``<pad>`` and ``<image>`` added after the vocabulary (``llava-hf`` adds them too,
``<image>`` first). It is wrapped as a ``transformers`` :class:`~transformers.LlamaTokenizerFast`, so a
saved directory (``tokenizer.json`` + ``tokenizer_config.json``) loads with ``AutoTokenizer`` like
LLaVA-1.5's (transformers 5 loads any ``llava`` model's tokenizer as the generic fast class).

The BPE is trained on every Shapes conversation (prompt in the LLaVA-1.5 template, answer after
``ASSISTANT:``) with pieces of at most :data:`MAX_PIECE_LENGTH` characters (the ``▁`` counts), so a
content word is 1–3 pieces (``▁tri`` ``an`` ``gle``, ``▁yel`` ``low``, ``▁red``). Training is
deterministic: the same corpus and settings give the same tokenizer.

    python -m dexar.shapes.tokenizer [--out DIR]      # train, print the word → piece table, save to DIR
"""

from __future__ import annotations

import argparse
import itertools
import json

from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import CLIPImageProcessorPil, LlamaTokenizerFast, LlavaProcessor

from dexar.adapters.llava import LlavaAdapter
from dexar.shapes.model import CLIP_MEAN, CLIP_STD, PATCH_SIZE, tokenizer_specials
from dexar.shapes.vocabulary import (
    CAPTION_PROMPT,
    COLOR_QUESTION,
    COLORS,
    IMAGE_SIZE,
    SHAPE_QUESTION,
    SHAPES,
    caption,
)

BPE_VOCAB_SIZE = 100
"""Learned vocabulary of the BPE trainer (``<unk>``, ``<s>``, ``</s>``, the alphabet and the merges)."""
MAX_PIECE_LENGTH = 5
"""Longest learned piece in characters, ``▁`` included: bounds how much of a word one piece holds."""
CORE_SPECIALS = ("<unk>", "<s>", "</s>")
BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))
QUESTION_WEIGHT = 8
"""Copies of each question in the corpus (about 10% of the training conversations are questions)."""


def conversation(prompt: str, answer: str) -> str:
    r"""One training text: the LLaVA template around ``prompt`` (without ``<image>\n``), then `` answer``.

    The image placeholder is a special token and the newline is left to byte fallback, as in LLaVA-1.5
    (its tokenizer has no newline piece), so neither is in the corpus.
    """
    template = LlavaAdapter.prompt_template.replace("<image>\n", "")
    return f"{template.format(prompt=prompt)} {answer}"


def shapes_corpus() -> list[str]:
    """Every Shapes conversation: all captions of 1–3 objects, each colour and shape question (weighted)."""
    objects = list(itertools.product(COLORS, SHAPES))
    texts = [
        conversation(CAPTION_PROMPT, caption(combo))
        for count in (1, 2, 3)
        for combo in itertools.product(objects, repeat=count)
    ]
    questions = [conversation(COLOR_QUESTION.format(shape=s), c) for c, s in objects]
    questions += [conversation(SHAPE_QUESTION.format(color=c), s) for c, s in objects]
    return texts + questions * QUESTION_WEIGHT


def train_shapes_tokenizer(
    vocab_size: int = BPE_VOCAB_SIZE, max_piece_length: int = MAX_PIECE_LENGTH
) -> LlamaTokenizerFast:
    """Train the BPE on :func:`shapes_corpus` and wrap it as LLaVA-1.5's tokenizer class.

    Training splits words at ``▁`` and isolates punctuation, so no piece spans a word boundary or joins
    a letter to punctuation; the ``LlamaTokenizerFast`` then applies the merges to whole text segments
    (metaspace without splitting, ``▁`` prepended to the first segment only), exactly as Llama's does.

    Args:
        vocab_size: Size of the learned vocabulary (:data:`BPE_VOCAB_SIZE`).
        max_piece_length: Longest piece in characters (:data:`MAX_PIECE_LENGTH`).

    Returns:
        The tokenizer: ``<unk>``, ``<s>``, ``</s>``, the 256 byte pieces, the learned pieces, then the
        special tokens ``<pad>`` and ``<image>``; left padding, ``<s>`` added in front.

    """
    bpe = Tokenizer(BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            pre_tokenizers.Punctuation("isolated"),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CORE_SPECIALS),
        max_token_length=max_piece_length,
        show_progress=False,
    )
    bpe.train_from_iterator(shapes_corpus(), trainer)
    learned_merges = json.loads(bpe.to_str())["model"]["merges"]
    learned = sorted(bpe.get_vocab().items(), key=lambda item: item[1])
    pieces = list(CORE_SPECIALS) + list(BYTE_PIECES) + [p for p, _ in learned if p not in CORE_SPECIALS]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned_merges]
    return LlamaTokenizerFast(
        vocab={p: i for i, p in enumerate(pieces)},
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        **tokenizer_specials(),
    )


def word_pieces(tokenizer: LlamaTokenizerFast, word: str) -> list[str]:
    """The pieces of ``word`` as it appears inside a sentence (after a space).

    The tokenizer prepends ``▁`` to a text's first segment, so ``word`` alone tokenizes as it does after
    a space (a prefix such as ``x`` would not do: a character outside the learned alphabet falls back
    to bytes and adds a lone ``▁``).
    """
    return tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False)["input_ids"])


def build_shapes_processor() -> LlavaProcessor:
    """The LLaVA processor of the Shapes model: sub-word BPE + ``llava-hf``'s CLIP preprocessing at 64 pixels.

    The image processor is configured as ``llava-hf/llava-1.5-7b-hf``'s (bicubic resize of the shortest
    edge, center crop, rescale, CLIP mean/std) with 64 in place of 336.
    """
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=train_shapes_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="directory to save tokenizer.json + tokenizer_config.json into")
    parser.add_argument("--vocab-size", type=int, default=BPE_VOCAB_SIZE)
    parser.add_argument("--max-piece-length", type=int, default=MAX_PIECE_LENGTH)
    args = parser.parse_args(argv)
    tokenizer = train_shapes_tokenizer(args.vocab_size, args.max_piece_length)
    print(f"{len(tokenizer)} tokens (256 byte pieces, {len(tokenizer) - 256 - 5} learned, 5 special)")
    for word in (*COLORS, *SHAPES):
        print(f"{word:>10}: {' + '.join(word_pieces(tokenizer, word))}")
    if args.out:
        tokenizer.save_pretrained(args.out)
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
