"""Deprecated alias of :mod:`dexar.trace` (the tracer, planned per layer): re-exports its public names.

Kept so that code written against the old module (``tracing.run``, ``tracing.Trace``, …) keeps working;
import :mod:`dexar.trace` instead. The old private helpers are gone.
"""

from __future__ import annotations

import warnings

from dexar.adapters.base import TeacherForcedBatch
from dexar.trace import (
    DEFAULT_NEEDS,
    HIDDEN_GRADS,
    NEEDS,
    Trace,
    answer_log_probs,
    batched_grads,
    grad_weighted_attention,
    hidden_grads_need,
    run,
)

warnings.warn("dexar.tracing is deprecated: import dexar.trace", DeprecationWarning, stacklevel=2)

__all__ = [
    "DEFAULT_NEEDS",
    "HIDDEN_GRADS",
    "NEEDS",
    "TeacherForcedBatch",
    "Trace",
    "answer_log_probs",
    "batched_grads",
    "grad_weighted_attention",
    "hidden_grads_need",
    "run",
]
