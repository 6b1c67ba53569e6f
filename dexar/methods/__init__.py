"""Explanation methods, registered by name (``dexar explain --method NAME``, configs)."""

from __future__ import annotations

from typing import Any

from dexar.methods.attention import RawAttention
from dexar.methods.base import Method, MethodOutput, finish, minmax
from dexar.methods.dexar import HEAD_FILTERS, DexAR

METHODS: dict[str, type] = {cls.name: cls for cls in (DexAR, RawAttention)}


def build_method(name: str, **options: Any) -> Method:
    """Instantiate a registered method with its options.

    Raises:
        ValueError: Unknown method name (the message lists the registered ones).

    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name](**options)


__all__ = [
    "HEAD_FILTERS",
    "METHODS",
    "DexAR",
    "Method",
    "MethodOutput",
    "RawAttention",
    "build_method",
    "finish",
    "minmax",
]
