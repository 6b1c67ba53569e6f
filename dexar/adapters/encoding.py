"""Encoding steps the families share: the multimodal processor call, the image-token count check, answer ids."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PIL import Image

from dexar.adapters.base import DexarInputError

if TYPE_CHECKING:
    from dexar.adapters.base import VLMAdapter


def processor_encode(adapter: VLMAdapter, images: list[Image.Image], texts: list[str]) -> tuple[list[list[int]], Any]:
    """The multimodal processor on ``texts`` (formatted prompts): unpadded ids per sample and its output."""
    enc = adapter.processor(images=adapter.prepare_images(images), text=texts, padding=True, return_tensors="pt")
    ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    return ids, enc


def check_image_tokens(
    adapter: VLMAdapter, ids: list[list[int]], expected: list[int], source: str = "the model expects"
) -> None:
    """Raise :class:`DexarInputError` if sample ``b``'s ids do not hold ``expected[b]`` image tokens."""
    for b, (row, count) in enumerate(zip(ids, expected, strict=True)):
        found = sum(1 for t in row if t == adapter.image_token_id)
        if found != count:
            raise DexarInputError(f"sample {b}: prompt holds {found} image tokens, {source} {count}")


def answer_after_prompt(adapter: VLMAdapter, answer: str, separator: str = " ") -> list[int]:
    """Answer ids as they follow the prompt: the suffix of tokenize(prompt + separator + answer).

    Tokenizing in context keeps SentencePiece word-boundary markers right; if the prompt's ids are
    not a prefix of the joint ids, the answer is tokenized on its own.
    """
    prompt = adapter.format_prompt("x")
    joint = adapter.tokenizer(prompt + separator + answer.strip(), add_special_tokens=False)["input_ids"]
    alone = adapter.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if joint[: len(alone)] == alone:
        return _tokenized(adapter, answer, list(joint[len(alone) :]))
    return answer_alone(adapter, answer)


def answer_alone(adapter: VLMAdapter, answer: str) -> list[int]:
    """Answer ids tokenized on their own, without special tokens."""
    return _tokenized(adapter, answer, list(adapter.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]))


def _tokenized(adapter: VLMAdapter, answer: str, ids: list[int]) -> list[int]:
    """``ids``, or :class:`DexarInputError` when a non-empty answer tokenized to nothing (a broken tokenizer)."""
    if answer.strip() and not ids:
        tokenizer = adapter.tokenizer
        name = getattr(tokenizer, "name_or_path", "") or "?"
        raise DexarInputError(
            f"answer {answer.strip()!r} tokenizes to no tokens with {type(tokenizer).__name__} ({name}): "
            "the tokenizer is broken or does not cover this text"
        )
    return ids
