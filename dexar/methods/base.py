"""Method interface and the shared map post-processing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from dexar.trace.record import Trace


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
    """An explanation method: ``needs`` declares what the trace must record.

    ``needs`` is usually a class constant; a method whose needs depend on its options (GradCAM's
    layer) makes it a property.
    """

    name: ClassVar[str]

    @property
    def needs(self) -> frozenset[str]:
        """Trace needs (:data:`dexar.trace.NEEDS`, ``hidden_grads:<layer>``)."""
        ...

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


def to_cells(trace: Trace, values: torch.Tensor) -> torch.Tensor:
    """Image-token values ``(..., V)`` → full-image cells ``(..., h·w)`` (identity without a cell map)."""
    cell_map = trace.batch.cell_map
    if cell_map is None:
        return values
    return values @ cell_map.to(values.device, values.dtype).T


def finish(
    trace: Trace, raw_token_maps: torch.Tensor, token_weights: torch.Tensor, on_cells: bool = False
) -> MethodOutput:
    """Reshape ``(B, T, V)`` raw token maps to the grid, normalise, and build the sequence map.

    The sequence map is ``MinMax(Σ_t λ_t E_t)`` over real answer tokens (paper eq. 6); padding
    slots get weight 0 and a zero map. Tiled images: the token values are first merged into the
    full-image cells (:func:`to_cells`) unless ``on_cells`` says they already are. Normalised in float32
    (or wider) whatever the model's dtype: a bf16 min-max has 256 levels per octave, and its ties bias
    the pixel order of the perturbation metrics.
    """
    work = torch.promote_types(raw_token_maps.dtype, torch.float32)
    raw_token_maps = raw_token_maps.to(work)
    token_weights = token_weights.to(work)
    if not on_cells:
        raw_token_maps = to_cells(trace, raw_token_maps)
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


def unit_rows(trace: Trace) -> torch.Tensor:
    """``(B, T, N)`` one-hot rows ``e_{p_t}`` at each answer slot's predicting position."""
    b, t = trace.answer_mask.shape
    n = trace.batch.input_ids.shape[1]
    rows = torch.zeros(b, t, n, device=trace.answer_mask.device)
    positions = torch.arange(trace.rows.start, trace.rows.stop, device=rows.device)
    rows[:, torch.arange(t, device=rows.device), positions] = 1
    return rows


def rollout_rows(trace: Trace, matrices: torch.Tensor, residual: str) -> torch.Tensor:
    """Row ``p_t`` of a product over layers ``M^L ⋯ M^1``, by row-vector recursion (``O(L·N²)`` per token).

    Args:
        trace: The trace (predicting rows, image columns).
        matrices: ``(B, L, N, N)`` shared by all tokens or ``(B, T, L, N, N)`` per token.
        residual: ``"normalize"``: ``M^l = rownorm(matrices^l + I)`` (rollout); ``"add"``:
            ``M^l = I + matrices^l`` (Chefer's ``R ← R + Ā·R``).

    Returns:
        ``(B, T, V)`` the image columns of ``e_{p_t}ᵀ M^L ⋯ M^1``.

    """
    per_token = matrices.dim() == 5
    num_layers = matrices.shape[2] if per_token else matrices.shape[1]
    row = unit_rows(trace).to(matrices.dtype)
    for layer in reversed(range(num_layers)):
        m = matrices[:, :, layer] if per_token else matrices[:, None, layer]  # (B, T|1, N, N)
        if residual == "normalize":
            eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
            m = m + eye
            m = m / m.sum(-1, keepdim=True)
            row = (row[..., None, :] @ m)[..., 0, :]
        else:
            row = row + (row[..., None, :] @ m)[..., 0, :]
    return trace.image_columns(row)


def pool_to_grid(values: torch.Tensor, grid: tuple[int, int], reduce: str = "sum") -> torch.Tensor:
    """Pool pixel values ``(..., H, W)`` onto the image-token grid: ``(..., h·w)`` (row-major).

    ``reduce="sum"`` keeps totals (attributions); ``"mean"`` averages (expectations). When ``H, W``
    are multiples of ``h, w`` (every LLaVA: each token is one patch) the pooling is exact per patch,
    else adaptive average pooling is used.
    """
    h, w = grid
    big_h, big_w = values.shape[-2:]
    lead = values.shape[:-2]
    flat = values.reshape(-1, 1, big_h, big_w)
    pooled = torch.nn.functional.adaptive_avg_pool2d(flat, (h, w))
    if reduce == "sum":
        pooled = pooled * (big_h * big_w / (h * w))
    return pooled.reshape(*lead, h * w)
