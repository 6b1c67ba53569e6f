"""Random weights for the tiny test models: far from the near-uniform attention of a default init."""

from __future__ import annotations

import torch
from torch import nn


def scale_weights(model: nn.Module, gain: float = 1.5, seed: int | None = None) -> None:
    """Re-draw every 2-D weight but the embeddings from N(0, (gain / √fan_in)²): attention far from uniform.

    Args:
        model: The freshly initialised model (changed in place).
        gain: Standard deviation times √fan_in (``fan_in`` = the matrix's second dimension).
        seed: ``None``: draw from the global RNG in each parameter's dtype (call it inside the
            ``fork_rng`` that built the model); a seed: draw from a generator of its own in float64, then
            cast (the weights then do not depend on how many numbers the build drew). The two draws differ:
            each tiny model keeps the one its tests' values were computed with.

    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim != 2 or "embed" in name:
                continue
            root_fan_in = param.shape[1] ** 0.5
            if generator is None:
                param.normal_(0.0, gain / root_fan_in)
            else:
                value = torch.randn(param.shape, generator=generator, dtype=torch.float64) * gain / root_fan_in
                param.copy_(value.to(param.dtype))
