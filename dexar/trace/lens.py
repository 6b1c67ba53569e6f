"""Read-outs of decoder hidden states through the final norm and the unembedding.

* The logit lens (paper eq. 3): ``y_t^l = U[w_t] · norm(h^l_{p_t}) (+ b[w_t])``, only the row ``U[w_t]``
  of the unembedding, for every layer ``l``.
* The answer's log-likelihood ``log p(w_t | image, prompt, w_<t)`` from the last layer's rows.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from dexar.trace.precision import upcast, working_dtype
from dexar.trace.rmsnorm import RMSNorm

if TYPE_CHECKING:
    from dexar.adapters.base import VLMAdapter


FORMULA: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
"""Final norm → whether its output matched :class:`~dexar.trace.rmsnorm.RMSNorm` the first time it was seen."""


class LogitLens:
    """``y_t^l`` of one batch's answer tokens for any layer's answer rows; the unembedding rows gathered once.

    Args:
        adapter: The model's adapter (final norm, unembedding).
        answer_ids: ``(B, T)`` the answer token ``w_t`` read at each row; padding ``-1``.

    The read-out runs in float32 on a bf16/fp16 model (:mod:`dexar.trace.precision`): ``λ_t`` is a
    difference of maxima of these logits' gradients.
    """

    def __init__(self, adapter: VLMAdapter, answer_ids: torch.Tensor) -> None:
        self.adapter = adapter
        self.answer_mask = answer_ids >= 0
        ids = answer_ids.clamp(min=0)
        self.work = working_dtype(adapter.unembedding.weight.dtype)
        self.unembed = adapter.unembedding.weight[ids].to(self.work)  # (B, T, D)
        bias = getattr(adapter.unembedding, "bias", None)
        self.bias = None if bias is None else bias[ids].to(self.work)
        self.rms_norm = RMSNorm.of(adapter.final_norm)  # the gradient by formula, if the norm computes it

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` the lens of ``(B, T, D)`` output rows ``p_t``, 0 on padding slots (differentiable)."""
        norm = self.adapter.final_norm
        with upcast(self.adapter.unembedding, norm):
            values = (norm(hidden.to(self.work)).to(self.work) * self.unembed).sum(-1)  # (B, T)
        if self.bias is not None:
            values = values + self.bias
        return values * self.answer_mask

    def value_and_grad(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T)`` the lens of ``(B, T, D)`` rows (no graph) and ``(B, T, D)`` its gradient at the rows.

        Written out for a final RMS norm (:mod:`dexar.trace.rmsnorm`): ``∂y_t/∂h = RMSNorm.backward(h, U[w_t])``,
        the gradient ``0`` on padding slots; used once the norm's output was seen to match the formula on
        these rows' dtype, else autograd.
        """
        hidden = hidden.detach()
        norm = self.rms_norm
        if norm is not None and hidden.dtype == self.work and self._formula(norm, hidden):
            with torch.no_grad():
                values = self(hidden)
                grad = norm.backward(hidden, self.unembed) * self.answer_mask[..., None]
            return values, grad
        hidden.requires_grad_(True)
        with torch.enable_grad():
            values = self(hidden)
            (grad,) = torch.autograd.grad(values.sum(), hidden)
        return values.detach(), grad

    @staticmethod
    def _formula(norm: RMSNorm, hidden: torch.Tensor) -> bool:
        """Whether the final norm computes :class:`RMSNorm`'s formula (checked on ``hidden`` the first time)."""
        if norm.module not in FORMULA:
            with torch.no_grad():
                FORMULA[norm.module] = norm.matches(hidden, norm.module(hidden))
        return FORMULA[norm.module]


def layer_lens(adapter: VLMAdapter, rows: list[torch.Tensor], answer_ids: torch.Tensor) -> list[torch.Tensor]:
    """``y_t^l`` of each layer's answer rows: one ``(B, T)`` tensor per layer, 0 on padding slots.

    Args:
        adapter: The model's adapter (final norm, unembedding).
        rows: Per layer, ``(B, T, D)`` its output at the answer rows ``p_t``.
        answer_ids: ``(B, T)`` the answer token ``w_t`` read at each row; padding ``-1``.

    One graph per layer (:class:`LogitLens`): a backward from one layer's slice of a stacked ``(B, L, T)``
    tensor would also push zero gradients down every other layer.
    """
    lens = LogitLens(adapter, answer_ids)
    return [lens(hidden) for hidden in rows]


def log_probs(adapter: VLMAdapter, rows: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """``log p(w_t)`` from the last layer's output rows ``(B, T, D)``, float32 or wider; 0 on padding slots.

    The final norm and the unembedding run in float32 on a bf16/fp16 model (:mod:`dexar.trace.precision`).
    """
    with upcast(adapter.unembedding, adapter.final_norm):
        logits = adapter.unembedding(adapter.final_norm(rows.to(working_dtype(rows.dtype))))
    logits = logits.to(working_dtype(logits.dtype))
    picked = logits.log_softmax(-1).gather(-1, answer_ids.clamp(min=0)[..., None])[..., 0]
    return picked * (answer_ids >= 0)
