"""Deprecated alias of :mod:`dexar.trace` (the tracer, planned per layer): hands out its public names.

Kept so that code written against the old module (``tracing.run``, ``from dexar.tracing import Trace``)
keeps working; import :mod:`dexar.trace` instead. The old private helpers are gone.
"""

from __future__ import annotations

import warnings
from typing import Any

from dexar import trace
from dexar.adapters.base import TeacherForcedBatch  # noqa: F401  (old annotations read tracing.TeacherForcedBatch)

warnings.warn("dexar.tracing is deprecated: import dexar.trace", DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    """The package's public object ``name``; any other name is an ``AttributeError`` naming the package."""
    if name in trace.__all__:
        return getattr(trace, name)
    raise AttributeError(f"module 'dexar.tracing' has no attribute {name!r}; the tracer is dexar.trace")
