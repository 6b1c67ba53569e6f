"""LLaVA-NeXT adapter: anyres tiles + global view merged into one full-image map, exact one-pass trace."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from dexar.adapters import get_adapter
from dexar.adapters.llava_next import LlavaNextAdapter
from dexar.testing.adapter_checks import AdapterConformance, image_embeddings, local_vision, make_batch
from dexar.testing.llava_next import random_llava_next

# PIL sizes (width, height): 64×40 → 2×2 tiles, padded top and bottom (6×8 map); 40×64 → 8×6 map
SIZES = [(64, 40), (40, 64), (64, 40)]


@pytest.fixture(scope="module")
def llava_next():
    return random_llava_next(seed=5)


@pytest.fixture(scope="module")
def next_samples(samples):
    return [replace(s, image=s.image.resize(size)) for s, size in zip(samples[: len(SIZES)], SIZES, strict=True)]


def test_cell_map_columns(llava_next, next_samples):
    """Tile tokens: one cell, weight 1; global-view tokens: shares summing to 1; newlines: nothing."""
    model, processor = llava_next
    adapter = get_adapter(model, processor)
    batch = make_batch(adapter, next_samples[:1], [2])
    layout = adapter.layout((40, 64))
    cell_map = batch.cell_map
    g = layout.side
    assert batch.image_grid == layout.grid == (6, 8)
    assert cell_map.shape == (6 * 8, len(layout.source))
    tiles, newlines = cell_map[:, g * g :], layout.source[g * g :] < 0
    assert (tiles[:, newlines] == 0).all()
    assert ((tiles[:, ~newlines] == 1).sum(0) == 1).all() and ((tiles[:, ~newlines] > 0).sum(0) == 1).all()
    assert (tiles[:, ~newlines].sum(1) == 1).all()  # every cell shows exactly one tile token
    assert torch.allclose(cell_map[:, : g * g].sum(0), torch.ones(g * g, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize(
    "size,box,cell",
    [
        ((64, 64), (40, 16), (5, 2)),  # 2×2 tiles, no resize, no padding: 8×8 px per cell
        (
            (64, 40),
            (20, 16),
            (3, 2),
        ),  # padded by 12 px top and bottom: image row 20 → canvas 32 → token row 4 → map row 3
    ],
)
def test_marked_region_lands_in_its_cell(llava_next, size, box, cell):
    """Mark an 8×8 block of the original image: exactly one tile token moves, and it is the merged map's cell."""
    model, processor = llava_next
    adapter = get_adapter(model, processor)
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    marked = base.copy()
    top, left = box
    marked[top : top + 8, left : left + 8] = 255
    with local_vision(model, "vision_tower"):
        batch, before = image_embeddings(adapter, Image.fromarray(base))
        _, after = image_embeddings(adapter, Image.fromarray(marked))
    change = (after - before).norm(dim=-1)  # (V,) per image token, sequence order
    g = adapter.side
    assert int((change[g * g :] > 1e-9).sum()) == 1  # one tile token (no resize of the tiles here)
    merged = (batch.cell_map @ change).view(batch.image_grid)
    assert divmod(int(merged.argmax()), batch.image_grid[1]) == cell
    tiles_only = (batch.cell_map[:, g * g :] @ change[g * g :]).view(batch.image_grid)
    assert divmod(int(tiles_only.argmax()), batch.image_grid[1]) == cell


class TestConformance(AdapterConformance):
    """The suite every family runs; samples 0 and 2 share a layout (6×8 map), sample 1 has another (8×6)."""

    adapter_cls = LlavaNextAdapter
    exact_lengths = (6, 2)
    methods_lengths = (4, 2)
    grid = (6, 8)
    distinct_grid_keys = 2

    @pytest.fixture
    def vlm(self, llava_next):
        return llava_next

    @pytest.fixture
    def family_samples(self, next_samples):
        return next_samples
