"""CheferCAM baseline (Chefer et al. 2021, generic attention explainability; paper appendix C.2, eq. 9–10)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dexar.methods.base import MethodOutput, finish
from dexar.trace import Trace


@dataclass
class CheferCAM:
    """Gradient-weighted attention relevance propagated through the layers.

    For answer token ``t``, with ``y_t^L`` the model's own (final-layer) logit of ``w_t``:
    ``Ā_t^l = mean_h ReLU(∂y_t^L/∂A^{l,h} ⊙ A^{l,h})``; ``R = I``, for ``l = 1..L``:
    ``R ← R + Ā_t^l · R`` (eq. 9), so ``R = (I + Ā_t^L) ⋯ (I + Ā_t^1)``; token map ``R[p_t, V]``
    (eq. 10). Row ``p_t`` is propagated as a row vector (exact, ``O(L·N²)`` per token) inside the
    shared trace's backward of each token (``final_logit_grads``): each layer's ``Ā_t^l`` is folded in
    as its gradient arrives (:func:`dexar.trace.backward.grad_rollout`), so no ``(B, T, L, N, N)``
    products are kept.
    """

    name: ClassVar[str] = "chefercam"
    needs: ClassVar[frozenset[str]] = frozenset({"final_logit_grads"})

    def __call__(self, trace: Trace) -> MethodOutput:
        if trace.final_grad_rollout is None:
            raise ValueError("chefercam needs a trace with final_logit_grads (over every layer)")
        raw = trace.image_columns(trace.final_grad_rollout)  # (B, T, V)
        return finish(trace, raw, torch.ones_like(raw[..., 0]))
