"""LLaVA adapter (LLaVA-1.5, BakLLaVA, the bundled Shapes model): the conformance suite every family runs."""

from __future__ import annotations

import pytest

from dexar.adapters import LlavaAdapter
from tests.adapter_checks import AdapterConformance


class TestConformance(AdapterConformance):
    """Shapes samples on the session's float64 tiny LLaVA (GQA, 4×4 grid): one layout for every image."""

    adapter_cls = LlavaAdapter
    exact_lengths = (5, 2)
    methods_lengths = (4, 2)
    grid = (4, 4)
    distinct_grid_keys = 1

    @pytest.fixture
    def vlm(self, tiny64):
        return tiny64

    @pytest.fixture
    def family_samples(self, samples):
        return samples[:3]
