"""Evaluation metrics: pure functions in :mod:`metrics.functional`, one torchmetrics class per metric."""

from metrics.base import CurveMeanMetric, SampleMeanMetric
from metrics.filler import FillerSNR
from metrics.localization import (
    BestThresholdIoU,
    EnergyPointingGame,
    MaskMSE,
    MaskSNR,
    SoftIoU,
    UnseenMaskFraction,
)
from metrics.perturbation import PICAUC, DeletionAUC, InsertionAUC, NegativePerturbationAUC, PerturbationAUC

__all__ = [
    "PICAUC",
    "BestThresholdIoU",
    "CurveMeanMetric",
    "DeletionAUC",
    "EnergyPointingGame",
    "FillerSNR",
    "InsertionAUC",
    "MaskMSE",
    "MaskSNR",
    "NegativePerturbationAUC",
    "PerturbationAUC",
    "SampleMeanMetric",
    "SoftIoU",
    "UnseenMaskFraction",
]
