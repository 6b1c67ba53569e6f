"""Filler-word filtering metric (paper section 4, "Filler-words Filtering Evaluation"; appendix L)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from metrics import functional as MF
from metrics.base import SampleMeanMetric


class FillerSNR(SampleMeanMetric):
    """Mean filler SNR in dB: content words' mean share of the sequence map over filler words'.

    Scored on words: PascalVOC-QA labels words content or filler, so :class:`dexar.pipeline.evaluation.Evaluator`
    feeds each explanation's words (:attr:`dexar.Explanation.word_weights`, ``word_maps``: ``potted`` is
    one content word, not the pieces ``p`` + ``otted``); with a word-level tokenizer a word is a token.
    A word's share is ``λ_w · Σ_pixels E_w`` (its weight, the max λ of its pieces, times the mass of its
    min-max map, as a token enters eq. 6). See :func:`metrics.functional.filler_snr` for the reading
    (decibels, floor) and its evidence; samples without content or filler words, or with all shares zero,
    are skipped and counted.

    Args:
        eps: Floor of both mean shares relative to the peak share (caps a perfect filter at
            ``10·log10(1 / eps)``, 156.5 dB by default).
        decibels: Per-sample values in dB (default, the paper's scale) or as plain ratios.

    """

    input_kind = "filler"
    higher_is_better = True
    plot_lower_bound = None  # decibels take either sign

    def __init__(self, eps: float = MF.DEFAULT_FILLER_EPS, decibels: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.decibels = decibels

    def update(
        self,
        token_weights: torch.Tensor | Sequence[torch.Tensor],
        content_mask: torch.Tensor | Sequence[torch.Tensor],
        map_mass: torch.Tensor | Sequence[torch.Tensor],
        valid: torch.Tensor | None = None,
    ) -> None:
        """Lists of ``(T_i,)`` weights, content flags and map masses, or padded ``(N, T)`` with ``valid``."""
        self._add_values(MF.filler_snr(token_weights, content_mask, map_mass, valid, self.eps, self.decibels))
