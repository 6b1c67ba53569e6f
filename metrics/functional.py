"""Pure tensor implementations of the evaluation metrics (batched over a leading sample dim)."""

from __future__ import annotations

import torch


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Energy Pointing Game: the share of a map's energy inside the mask, ``Σ(E⊙M) / ΣE``.

    Args:
        maps: ``(N, H, W)`` non-negative maps.
        masks: ``(N, H, W)`` boolean masks.

    Returns:
        ``(N,)`` values in [0, 1]; NaN where a map has no energy (all zero) so callers can count
        and skip those samples explicitly instead of averaging them in.

    """
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must have the same shape")
    if (maps < 0).any():
        raise ValueError("energy_pointing_game needs non-negative maps")
    energy = maps.flatten(1).sum(1)
    inside = (maps * masks).flatten(1).sum(1)
    return torch.where(energy > 0, inside / energy.clamp(min=torch.finfo(maps.dtype).tiny), torch.nan)
