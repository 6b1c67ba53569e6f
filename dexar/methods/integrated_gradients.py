"""Integrated Gradients baseline (Sundararajan et al. 2017) on ``pixel_values``, target the answer's log-likelihood."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dexar import tracing
from dexar.methods.base import MethodOutput, finish
from dexar.tracing import Trace


@dataclass
class IntegratedGradients:
    """Path-integrated pixel gradients of each answer token's log-likelihood, pooled to the token grid.

    ``IG_t(x) = (x − x') ⊙ ∫_0^1 ∂f_t(x' + α(x − x'))/∂x dα`` with ``f_t = log p(w_t | x, prompt, w_<t)``
    and the mean image as baseline (``x' = 0`` in normalised space). Open choices: the integral uses
    the midpoint rule, ``α_i = (i − ½)/steps`` (error ``O(steps⁻²)``, so completeness
    ``Σ IG_t = f_t(x) − f_t(x')`` holds to well under 1% at 64 steps); a token's map is the signed
    attribution summed over colour channels and over each token's patch (totals are kept, so the
    map still sums to ``f_t(x) − f_t(x')``). Each forward scores ``batch_size`` path points of one
    sample. Default target: the answer's log-likelihood ``Σ_t f_t`` (one plain backward per forward;
    every token gets that map), with 10 steps: about the paper's cost ratio (11.5× DEX-AR, see
    ``benchmarks/methods.py``). ``per_token=True`` gives each token its own target ``f_t``, all
    tokens sharing one batched backward per forward (``is_grads_batched``), at about ``T×`` the cost.

    Args:
        steps: Path points.
        batch_size: Path points per forward.
        per_token: One target per answer token (else the answer's log-likelihood for all).

    """

    steps: int = 10
    batch_size: int = 10
    per_token: bool = False

    name: ClassVar[str] = "integrated_gradients"
    needs: ClassVar[frozenset[str]] = frozenset({"extra_forwards"})

    def attributions(self, trace: Trace) -> torch.Tensor:
        """``(B, T, V)`` raw attributions (0 on padding slots)."""
        adapter, batch = trace.adapter, trace.batch
        if adapter is None:
            raise ValueError("integrated_gradients needs trace.adapter (extra_forwards)")
        pixels = batch.inputs["pixel_values"]
        work = torch.promote_types(next(adapter.model.parameters()).dtype, torch.float32)
        b_count, t_max = trace.answer_mask.shape
        raw = torch.zeros(b_count, t_max, trace.image_index.shape[1], dtype=work, device=pixels.device)
        alphas = (torch.arange(self.steps, dtype=work, device=pixels.device) + 0.5) / self.steps
        for b in range(b_count):
            length = int(batch.answer_lengths[b])
            if length == 0:
                continue
            x = adapter.pixel_view(batch, b).to(work)  # (C, H, W) for LLaVA; tiles or resized images
            total = torch.zeros(length if self.per_token else 1, *x.shape, dtype=work, device=x.device)
            for chunk in alphas.split(max(1, self.batch_size)):
                path = (chunk.view(-1, *([1] * x.dim())) * x).requires_grad_(True)
                with torch.enable_grad():
                    target = tracing.answer_log_probs(adapter, batch, path, index=b)[:, t_max - length :]
                    if self.per_token:
                        for t0, c, (grad,) in tracing.batched_grads(target, [path], None):
                            total[t0 : t0 + c] += grad.sum(1)
                    else:
                        (grad,) = torch.autograd.grad(target.sum(), path)
                        total[0] += grad.sum(0)
            pixel_attr = (x * total / self.steps).sum(-3)  # (T_b, ..., H, W): summed over channels
            raw[b, t_max - length :] = adapter.pool_view(batch, pixel_attr, "sum")
        return raw

    def __call__(self, trace: Trace) -> MethodOutput:
        raw = self.attributions(trace)
        return finish(trace, raw, torch.ones_like(raw[..., 0]))
