"""DEX-AR (paper section 3): layer-wise logit-lens gradients on attention, filtered by head and token.

With ``g = g_t^l`` the gradient of the logit-lens logit ``y_t^l`` w.r.t. row ``p_t`` of ``A^l``
(``H × N``), split into image columns ``g_V`` and text columns ``g_T`` (unmasked, non-image, at or
before ``p_t``):

* head weights (eq. 4): ``m_V = agg_j ReLU(g_V)[h, j]``, ``m_T = agg_j ReLU(g_T)[h, j]``,
  ``w^{l,h} = ReLU(m_V − m_T)``; ``agg`` is ``max`` (paper), ``top-p`` (mean of the top ``p``
  fraction, at least one value), ``avg`` (mean); ``none`` sets ``w = 1``;
* token map (eq. 5): ``E_t = MinMax(Reshape(Σ_l Σ_h w^{l,h} · ReLU(g_V^l[h])))``; ``relu=False``
  uses ``g_V`` unclipped (appendix G.1); ``layers="last"`` keeps only the last layer (G.2);
* token weight: ``λ_t = ReLU(max_{l,h} m_V^{l,h} − max_{l,h} m_T^{l,h})`` over the same layers as the
  map, with ``m_V``, ``m_T`` aggregated over columns by the head filter's ``agg`` (``none`` has no
  aggregation of its own and keeps the paper's ``max``); ``filler_filter=False`` sets ``λ_t = 1``.
  Reading (section 3 defines λ_t with the max only): appendix L / table 8 compares the filler filter
  under the ``max``, ``avg`` and top-p strategies and its rows differ by orders of magnitude (max
  62.7–153.5, avg 1.5–9.4), so the strategy must reach λ_t; using it for the same ``m_V``, ``m_T``
  that score the heads is the one place it can. The outer max over layers and heads stays a max:
  the paper names no other, and with ``agg = max`` it gives back the section-3 formula;
* sequence map (eq. 6): ``E = MinMax(Σ_t λ_t E_t)``.

The extra variant ``weight_by_attention=True`` multiplies the filtered gradient by the attention
probability (``A ⊙ ReLU(∇A)``) before summing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from dexar.methods.base import MethodOutput, finish
from dexar.trace import Trace

HEAD_FILTERS = ("max", "avg", "none") + tuple(f"top-{p / 100:g}" for p in (5, *range(10, 100, 10)))


def _aggregate(values: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Aggregate non-negative ``values`` over the last dim, restricted to ``mask`` (broadcast).

    Returns 0 where the mask selects no column.
    """
    if mask is not None:
        values = values * mask
    if mode == "max":
        return values.amax(-1)
    count = (
        mask.expand_as(values).sum(-1)
        if mask is not None
        else torch.full(values.shape[:-1], values.shape[-1], device=values.device)
    ).to(values.dtype)
    if mode == "avg":
        return values.sum(-1) / count.clamp(min=1)
    p = float(mode.split("-", 1)[1])
    k = torch.ceil(count * p - 1e-9).clamp(min=1)
    filled = values if mask is None else values.masked_fill(~mask.expand_as(values), float("-inf"))
    ordered = filled.sort(dim=-1, descending=True).values
    rank = torch.arange(values.shape[-1], device=values.device)
    take = rank < k[..., None]
    total = torch.where(take, ordered, torch.zeros_like(ordered)).sum(-1)
    return torch.where(count > 0, total / k, torch.zeros_like(total))


@dataclass
class DexAR:
    """DEX-AR explanation method.

    Args:
        head_filter: ``max`` (default), ``avg``, ``none`` or ``top-p`` with p in {0.05, 0.1, ..., 0.9}.
        relu: Apply ReLU to the image gradients in the token map (eq. 5).
        layers: ``all`` (sum over layers) or ``last`` (last layer only).
        filler_filter: Weight tokens by ``λ_t`` in the sequence map (else ``λ_t = 1``).
        weight_by_attention: Multiply the filtered gradient by the attention (``A ⊙ ReLU(∇A)``).

    """

    head_filter: str = "max"
    relu: bool = True
    layers: str = "all"
    filler_filter: bool = True
    weight_by_attention: bool = False

    name: ClassVar[str] = "dexar"
    needs: ClassVar[frozenset[str]] = frozenset({"attention_rows", "layer_grads"})

    def __post_init__(self) -> None:
        if self.head_filter.startswith("top-"):
            try:
                p = float(self.head_filter[4:])
            except ValueError:
                p = math.nan
            if not 0 < p <= 1:
                raise ValueError(f"head_filter {self.head_filter!r}: top-p needs 0 < p <= 1")
        elif self.head_filter not in HEAD_FILTERS:
            raise ValueError(f"head_filter must be one of {HEAD_FILTERS}, got {self.head_filter!r}")
        if self.layers not in ("all", "last"):
            raise ValueError(f"layers must be 'all' or 'last', got {self.layers!r}")

    def __call__(self, trace: Trace) -> MethodOutput:
        if trace.grads is None:
            raise ValueError("DEX-AR needs a trace with layer_grads")
        if self.layers == "last":
            trace = trace.select_layers(slice(-1, None))
        grads, attn = trace.grads, trace.attentions
        text = trace.text_mask[:, None, None]  # (B, 1, 1, T, N)
        g_image = trace.image_columns(grads)  # (B, L, H, T, V)
        pos_image = g_image.clamp(min=0)

        mode = "max" if self.head_filter == "none" else self.head_filter
        m_v = _aggregate(pos_image, None, mode)  # (B, L, H, T)
        if mode == "max":  # max_j ReLU(g_j) = ReLU(max_j g_j): no ReLU and mask product over every column
            outside = torch.zeros(text.shape, dtype=grads.dtype, device=grads.device).masked_fill_(~text, -math.inf)
            m_t = (grads + outside).amax(-1).clamp(min=0)  # no text column: -inf, then 0 (as _aggregate)
        else:
            m_t = _aggregate(grads.clamp(min=0), text, mode)
        head_w = torch.ones_like(m_v) if self.head_filter == "none" else (m_v - m_t).clamp(min=0)

        contrib = pos_image if self.relu else g_image
        if self.weight_by_attention:
            contrib = contrib * trace.image_columns(attn).to(contrib.dtype)
        raw = (head_w[..., None] * contrib).sum(dim=(1, 2))  # (B, T, V)

        if self.filler_filter:
            lam = (m_v.amax(dim=(1, 2)) - m_t.amax(dim=(1, 2))).clamp(min=0)  # (B, T)
        else:
            lam = torch.ones_like(raw[..., 0])
        return finish(trace, raw, lam)
