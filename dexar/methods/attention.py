"""Raw attention baseline (paper appendix C.5, eq. 17–18): ``Σ_l mean_h A^{l,h}[p_t, V]``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dexar.methods.base import MethodOutput, finish
from dexar.trace import Trace


@dataclass
class RawAttention:
    """Head-averaged attention of each predicting row to the image tokens, summed over layers.

    Args:
        layer: Use only this layer (index, negative allowed) instead of summing over all layers.

    """

    layer: int | None = None

    name: ClassVar[str] = "attention"
    needs: ClassVar[frozenset[str]] = frozenset({"attention_rows"})

    def __call__(self, trace: Trace) -> MethodOutput:
        if self.layer is not None:
            trace = trace.select_layers(slice(self.layer, self.layer + 1 if self.layer != -1 else None))
        attn = trace.attentions
        raw = trace.image_columns(attn).mean(dim=2).sum(dim=1)  # (B, T, V)
        return finish(trace, raw, torch.ones_like(raw[..., 0]))
