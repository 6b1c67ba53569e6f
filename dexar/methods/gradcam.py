"""GradCAM baseline (Selvaraju et al. 2020, transformer form; paper appendix C.1, eq. 7–8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dexar.methods.base import MethodOutput, finish
from dexar.trace import Trace, hidden_grads_need


@dataclass
class GradCAM:
    """Gradient × activation of the image-token hidden states, summed over the embedding dimension.

    The paper's eq. 7 is lost in its text; this is the standard transformer form:
    ``E_t[j] = ReLU(Σ_d ∂y_t^L/∂h_{j,d} · h_{j,d})`` for image positions ``j``, with ``y_t^L`` the
    model's own (final-layer) logit of answer token ``w_t`` and ``h`` the image hidden states at a
    chosen decoder layer. Open choice, the layer: by default the last one, whose attention is the
    last place image states reach ``p_t``; there ``h`` is the normalised input its attention reads
    (its input norm's output: the usual target of GradCAM on a transformer block, e.g. a ViT's last
    ``norm1``). The residual stream entering the last layer would give ≈ 0: it reaches ``p_t`` only
    through that scale-invariant norm. For another ``layer=k``, ``h`` is the residual stream entering
    decoder layer ``k`` (HF's ``hidden_states[k]``; ``k = 0`` is the merged input embeddings). The
    trace gives the products of all tokens at once (``dexar.trace.backward.grad_x_hidden``).

    Args:
        layer: Decoder layer (negative counts from the end); ``-1``: the last layer's normalised input.

    """

    layer: int = -1

    name: ClassVar[str] = "gradcam"

    @property
    def needs(self) -> frozenset[str]:
        """The final-logit gradients at the chosen layer's input."""
        return frozenset({hidden_grads_need(self.layer)})

    def __call__(self, trace: Trace) -> MethodOutput:
        k = self.layer % trace.num_layers
        if k not in trace.grad_x_hidden:
            raise ValueError(f"gradcam needs a trace with {hidden_grads_need(self.layer)}")
        raw = trace.grad_x_hidden[k].clamp(min=0)  # (B, T, V)
        return finish(trace, raw, torch.ones_like(raw[..., 0]))
