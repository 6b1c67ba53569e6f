"""The Shapes language: colours, shapes, the view the model sees, prompts, caption grammar and words.

A leaf module (standard library only): the dataset (``datamodules/shapes.py``) draws and captions with
it without importing the model, and the model's tokenizers (:mod:`dexar.shapes.tokenizer`, the test
kit's word-level tokenizer) are built over it.
"""

from __future__ import annotations

from collections.abc import Sequence

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
IMAGE_SIZE = 64
"""Side in pixels of the square view the model sees (its processor's resize and center crop)."""

CAPTION_PROMPT = "describe the image."
COLOR_QUESTION = "what color is the {shape}?"
SHAPE_QUESTION = "what shape is the {color} object?"

WORDS = [
    "user",
    ":",
    "assistant",
    "describe",
    "the",
    "image",
    ".",
    "what",
    "color",
    "shape",
    "is",
    "object",
    "?",
    "i",
    "see",
    "a",
    "and",
    *COLORS,
    *SHAPES,
]
"""Every word of the Shapes conversations (LLaVA-1.5 template, prompts, answers), in the word tokenizer's id order."""


def caption(objects: Sequence[tuple[str, str]]) -> str:
    """The caption of ``(colour, shape)`` objects listed left to right: ``i see a red circle and a blue square``."""
    return " and ".join([f"i see a {c} {s}" if not k else f"a {c} {s}" for k, (c, s) in enumerate(objects)])
