"""Attention Rollout baseline (Abnar & Zuidema 2020; paper appendix C.4, eq. 13–16)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dexar.methods.base import MethodOutput, finish, rollout_rows
from dexar.trace import Trace


@dataclass
class Rollout:
    """Attention flow through the residual stream, read at each predicting row.

    ``Â^l = rownorm(mean_h A^l + I)`` (eq. 13–14), ``R = Â^L ⋯ Â^1`` (eq. 15: Abnar & Zuidema's
    recursion ``Ã^l = Â^l Ã^{l−1}``, input layer applied first; ARCHITECTURE.md writes the product as
    ``Â^1 ⋯ Â^L``, read here as that composition over layers 1 → L), token map ``R[p_t, V]`` (eq. 16).
    Only row ``p_t`` is needed, so it is propagated as a row vector, ``e_{p_t}ᵀ Â^L ⋯ Â^1``: exactly the
    matrix product's row at ``O(L·N²)`` instead of ``O(L·N³)``. Every head is averaged (no discard
    ratio, as in the paper). No gradients.
    """

    name: ClassVar[str] = "rollout"
    needs: ClassVar[frozenset[str]] = frozenset({"full_attention"})

    def __call__(self, trace: Trace) -> MethodOutput:
        if trace.full_attention is None:
            raise ValueError("rollout needs a trace with full_attention")
        raw = rollout_rows(trace, trace.full_attention, residual="normalize")  # (B, T, V)
        return finish(trace, raw, torch.ones_like(raw[..., 0]))
