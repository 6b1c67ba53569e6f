"""Idefics3 / SmolVLM adapter: image splitting (tiles + global view) merged into one map, exact one-pass trace."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from dexar.adapters import get_adapter
from dexar.adapters.idefics3 import Idefics3Adapter
from dexar.testing.adapter_checks import AdapterConformance, image_embeddings, local_vision, make_batch
from dexar.testing.idefics3 import random_idefics3

# PIL sizes (width, height), resized to a longest edge of 64 px then cut into 32-px tiles:
# 64×40 → 2×2 tiles (8×8 map); 64×16 → 1×2 tiles (4×8 map)
SIZES = [(64, 40), (64, 16), (64, 40)]


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def idefics(request):
    return random_idefics3(request.param, seed=7)


@pytest.fixture(scope="module")
def tiled_samples(samples):
    return [replace(s, image=s.image.resize(size)) for s, size in zip(samples[: len(SIZES)], SIZES, strict=True)]


def test_prompt_matches_the_processor(idefics, tiled_samples):
    model, processor = idefics
    if not callable(processor):
        pytest.skip("SmolVLMProcessor needs torchvision (its video processor)")
    adapter = get_adapter(model, processor)
    ids, inputs = adapter.encode_prompts([tiled_samples[1].image], [tiled_samples[1].prompt])
    text = adapter.format_prompt(tiled_samples[1].prompt)
    enc = processor(images=[[tiled_samples[1].image]], text=[text], return_tensors="pt")
    assert enc["input_ids"][0].tolist() == ids[0]
    assert torch.equal(enc["pixel_values"], inputs["pixel_values"])


def test_cell_map_columns(idefics, tiled_samples):
    """Tile tokens: one cell each, weight 1, every cell covered once; global-view tokens: shares summing to 1."""
    model, processor = idefics
    adapter = get_adapter(model, processor)
    batch = make_batch(adapter, tiled_samples[1:2], [2])
    m = adapter.side
    assert batch.image_grid == (m, 2 * m)
    tiles, global_view = batch.cell_map[:, : 2 * m * m], batch.cell_map[:, 2 * m * m :]
    assert ((tiles == 1).sum(0) == 1).all() and ((tiles > 0).sum(0) == 1).all()
    assert (tiles.sum(1) == 1).all()
    assert torch.allclose(global_view.sum(0), torch.ones(m * m, dtype=torch.float64), atol=1e-12)


def test_marked_region_lands_in_its_cell(idefics):
    """Mark an 8×8 block of a 64×64 image (2×2 tiles, no resize): one tile token moves, at the block's cell."""
    model, processor = idefics
    adapter = get_adapter(model, processor)
    rng = np.random.default_rng(2)
    base = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    marked = base.copy()
    marked[40:48, 16:24] = 255  # cell (5, 2) of the 8×8 map
    with local_vision(model, "vision_model"):
        batch, before = image_embeddings(adapter, Image.fromarray(base))
        _, after = image_embeddings(adapter, Image.fromarray(marked))
    change = (after - before).norm(dim=-1)  # (V,) per image token, sequence order
    tile_tokens = 4 * adapter.side**2
    assert batch.image_grid == (8, 8)
    assert int((change[:tile_tokens] > 1e-9).sum()) == 1
    assert divmod(int((batch.cell_map @ change).argmax()), 8) == (5, 2)
    assert divmod(int((batch.cell_map[:, :tile_tokens] @ change[:tile_tokens]).argmax()), 8) == (5, 2)


class TestConformance(AdapterConformance):
    """The suite every family runs; samples 0 and 2 are 2×2 tiles (8×8 map), sample 1 is 1×2 tiles."""

    adapter_cls = Idefics3Adapter
    exact_lengths = (5, 2)
    methods_lengths = (3, 2)
    grid = (8, 8)

    @pytest.fixture
    def vlm(self, idefics):
        return idefics

    @pytest.fixture
    def family_samples(self, tiled_samples):
        return tiled_samples

    def check_grid_keys(self, adapter, samples):
        assert [adapter.grid_key(s.image) for s in samples] == [(2, 2), (1, 2), (2, 2)]
