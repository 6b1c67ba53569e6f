"""RISE baseline (Petsiuk et al. 2018): random masks scored by the answer's log-likelihood."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from dexar.methods.base import MethodOutput, finish
from dexar.trace import Trace, answer_log_probs


def rise_masks(count: int, cells: int, keep: float, size: tuple[int, int], seed: int) -> torch.Tensor:
    """RISE's smooth random masks ``(count, H, W)`` in [0, 1], float64 on the CPU, fully seeded.

    A ``cells × cells`` binary grid (each cell kept with probability ``keep``) is upsampled bilinearly
    to ``(cells + 1) × cell`` pixels (``cell = ⌈size / cells⌉``) and cropped at a random offset in
    ``[0, cell)``, as in the RISE paper.
    """
    gen = torch.Generator().manual_seed(seed)
    height, width = size
    cell_h, cell_w = math.ceil(height / cells), math.ceil(width / cells)
    grid = (torch.rand(count, 1, cells, cells, generator=gen, dtype=torch.float64) < keep).to(torch.float64)
    up = F.interpolate(grid, size=((cells + 1) * cell_h, (cells + 1) * cell_w), mode="bilinear", align_corners=False)
    dy = torch.randint(0, cell_h, (count,), generator=gen)
    dx = torch.randint(0, cell_w, (count,), generator=gen)
    return torch.stack([up[i, 0, y : y + height, x : x + width] for i, (y, x) in enumerate(zip(dy, dx, strict=True))])


@dataclass
class Rise:
    """Randomized input sampling: the expected score of the answer when a pixel is kept.

    ``S_t(λ) = Σ_i f_t(x ⊙ M_i) M_i(λ) / Σ_i M_i(λ)`` with ``f_t = log p(w_t | x ⊙ M_i, prompt, w_<t)``;
    masked pixels take the mean image (0 in normalised space), the map is averaged over each token's
    patch. Open choices: the estimator is self-normalised by each pixel's own mask coverage (the
    paper divides by ``N·E[M]``): a log-likelihood is negative and its offset would otherwise leak
    the masks' coverage noise into the map; the masks are the same for every sample (seeded), so a
    sample's map does not depend on its batch. One forward per ``batch_size`` masked copies of a
    sample gives every token's score at once. The default, 16 masks, keeps RISE under the paper's
    cost ratio (16.6× DEX-AR; one masked forward ≈ 0.8× DEX-AR: 12.0–14.7× measured by
    ``benchmarks/methods.py``). RISE's own papers use thousands, and the maps keep improving with
    ``num_masks`` (cost linear in it): on 200 Shapes images, POS AUC 20.7 / 28.3 / 42.8 / 56.3 at
    16 / 32 / 128 / 512 masks (``configs/ablations/baseline_budgets.yaml``).

    Args:
        num_masks: Number of random masks ``N``.
        cells: Mask grid size ``s`` (RISE uses 7 at 224 px).
        keep: Probability that a cell is kept (``p``).
        seed: Seed of the masks.
        batch_size: Masked images per forward.

    """

    num_masks: int = 16
    cells: int = 7
    keep: float = 0.5
    seed: int = 0
    batch_size: int = 32

    name: ClassVar[str] = "rise"
    needs: ClassVar[frozenset[str]] = frozenset({"extra_forwards"})

    def __post_init__(self) -> None:
        if self.num_masks < 1 or self.cells < 1 or self.batch_size < 1 or not 0 < self.keep < 1:
            raise ValueError(f"rise: need num_masks, cells, batch_size ≥ 1 and 0 < keep < 1; got {self}")

    def saliency(self, trace: Trace) -> torch.Tensor:
        """``(B, T, V)`` raw RISE saliency (0 on padding slots)."""
        adapter, batch = trace.adapter, trace.batch
        if adapter is None:
            raise ValueError("rise needs trace.adapter (extra_forwards)")
        pixels = batch.inputs["pixel_values"]
        work = torch.promote_types(next(adapter.model.parameters()).dtype, torch.float32)
        size = tuple(adapter.pixel_view(batch, 0).shape[-2:])
        masks = rise_masks(self.num_masks, self.cells, self.keep, size, self.seed)
        masks = masks.to(pixels.device, work)
        coverage = masks.sum(0).clamp(min=torch.finfo(work).tiny)
        b_count, t_max = trace.answer_mask.shape
        raw = torch.zeros(b_count, t_max, trace.image_index.shape[1], dtype=work, device=pixels.device)
        with torch.no_grad():
            for b in range(b_count):
                x = adapter.pixel_view(batch, b).to(work)  # (C, H, W); tiled views share the masks
                lead = [1] * (x.dim() - 2)
                scores = torch.cat(
                    [
                        answer_log_probs(adapter, batch, x * m.view(len(m), *lead, *x.shape[-2:]), index=b)
                        for m in masks.split(max(1, self.batch_size))
                    ]
                ).to(work)  # (N, T)
                saliency = torch.einsum("nt,nhw->thw", scores, masks) / coverage
                saliency = saliency.view(len(saliency), *lead[1:], *x.shape[-2:]).expand(-1, *x.shape[:-3], -1, -1)
                raw[b] = adapter.pool_view(batch, saliency, "mean") * trace.answer_mask[b, :, None]
        return raw

    def __call__(self, trace: Trace) -> MethodOutput:
        raw = self.saliency(trace)
        return finish(trace, raw, torch.ones_like(raw[..., 0]))
