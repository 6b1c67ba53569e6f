"""Method interface and the shared map post-processing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from dexar.tracing import Trace


@dataclass
class MethodOutput:
    """Batched result of a method on one trace (answer slots right-aligned as in the trace).

    Attributes:
        token_maps: ``(B, T, h, w)`` min-max normalised per-token maps (zero where flagged).
        token_weights: ``(B, T)`` weight of each token in the sequence map (0 on padding slots).
        sequence_map: ``(B, h, w)`` min-max normalised sequence map (zero where flagged).
        token_empty: ``(B, T)`` True where a token map had no visual evidence (constant raw map).
        sequence_empty: ``(B,)`` True where the weighted sum of token maps was constant.

    """

    token_maps: torch.Tensor
    token_weights: torch.Tensor
    sequence_map: torch.Tensor
    token_empty: torch.Tensor
    sequence_empty: torch.Tensor


class Method(Protocol):
    """An explanation method: ``needs`` declares what the trace must record."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]

    def __call__(self, trace: Trace) -> MethodOutput:
        """Explain every sample of the traced batch."""
        ...


def minmax(maps: torch.Tensor, dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max normalise over the last ``dims`` dimensions.

    A constant map (no visual evidence) becomes all zeros and is flagged: never NaN.

    Returns:
        ``(normalised, empty)`` where ``empty`` has the leading shape.

    """
    flat = maps.flatten(-dims) if dims > 1 else maps
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    span = hi - lo
    empty = (span <= 0).squeeze(-1)
    safe = torch.where(span > 0, span, torch.ones_like(span))
    norm = torch.where(span > 0, (flat - lo) / safe, torch.zeros_like(flat))
    return norm.view(maps.shape), empty


def finish(trace: Trace, raw_token_maps: torch.Tensor, token_weights: torch.Tensor) -> MethodOutput:
    """Reshape ``(B, T, V)`` raw token maps to the grid, normalise, and build the sequence map.

    The sequence map is ``MinMax(Σ_t λ_t E_t)`` over real answer tokens (paper eq. 6); padding
    slots get weight 0 and a zero map.
    """
    h, w = trace.grid
    answer = trace.answer_mask
    token_maps, token_empty = minmax(raw_token_maps)
    token_maps = token_maps * answer[..., None]
    weights = token_weights * answer
    seq_raw = (weights[..., None] * token_maps).sum(1)
    sequence_map, sequence_empty = minmax(seq_raw)
    b, t = answer.shape
    return MethodOutput(
        token_maps=token_maps.view(b, t, h, w),
        token_weights=weights,
        sequence_map=sequence_map.view(b, h, w),
        token_empty=token_empty & answer,
        sequence_empty=sequence_empty,
    )
