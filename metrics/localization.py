"""Localization metrics against object masks (paper section 4, "Segmentation-based Evaluation").

Token-to-mask localization (``localization_target: tokens``) is defined on words: the evaluator scores
each content word's map (:attr:`dexar.Explanation.word_maps`) against the mask of the object it names.
"""

from __future__ import annotations

from typing import Any

import torch

from metrics import functional as MF
from metrics.base import SampleMeanMetric


class _LocalizationMetric(SampleMeanMetric):
    """``update(maps, masks, ignore=None, seen=None)`` with ``(N, H, W)`` maps ≥ 0 and bool masks.

    ``seen`` is the pixels the model saw (:attr:`dexar.Explanation.seen`); only seen, non-ignored
    pixels are scored (:func:`metrics.functional.outside_view`). :class:`UnseenMaskFraction` reports
    how much of each mask lies outside the view.
    """

    input_kind = "localization"

    plot_upper_bound: float | None = 1.0

    def _value(self, maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _values(
        self, maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None, seen: torch.Tensor | None
    ) -> torch.Tensor:
        return self._value(maps, masks, MF.outside_view(ignore, seen))

    def update(
        self,
        maps: torch.Tensor,
        masks: torch.Tensor,
        ignore: torch.Tensor | None = None,
        seen: torch.Tensor | None = None,
    ) -> None:
        """Score a batch of maps on the seen pixels; degenerate samples (NaN, see the functional docs) are skipped."""
        self._add_values(self._values(maps, masks, ignore, seen))


class UnseenMaskFraction(_LocalizationMetric):
    """Mean share of the mask the model never saw (:func:`metrics.functional.unseen_mask_fraction`).

    Not a score of the method (every method of one model gets the same values) but of the protocol:
    the other localization metrics score seen pixels only, and this says how much of the objects
    that leaves out, per sample (empty masks skipped).
    """

    higher_is_better = False
    reports_unseen_mask = True
    """Marks the metric that reports the mask outside the view (the evaluator warns when none does)."""

    def _values(
        self, maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None, seen: torch.Tensor | None
    ) -> torch.Tensor:
        return MF.unseen_mask_fraction(masks, seen, ignore)  # the maps are not used


class EnergyPointingGame(_LocalizationMetric):
    """Mean EPG ``Σ(E⊙M) / ΣE`` (:func:`metrics.functional.energy_pointing_game`); all-zero maps skipped."""

    higher_is_better = True

    def _value(self, maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor:
        return MF.energy_pointing_game(maps, masks, ignore)


class BestThresholdIoU(_LocalizationMetric):
    """Mean best-threshold IoU (:func:`metrics.functional.best_threshold_iou`).

    Args:
        num_thresholds: Equally spaced thresholds over each map's range (both ends included).

    """

    higher_is_better = True

    def __init__(self, num_thresholds: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_thresholds = num_thresholds

    def _value(self, maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor:
        return MF.best_threshold_iou(maps, masks, ignore, self.num_thresholds)


class SoftIoU(_LocalizationMetric):
    """Mean soft IoU ``Σ(E⊙M) / Σ(E + M − E⊙M)``, E min-max normalized (:func:`metrics.functional.soft_iou`)."""

    higher_is_better = True

    def _value(self, maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor:
        return MF.soft_iou(maps, masks, ignore)


class MaskSNR(_LocalizationMetric):
    """Mean mask SNR, mean E inside over mean E outside (:func:`metrics.functional.mask_snr`).

    Args:
        eps: Floor of the outside mean relative to the map's peak (caps a perfect map at ``1 / eps``).

    """

    higher_is_better = True
    plot_upper_bound = None

    def __init__(self, eps: float = MF.DEFAULT_SNR_EPS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eps = eps

    def _value(self, maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor:
        return MF.mask_snr(maps, masks, ignore, self.eps)


class MaskMSE(_LocalizationMetric):
    """Mean squared error between the min-max normalized map and the mask (:func:`metrics.functional.mask_mse`)."""

    higher_is_better = False

    def _value(self, maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor:
        return MF.mask_mse(maps, masks, ignore)
