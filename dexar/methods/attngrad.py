"""AttnGrad baseline (Chefer et al. 2021b's attention × gradient, over all layers; paper appendix C.3, eq. 11–12)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dexar.methods.base import MethodOutput, finish
from dexar.trace import Trace


@dataclass
class AttnGrad:
    """Attention times its layer-wise gradient, head-averaged and summed over layers.

    ``E_t = Σ_l mean_h ReLU(A^{l,h}[p_t, V] ⊙ g_{t,V}^l[h])`` with DEX-AR's layer-wise (logit-lens)
    gradients ``g_t^l = ∂y_t^l/∂A^l[:, p_t, :]`` (eq. 11–12): the same one-pass trace as DEX-AR,
    without its head and token filtering.
    """

    name: ClassVar[str] = "attngrad"
    needs: ClassVar[frozenset[str]] = frozenset({"attention_rows", "layer_grads"})

    def __call__(self, trace: Trace) -> MethodOutput:
        if trace.grads is None:
            raise ValueError("attngrad needs a trace with layer_grads")
        attn = trace.image_columns(trace.attentions)  # (B, L, H, T, V)
        grads = trace.image_columns(trace.grads)
        raw = (attn * grads).clamp(min=0).mean(dim=2).sum(dim=1)  # (B, T, V)
        return finish(trace, raw, torch.ones_like(raw[..., 0]))
