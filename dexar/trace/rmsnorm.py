"""The RMS norm of LLaMA-family decoders, ``w ⊙ h · rsqrt(mean(h²) + ε)``, and its vector-Jacobian product.

Two places differentiate through it on ``T`` answer rows: the hand-written block backward
(:mod:`dexar.trace.tail`, the post-attention norm) and the logit lens' gradient at a layer's output rows
(:meth:`dexar.trace.lens.LogitLens.value_and_grad`, the final norm). Written out, the product is a few
``T``-row operations instead of an autograd graph and engine call per layer. A caller uses it only where
the module was seen to compute this formula on its own inputs (:meth:`RMSNorm.matches`): Gemma's norm
scales by ``1 + w``, and LLaMA's stock norm rounds a float64 input through float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``allclose`` tolerances for "the module computes this formula" in ``dtype``."""
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}


@dataclass(frozen=True)
class RMSNorm:
    """A norm module's weight and ε under transformers' LLaMA-family names."""

    module: nn.Module
    eps: float

    @classmethod
    def of(cls, module: nn.Module | None) -> RMSNorm | None:
        """The norm's parameters, or ``None`` if ``module`` has no ``weight`` and ``variance_epsilon``."""
        eps = getattr(module, "variance_epsilon", None)
        if module is None or eps is None or getattr(module, "weight", None) is None:
            return None
        return cls(module, float(eps))

    @property
    def weight(self) -> torch.Tensor:
        """The norm's weight ``w``."""
        return self.module.weight

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """``w ⊙ h · rsqrt(mean(h²) + ε)``."""
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))

    def matches(self, h: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether ``out`` (the module's output for ``h``) follows the formula."""
        return torch.allclose(self(h), out, **tolerance(h.dtype))

    def backward(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The gradient at ``h`` given ``δ`` at the output: ``r (v − ĥ mean(v ⊙ ĥ))``, ``v = w ⊙ δ``.

        ``r = rsqrt(mean(h²) + ε)`` and ``ĥ = h r`` (both per row).
        """
        v = delta * self.weight
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        hat = h * r
        return r * (v - hat * (v * hat).mean(-1, keepdim=True))
