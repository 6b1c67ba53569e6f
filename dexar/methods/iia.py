"""IIA baseline (Barkan et al., ICCV 2023, "Visual Explanations via Iterated Integrated Attributions")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dexar.methods.base import MethodOutput, finish, rollout_rows
from dexar.trace import Trace, grad_weighted_attention


@dataclass
class IIA:
    """Iterated integrated attributions over the image and the last layer's attention, rolled out.

    The transformer form of IIA integrates Chefer's gradient-weighted attention along two nested
    straight-line paths: the input ``x_α = α·x`` from the mean image (0 in normalised space), and,
    inside it, the last decoder layer's attention ``β·A^L(x_α)`` from zero (injected in place of
    ``softmax(QK^T)``, so no gradient crosses that layer's queries and keys):

    ``Ā_t^l = mean_{α,β} mean_h ReLU(∂f_t/∂A^{l,h} ⊙ A^{l,h})`` evaluated at ``(x_α, β·A^L(x_α))``,
    ``α, β ∈ {0, 1/s, …, 1}`` (both endpoints, as the authors' code), with ``f_t = log p(w_t | …)``
    the answer token's log-likelihood (the class score of the image classifier). The map is the
    attention rollout of ``Ā`` read at the predicting row: ``R = M^L ⋯ M^1``,
    ``M^l = rownorm(Ā^l + I)``, ``E_t = R[p_t, V]``. The LLM's decoder layers play the ViT blocks;
    the vision tower is not instrumented. The layers below the last do not depend on ``β``: each
    ``α`` costs one forward (which also reads ``A^L(x_α)``), each ``(α, β)`` one re-run of the last
    layer and one backward (batched over the tokens). Defaults: the target is the whole answer's
    log-likelihood ``Σ_t f_t`` (one plain backward per pair; the read-out rows ``p_t`` stay per token)
    and ``s = 2`` (9 pairs): 12.5–16.3× DEX-AR measured by ``benchmarks/methods.py``, under the
    paper's 21.5×. ``per_token=True`` (one target per token, batched backward) costs about ``T×``
    more, and the authors' ViT setting ``s = 5`` (36 pairs) about 4× more; on 200 Shapes images POS
    AUC is 18.0 / 20.5 / 23.7 at ``s`` = 1 / 2 / 4 (``configs/ablations/baseline_budgets.yaml``).

    Args:
        steps: Intervals ``s`` of each path (``s + 1`` points; the authors' ViT code uses 5).
        per_token: One target per answer token (else the answer's log-likelihood for all).

    """

    steps: int = 2
    per_token: bool = False

    name: ClassVar[str] = "iia"
    needs: ClassVar[frozenset[str]] = frozenset({"extra_forwards"})
    probe_needs: ClassVar[frozenset[str]] = frozenset({"attention_probes"})
    """Its extra forwards inject the last layer's decoder self-attention over image and text tokens
    (:meth:`dexar.adapters.base.VLMAdapter.check_method` reads it; the tracer never sees it)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"iia: need steps ≥ 1; got {self}")

    def integrated_attention(self, trace: Trace) -> torch.Tensor:
        """``(B, T, L, N, N)`` (or ``(B, L, N, N)`` without ``per_token``) the integrated ``Ā``."""
        adapter, batch = trace.adapter, trace.batch
        if adapter is None:
            raise ValueError("iia needs trace.adapter (extra_forwards)")
        pixels = batch.inputs["pixel_values"]
        work = torch.promote_types(next(adapter.model.parameters()).dtype, torch.float32)
        points = torch.linspace(0, 1, self.steps + 1, dtype=work)
        betas = points.tolist()
        total = None
        for alpha in points:
            cam = grad_weighted_attention(adapter, batch, pixels.to(work) * alpha, betas, self.per_token)
            total = cam if total is None else total + cam
        total = total / len(points) ** 2
        return total if self.per_token else total[:, 0]

    def __call__(self, trace: Trace) -> MethodOutput:
        raw = rollout_rows(trace, self.integrated_attention(trace), residual="normalize")
        return finish(trace, raw, torch.ones_like(raw[..., 0]))
