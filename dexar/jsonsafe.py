"""Strict JSON for the files a run writes: non-finite floats become ``null`` (bare ``NaN`` is not JSON)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def strict(value: Any) -> Any:
    """``value`` with every NaN / ±inf float (at any depth of dicts, lists, tuples) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`strict` ``(value)``; raises if anything non-finite is left (never writes ``NaN``)."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)
