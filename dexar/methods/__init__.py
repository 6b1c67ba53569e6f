"""Explanation methods, registered by name (``dexar explain --method NAME``, configs)."""

from __future__ import annotations

from typing import Any

from dexar.methods.attention import RawAttention
from dexar.methods.attngrad import AttnGrad
from dexar.methods.base import Method, MethodOutput, finish, minmax
from dexar.methods.chefercam import CheferCAM
from dexar.methods.dexar import HEAD_FILTERS, DexAR
from dexar.methods.gradcam import GradCAM
from dexar.methods.iia import IIA
from dexar.methods.integrated_gradients import IntegratedGradients
from dexar.methods.rise import Rise
from dexar.methods.rollout import Rollout
from dexar.methods.tam import TAM

METHODS: dict[str, type] = {
    cls.name: cls
    for cls in (
        DexAR,
        RawAttention,
        Rollout,
        GradCAM,
        CheferCAM,
        AttnGrad,
        IntegratedGradients,
        Rise,
        IIA,
        TAM,
    )
}


def build_method(name: str, **options: Any) -> Method:
    """Instantiate a registered method with its options.

    Raises:
        ValueError: Unknown method name (the message lists the registered ones).

    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name](**options)


__all__ = [
    "HEAD_FILTERS",
    "METHODS",
    "AttnGrad",
    "CheferCAM",
    "DexAR",
    "GradCAM",
    "IIA",
    "IntegratedGradients",
    "Method",
    "MethodOutput",
    "RawAttention",
    "Rise",
    "Rollout",
    "TAM",
    "build_method",
    "finish",
    "minmax",
]
