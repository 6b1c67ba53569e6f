"""Filler-word filtering metric (paper section 4, "Filler-words Filtering Evaluation")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from metrics import functional as MF
from metrics.base import SampleMeanMetric


class FillerSNR(SampleMeanMetric):
    """Mean filler SNR: mean λ over content tokens over mean λ over filler tokens.

    See :func:`metrics.functional.filler_snr`; samples without content or filler tokens, or with all
    weights zero, are skipped and counted.

    Args:
        eps: Floor of the filler mean relative to the peak weight (caps a perfect filter at ``1 / eps``).

    """

    input_kind = "filler"
    higher_is_better = True

    def __init__(self, eps: float = MF.DEFAULT_SNR_EPS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eps = eps

    def update(
        self,
        token_weights: torch.Tensor | Sequence[torch.Tensor],
        content_mask: torch.Tensor | Sequence[torch.Tensor],
        valid: torch.Tensor | None = None,
    ) -> None:
        """Lists of ``(T_i,)`` weights and content flags, or padded ``(N, T)`` tensors with ``valid``."""
        self._add_values(MF.filler_snr(token_weights, content_mask, valid, self.eps))
