"""Read-outs of decoder hidden states through the final norm and the unembedding.

* The logit lens (paper eq. 3): ``y_t^l = U[w_t] · norm(h^l_{p_t}) (+ b[w_t])``, only the row ``U[w_t]``
  of the unembedding, for every layer ``l``.
* The answer's log-likelihood ``log p(w_t | image, prompt, w_<t)`` from the last layer's rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dexar.trace.precision import upcast, working_dtype

if TYPE_CHECKING:
    from dexar.adapters.base import VLMAdapter


def layer_lens(adapter: VLMAdapter, rows: list[torch.Tensor], answer_ids: torch.Tensor) -> list[torch.Tensor]:
    """``y_t^l`` of each layer's answer rows: one ``(B, T)`` tensor per layer, 0 on padding slots.

    Args:
        adapter: The model's adapter (final norm, unembedding).
        rows: Per layer, ``(B, T, D)`` its output at the answer rows ``p_t``.
        answer_ids: ``(B, T)`` the answer token ``w_t`` read at each row; padding ``-1``.

    One graph per layer: a backward from one layer's slice of a stacked ``(B, L, T)`` tensor would also
    push zero gradients down every other layer. The read-out runs in float32 on a bf16/fp16 model
    (:mod:`dexar.trace.precision`): ``λ_t`` is a difference of maxima of these logits' gradients.
    """
    answer_mask = answer_ids >= 0
    ids = answer_ids.clamp(min=0)
    work = working_dtype(adapter.unembedding.weight.dtype)
    unembed = adapter.unembedding.weight[ids].to(work)  # (B, T, D)
    bias = getattr(adapter.unembedding, "bias", None)
    lens = []
    with upcast(adapter.unembedding, adapter.final_norm):
        for hidden in rows:
            values = (adapter.final_norm(hidden.to(work)).to(work) * unembed).sum(-1)  # (B, T)
            if bias is not None:
                values = values + bias[ids].to(work)
            lens.append(values * answer_mask)
    return lens


def log_probs(adapter: VLMAdapter, rows: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """``log p(w_t)`` from the last layer's output rows ``(B, T, D)``, float32 or wider; 0 on padding slots.

    The final norm and the unembedding run in float32 on a bf16/fp16 model (:mod:`dexar.trace.precision`).
    """
    with upcast(adapter.unembedding, adapter.final_norm):
        logits = adapter.unembedding(adapter.final_norm(rows.to(working_dtype(rows.dtype))))
    logits = logits.to(working_dtype(logits.dtype))
    picked = logits.log_softmax(-1).gather(-1, answer_ids.clamp(min=0)[..., None])[..., 0]
    return picked * (answer_ids >= 0)
