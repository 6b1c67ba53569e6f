"""Qwen2-VL / Qwen2.5-VL adapter: per-image dynamic grids, M-RoPE untouched, exact one-pass trace."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from dexar.adapters import get_adapter
from dexar.adapters.qwen2_vl import Qwen2VLAdapter
from dexar.methods.base import finish
from dexar.testing.adapter_checks import AdapterConformance, make_batch
from dexar.testing.qwen2_vl import random_qwen2_vl

# 64×64 pixels fit max_side² as they are; 96×64 is shrunk to 64×48 (dynamic resolution, 3×4 tokens)
SIZES = [(64, 64), (96, 64), (64, 64)]


@pytest.fixture(scope="module", params=["2", "2.5"])
def qwen(request):
    return random_qwen2_vl(request.param, seed=3)


@pytest.fixture(scope="module")
def qwen_samples(samples):
    """Shapes samples resized to different sizes: the image-token grid differs per sample."""
    return [replace(s, image=s.image.resize(size)) for s, size in zip(samples[: len(SIZES)], SIZES, strict=True)]


class TestConformance(AdapterConformance):
    """The suite every family runs; samples 0 and 2 share a 4×4 grid, sample 1 has another (3×4)."""

    adapter_cls = Qwen2VLAdapter
    exact_lengths = (5, 2)
    methods_lengths = (4, 2)
    grid = (4, 4)
    distinct_grid_keys = 2

    @pytest.fixture
    def vlm(self, qwen):
        return qwen

    @pytest.fixture
    def family_samples(self, qwen_samples):
        return qwen_samples


def test_mixed_grids_in_one_batch_are_refused(qwen, qwen_samples):
    model, processor = qwen
    adapter = get_adapter(model, processor)
    with pytest.raises(ValueError, match="grid_key"):
        make_batch(adapter, qwen_samples[:2], [2, 2])


def test_grid_and_positions_follow_image_grid_thw(qwen, qwen_samples):
    model, processor = qwen
    adapter = get_adapter(model, processor)
    batch = make_batch(adapter, [qwen_samples[1]], [3])
    (t, gh, gw) = batch.inputs["image_grid_thw"][0].tolist()
    merge = model.config.vision_config.spatial_merge_size
    assert batch.image_grid == (gh // merge, gw // merge) == (3, 4)
    assert "position_ids" not in batch.inputs  # the model computes its own M-RoPE ids
    # the model's 3-D positions of the image tokens are (row, col) of the merged grid
    positions, _ = model.model.get_rope_index(
        batch.inputs["input_ids"],
        mm_token_type_ids=batch.inputs["mm_token_type_ids"],
        image_grid_thw=batch.inputs["image_grid_thw"],
        attention_mask=batch.inputs["attention_mask"],
    )
    image = batch.inputs["input_ids"][0] == adapter.image_token_id
    rows, cols = positions[1, 0, image], positions[2, 0, image]
    cells = torch.arange(gh * gw // merge**2)
    assert torch.equal(rows - rows.min(), cells // (gw // merge))
    assert torch.equal(cols - cols.min(), cells % (gw // merge))


@pytest.mark.parametrize("scale", [1, 2])
def test_marked_region_lands_in_its_cell(qwen, scale):
    """A region marked in the original image moves the image token of its map cell.

    The vision tower's attention is switched off (zero output projection) so each LLM image token
    depends on its own ``merge × merge`` patches only; the token whose input embedding moves must be
    the one that the explanation grid places over the marked region of the original image. At
    ``scale=2`` the image is shrunk 2× by the processor (resampling bleeds a little into the
    neighbouring cells: the marked cell must dominate); at ``scale=1`` it is used as is (only it moves).
    """
    model, processor = qwen
    adapter = get_adapter(model, processor)
    cell = 16 * scale  # a 3×4 grid of 16×16 resized pixels
    height, width = 3 * cell, 4 * cell
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    marked = base.copy()
    row, col = 1, 2
    marked[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = 255
    zeroed = []
    for name, param in model.model.visual.named_parameters():
        if ".attn.proj." in name:
            zeroed.append((param, param.detach().clone()))
            param.data.zero_()
    try:
        embeds = []
        for pixels in (base, marked):
            batch = make_batch(adapter, [_sample(Image.fromarray(pixels))], [1])
            seen: list[torch.Tensor] = []

            def keep(module, args, kwargs, seen=seen):
                seen.append((args[0] if args else kwargs["hidden_states"]).detach())

            hook = adapter.decoder_layers[0].register_forward_pre_hook(keep, with_kwargs=True)
            try:
                with torch.no_grad():
                    adapter.backbone_forward(batch.inputs)
            finally:
                hook.remove()
            image = batch.inputs["input_ids"][0] == adapter.image_token_id
            embeds.append(seen[0][0, image])
    finally:
        for param, value in zeroed:
            param.data.copy_(value)
    change = (embeds[1] - embeds[0]).norm(dim=-1)  # (V,) in sequence order
    others = change.sort(descending=True).values[1]
    assert others == 0 if scale == 1 else others < change.max() / 5
    # through the same reshape as every method's output
    trace_like = _TraceLike(batch, change)
    out = finish(trace_like, change.view(1, 1, -1), torch.ones(1, 1, dtype=change.dtype))
    assert out.token_maps.shape == (1, 1, 3, 4)
    assert divmod(int(out.token_maps[0, 0].argmax()), 4) == (row, col)


def test_pixel_view_round_trip(qwen, qwen_samples):
    model, processor = qwen
    adapter = get_adapter(model, processor)
    batch = make_batch(adapter, qwen_samples[:1] + qwen_samples[2:], [2, 2])
    view = adapter.pixel_view(batch, 1)
    assert view.shape == (3, 64, 64)
    patches = batch.inputs["pixel_values"][batch.patch_span(1)]
    assert torch.equal(adapter.view_to_patches(view[None]), patches)


def _sample(image):
    from dexar.schema import Sample

    return Sample(id="marked", image=image, prompt="describe the image .", answer="i see a red circle")


class _TraceLike:
    """The two fields :func:`finish` reads: the batch (grid, cell map) and the answer mask."""

    def __init__(self, batch, values):
        self.batch = batch
        self.grid = batch.image_grid
        self.answer_mask = torch.ones(1, 1, dtype=torch.bool)


def test_perturbation_metrics_are_refused_at_setup(qwen):
    from dexar.adapters.base import DexarInputError
    from dexar.pipeline.evaluation import Evaluator
    from metrics import PerturbationAUC

    adapter = get_adapter(*qwen)
    with pytest.raises(DexarInputError, match="perturbation metrics are not supported for Qwen2VLAdapter"):
        Evaluator(adapter, {"dexar": {"pos_auc": PerturbationAUC()}})
