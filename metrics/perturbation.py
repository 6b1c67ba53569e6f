"""Perturbation metrics from answer perplexities (paper section 4 and appendix F).

Each class keeps the per-sample AUCs and the per-level mean curve over valid samples (for plots).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from metrics import functional as MF
from metrics.base import CurveMeanMetric

PERTURBATION_LEVELS = tuple(i / 10 for i in range(10))
"""The paper's grid of the positive/negative test: 0, 0.1, …, 0.9."""
FULL_LEVELS = tuple(i / 10 for i in range(11))
"""0, 0.1, …, 1.0: default grid of deletion, insertion and PIC."""


class PerturbationAUC(CurveMeanMetric):
    """Mean trapezoidal AUC of the normalized perplexity ``PPL(x_p) / PPL(x_0)`` over the levels.

    The positive test (top pixels removed): higher is better. :class:`NegativePerturbationAUC` is the
    same metric for the negative test. Uses :func:`metrics.functional.perturbation_auc`.

    Args:
        levels: The level grid of every curve.

    """

    input_kind = "perturbation:positive"
    higher_is_better = True

    def __init__(self, levels: Sequence[float] = PERTURBATION_LEVELS, **kwargs: Any) -> None:
        super().__init__(levels, ("nppl_total",), **kwargs)

    def update(self, nppl: torch.Tensor) -> None:
        """``(N, L)`` (or ``(L,)``) normalized perplexities on the metric's levels."""
        self._add_curves(MF.perturbation_auc(nppl, self.levels), nppl_total=nppl)

    def mean_curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(levels, mean NPPL per level)`` over valid samples, across processes."""
        return self.levels, self._mean_curves()[0]


class NegativePerturbationAUC(PerturbationAUC):
    """:class:`PerturbationAUC` of the negative test (bottom pixels removed): lower is better."""

    input_kind = "perturbation:negative"
    higher_is_better = False


class DeletionAUC(CurveMeanMetric):
    """Mean deletion AUC (:func:`metrics.functional.deletion_auc`); higher is better."""

    input_kind = "perturbation:deletion"
    higher_is_better = True

    def __init__(self, levels: Sequence[float] = FULL_LEVELS, **kwargs: Any) -> None:
        super().__init__(levels, ("nppl_total",), **kwargs)

    def update(self, ppl: torch.Tensor, ppl_original: torch.Tensor | None = None) -> None:
        """``(N, L)`` perplexities; ``ppl_original`` defaults to the level-0 column."""
        nppl = MF.deletion_curve(ppl, self.levels, ppl_original)
        self._add_curves(MF.perturbation_auc(nppl, self.levels), nppl_total=nppl)

    def mean_curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(levels, mean NPPL per level)`` over valid samples, across processes."""
        return self.levels, self._mean_curves()[0]


class InsertionAUC(CurveMeanMetric):
    """Mean insertion AUC (:func:`metrics.functional.insertion_auc`); lower is better."""

    input_kind = "perturbation:insertion"
    higher_is_better = False

    def __init__(self, levels: Sequence[float] = FULL_LEVELS, **kwargs: Any) -> None:
        super().__init__(levels, ("nppl_total",), **kwargs)

    def update(self, ppl: torch.Tensor, ppl_original: torch.Tensor | None = None) -> None:
        """``(N, L)`` perplexities; ``ppl_original`` defaults to the level-1 column."""
        nppl = MF.insertion_curve(ppl, self.levels, ppl_original)
        self._add_curves(MF.perturbation_auc(nppl, self.levels), nppl_total=nppl)

    def mean_curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(levels, mean NPPL per level)`` over valid samples, across processes."""
        return self.levels, self._mean_curves()[0]


class PICAUC(CurveMeanMetric):
    """Mean PIC-AUC (:func:`metrics.functional.pic_auc`); higher is better.

    Args:
        levels: The level grid (must start at 0, fully obscured, and end at 1, the original).
        monotone: Running maximum of the perplexity gain (as in the original PIC).

    """

    input_kind = "perturbation:pic"
    higher_is_better = True
    plot_upper_bound = 1.0

    def __init__(self, levels: Sequence[float] = FULL_LEVELS, monotone: bool = True, **kwargs: Any) -> None:
        super().__init__(levels, ("x_total", "y_total"), **kwargs)
        if float(self.levels[0]) != 0.0 or float(self.levels[-1]) != 1.0:
            raise ValueError("PIC levels must start at 0 (fully obscured image) and end at 1 (original image)")
        self.monotone = monotone

    def update(self, ppl: torch.Tensor, sizes: torch.Tensor) -> None:
        """``(N, L)`` perplexities and lossless-WebP sizes of the images revealed at each level."""
        x, y = MF.pic_curve(ppl, sizes, self.monotone)
        self._add_curves(MF.pic_auc(ppl, sizes, self.monotone), x_total=x, y_total=y)

    def mean_curve(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(levels, mean normalized size, mean normalized perplexity gain)`` per level, valid samples."""
        x, y = self._mean_curves()
        return self.levels, x, y
