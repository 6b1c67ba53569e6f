"""Integrated Gradients baseline (Sundararajan et al. 2017) on ``pixel_values``, target the answer's log-likelihood."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dexar.methods.base import MethodOutput, finish
from dexar.trace import Trace, answer_log_probs, batched_grads

SPACINGS = ("uniform", "quadratic")


@dataclass
class IntegratedGradients:
    """Path-integrated pixel gradients of each answer token's log-likelihood, pooled to the token grid.

    ``IG_t(x) = (x − x') ⊙ ∫_0^1 ∂f_t(x' + α(x − x'))/∂x dα`` with ``f_t = log p(w_t | x, prompt, w_<t)``
    and the mean image as baseline (``x' = 0`` in normalised space).

    Open choices: the integral uses the midpoint rule in ``u_i = (i − ½)/steps``, with ``α = u``
    (``spacing="uniform"``) or ``α = u²`` (``"quadratic"``, weights ``2u/steps``: the same integral
    after a change of variable, with points denser near the baseline, where an answer's
    log-likelihood changes fastest). Both err by ``O(steps⁻²)`` on a smooth path, but completeness
    ``Σ IG_t = f_t(x) − f_t(x')`` is far from exact at practical budgets on a real model: on the bundled
    Shapes model (float64, 10 test images, answer-level target, ``|Δf|`` 12.8–81.1 nats) the relative gap
    ``|Σ IG − Δf| / |Δf|`` at 64 points was 0.8–46% (median 11.6%) uniform and 0.5–54% (median 5.0%)
    quadratic, at 256 uniform points still 0.04–15% (median 1.1%) (``benchmarks/ig_completeness.py``;
    the metrics use the maps' pixel order, not their totals). A token's map is the signed attribution
    summed over colour channels and over each token's patch (totals are kept, so the map still sums to
    ``f_t(x) − f_t(x')``). Each forward scores ``batch_size`` path points of one sample.

    Defaults: the target is the answer's log-likelihood ``Σ_t f_t`` (one plain backward per forward;
    every token gets that map), with 4 quadratic points: under the paper's cost ratio (11.5× DEX-AR;
    ``benchmarks/methods.py`` measures 7.7–10.3× for 4 points, 10.2–12.1× for 5: one trace plus
    ≈ 2.15× DEX-AR per point). On 200 Shapes images (``configs/ablations/baseline_budgets.yaml``)
    quadratic points beat uniform ones at every budget (POS AUC 11.7 vs 7.9 at 5 points, 24.0 vs
    19.0 at 32); 4 of them match 10 uniform ones, the earlier default, in NEG AUC and EPG (2.48 /
    2.46, 0.127 / 0.128) but not in POS AUC (8.4 / 12.3). The maps keep improving with ``steps``
    (cost linear in it). ``per_token=True`` gives each token its own target ``f_t``, all tokens
    sharing one batched backward per forward, at about ``T×`` the cost.

    Args:
        steps: Path points.
        batch_size: Path points per forward.
        per_token: One target per answer token (else the answer's log-likelihood for all).
        spacing: ``uniform`` or ``quadratic`` path points (see above).

    """

    steps: int = 4
    batch_size: int = 10
    per_token: bool = False
    spacing: str = "quadratic"

    name: ClassVar[str] = "integrated_gradients"
    needs: ClassVar[frozenset[str]] = frozenset({"extra_forwards"})

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"integrated_gradients: need steps ≥ 1 and batch_size ≥ 1; got {self}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"integrated_gradients.spacing must be one of {SPACINGS}, got {self.spacing!r}")

    def path(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Path points ``α_i`` and their quadrature weights (summing to 1)."""
        u = (torch.arange(self.steps, dtype=dtype, device=device) + 0.5) / self.steps
        if self.spacing == "quadratic":
            return u * u, 2 * u / self.steps
        return u, torch.full_like(u, 1 / self.steps)

    def attributions(self, trace: Trace) -> torch.Tensor:
        """``(B, T, V)`` raw attributions (0 on padding slots)."""
        adapter, batch = trace.adapter, trace.batch
        if adapter is None:
            raise ValueError("integrated_gradients needs trace.adapter (extra_forwards)")
        pixels = batch.inputs["pixel_values"]
        work = torch.promote_types(next(adapter.model.parameters()).dtype, torch.float32)
        b_count, t_max = trace.answer_mask.shape
        raw = torch.zeros(b_count, t_max, trace.image_index.shape[1], dtype=work, device=pixels.device)
        alphas, weights = self.path(work, pixels.device)
        for b in range(b_count):
            length = int(batch.answer_lengths[b])
            if length == 0:
                continue
            x = adapter.pixel_view(batch, b).to(work)  # (C, H, W) for LLaVA; tiles or resized images
            total = torch.zeros(length if self.per_token else 1, *x.shape, dtype=work, device=x.device)
            size, lead = max(1, self.batch_size), [1] * x.dim()
            for chunk, weight in zip(alphas.split(size), weights.split(size), strict=True):
                path = (chunk.view(-1, *lead) * x).requires_grad_(True)
                with torch.enable_grad():
                    target = answer_log_probs(adapter, batch, path, index=b)[:, t_max - length :]
                    if self.per_token:
                        for t0, c, (grad,) in batched_grads(target, [path], None):
                            total[t0 : t0 + c] += (grad * weight.view(1, -1, *lead)).sum(1)
                    else:
                        (grad,) = torch.autograd.grad(target.sum(), path)
                        total[0] += (grad * weight.view(-1, *lead)).sum(0)
            pixel_attr = (x * total).sum(-3)  # (T_b, ..., H, W): summed over channels
            raw[b, t_max - length :] = adapter.pool_view(batch, pixel_attr, "sum")
        return raw

    def __call__(self, trace: Trace) -> MethodOutput:
        raw = self.attributions(trace)
        return finish(trace, raw, torch.ones_like(raw[..., 0]))
