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


class _EndNormalizedAUC(CurveMeanMetric):
    """Mean AUC of a perplexity curve normalized between its two end images (appendix F.1).

    The mean curve (:meth:`mean_curve`) is the mean of the same normalized curves over the samples the
    mean AUC counts, so its trapezoidal area equals the metric's value. Samples whose ends do not
    define a curve (see :func:`metrics.functional.normalize_between_ends`) are skipped and counted.

    Args:
        levels: The level grid, from 0 to 1 (both end images are on every curve).

    """

    plot_upper_bound = 1.0
    _mode = ""

    def __init__(self, levels: Sequence[float] = FULL_LEVELS, **kwargs: Any) -> None:
        super().__init__(levels, ("curve_total",), **kwargs)
        if float(self.levels[0]) != 0.0 or float(self.levels[-1]) != 1.0:
            raise ValueError(
                f"{self._mode} levels must start at 0 and end at 1 (the curve is normalized between its two end "
                f"images), got {self.levels.tolist()}"
            )

    def _curve(self, ppl: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, ppl: torch.Tensor) -> None:
        """``(N, L)`` (or ``(L,)``) perplexities on the metric's levels, both end images included."""
        curve = self._curve(ppl)
        self._add_curves(MF.perturbation_auc(curve, self.levels), curve_total=curve)

    def mean_curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(levels, mean normalized perplexity per level)`` over valid samples, across processes."""
        return self.levels, self._mean_curves()[0]


class DeletionAUC(_EndNormalizedAUC):
    """Mean deletion AUC in [0, 1] (:func:`metrics.functional.deletion_auc`); higher is better.

    The curve rises from 0 (original image) to 1 (every pixel replaced by the dataset mean).
    """

    input_kind = "perturbation:deletion"
    higher_is_better = True
    _mode = "deletion"

    def _curve(self, ppl: torch.Tensor) -> torch.Tensor:
        return MF.deletion_curve(ppl, self.levels)


class InsertionAUC(_EndNormalizedAUC):
    """Mean insertion AUC in [0, 1] (:func:`metrics.functional.insertion_auc`); lower is better.

    The curve falls from 1 (fully blurred image) to 0 (original image).
    """

    input_kind = "perturbation:insertion"
    higher_is_better = False
    _mode = "insertion"

    def _curve(self, ppl: torch.Tensor) -> torch.Tensor:
        return MF.insertion_curve(ppl, self.levels)


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
