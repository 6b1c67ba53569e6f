"""Shared fixtures: tiny random LLaVA models (real transformers classes) and Shapes samples."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datamodules.shapes import make_shapes_sample  # noqa: E402
from dexar.testing.llava import random_llava  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny64():
    """float64 random LLaVA with grouped-query attention (4 heads, 2 KV heads), 4×4 image grid."""
    return random_llava(hidden=32, layers=3, heads=4, kv_heads=2, grid=4, dtype=torch.float64, seed=0)


@pytest.fixture(scope="session")
def samples():
    """Two 3-object captions (square, and 16:9 with its margins cropped), then two 1-object ones."""
    return [make_shapes_sample(i, "test") for i in (9, 3, 0, 6)]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random float32 LLaVA saved as an HF directory (safetensors + processor)."""
    model, processor = random_llava(hidden=32, layers=2, heads=4, grid=8, dtype=torch.float32, seed=1)
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)
