"""The one error of bad user input, shared by the adapters and their geometry (imports nothing of dexar)."""

from __future__ import annotations


class DexarInputError(ValueError):
    """Bad user input (image, prompt, model): the message says what is wrong, in one line."""
