"""Perturbation engine: exact pixel selection, blur, batched perplexity vs a one-image float64 loop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.shapes import view_mask
from dexar import SHAPES_CHECKPOINT
from dexar.adapters import get_adapter
from dexar.explain import explain
from dexar.perturbation import (
    DEFAULT_LEVELS,
    MODES,
    answer_perplexity,
    explanation_curves,
    gaussian_blur,
    perturb,
    perturbation_curve,
    perturbation_curves,
    pixel_order,
    replacement_value,
    to_uint8,
    upsample_map,
    webp_size,
)
from metrics import functional as MF


def reference_order(heatmap):
    """Pixel indices by (−value, index): the stable descending order, written the slow way."""
    flat = heatmap.reshape(-1).tolist()
    return sorted(range(len(flat)), key=lambda i: (-flat[i], i))


def replaced(images, value=0.0):
    """``(L, H·W)`` True where every channel equals the replacement value."""
    return (images == value).all(1).flatten(1)


@pytest.fixture(scope="module")
def pixels():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 12, 10, generator=g) + 0.1  # never exactly 0


def test_top_p_pixels_replaced_exactly_with_deterministic_ties(pixels):
    heatmap = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    assert pixel_order(heatmap).tolist() == [4, 0, 2, 1, 3, 5]
    small = pixels[:, :2, :3]
    images = perturb(small, heatmap, [0.0, 1 / 6, 0.5, 1.0], "positive")
    assert replaced(images).tolist() == [
        [False] * 6,
        [False, False, False, False, True, False],
        [True, False, True, False, True, False],
        [True] * 6,
    ]
    g = torch.Generator().manual_seed(1)
    heatmap = (torch.rand(12, 10, generator=g) * 5).floor()  # many ties
    order = reference_order(heatmap)
    levels = DEFAULT_LEVELS["deletion"] + (0.33, 0.05)
    for mode in ("positive", "deletion"):
        images = perturb(pixels, heatmap, levels, mode)
        for p, row in zip(levels, replaced(images), strict=True):
            k = round(p * 120)
            assert int(row.sum()) == k
            assert set(row.nonzero()[:, 0].tolist()) == set(order[:k])
            untouched = ~row.view(12, 10)
            assert torch.equal(images[levels.index(p)][:, untouched], pixels[:, untouched])


def test_negative_is_the_complement_order(pixels):
    g = torch.Generator().manual_seed(2)
    heatmap = (torch.rand(12, 10, generator=g) * 4).floor()
    order = reference_order(heatmap)
    levels = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    negative = replaced(perturb(pixels, heatmap, levels, "negative"))
    positive = replaced(perturb(pixels, heatmap, [1 - p for p in levels], "positive"))
    for p, neg, pos in zip(levels, negative, positive, strict=True):
        k = round(p * 120)
        assert set(neg.nonzero()[:, 0].tolist()) == set(order[120 - k :])
        assert torch.equal(neg, ~pos)


def test_insertion_and_pic_reveal_the_top_pixels(pixels):
    g = torch.Generator().manual_seed(3)
    heatmap = torch.rand(12, 10, generator=g)
    order = reference_order(heatmap)
    levels = [0.0, 0.3, 1.0]
    blurred = gaussian_blur(pixels, 2.0)
    insertion = perturb(pixels, heatmap, levels, "insertion", blur_sigma=2.0)
    assert torch.equal(insertion[0], blurred) and torch.equal(insertion[2], pixels)
    revealed = torch.zeros(120, dtype=torch.bool)
    revealed[order[:36]] = True
    revealed = revealed.view(12, 10)
    assert torch.equal(insertion[1], torch.where(revealed, pixels, blurred))
    mean = torch.tensor([0.5, -1.0, 2.0])
    pic = perturb(pixels, heatmap, levels, "pic", replacement=mean)
    obscured = mean[:, None, None].expand_as(pixels)
    assert torch.equal(pic[0], obscured) and torch.equal(pic[2], pixels)
    assert torch.equal(pic[1], torch.where(revealed, pixels, obscured))


def test_maps_are_upsampled_bilinearly_before_ranking(pixels):
    g = torch.Generator().manual_seed(4)
    small = torch.rand(3, 5, generator=g)
    up = F.interpolate(small[None, None], size=(12, 10), mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(upsample_map(small, (12, 10)), up)
    assert torch.equal(perturb(pixels, small, [0.2, 0.6]), perturb(pixels, up, [0.2, 0.6]))


def test_gaussian_blur_matches_a_direct_convolution():
    g = torch.Generator().manual_seed(5)
    image = torch.rand(2, 7, 9, generator=g, dtype=torch.float64)
    sigma = 1.3
    radius = math.ceil(3 * sigma)
    weights = [math.exp(-0.5 * (d / sigma) ** 2) for d in range(-radius, radius + 1)]
    total = sum(weights)
    expected = torch.zeros_like(image)
    for c in range(2):
        for y in range(7):
            for x in range(9):
                acc = 0.0
                for dy in range(-radius, radius + 1):
                    for dx in range(-radius, radius + 1):
                        yy, xx = min(max(y + dy, 0), 6), min(max(x + dx, 0), 8)  # replicate padding
                        acc += weights[dy + radius] * weights[dx + radius] * float(image[c, yy, xx])
                expected[c, y, x] = acc / total**2
    assert torch.allclose(gaussian_blur(image, sigma), expected, rtol=0, atol=1e-12)
    assert torch.equal(gaussian_blur(image, 0.0), image)
    flat = torch.full((3, 5, 6), 0.25, dtype=torch.float64)
    assert torch.allclose(gaussian_blur(flat, 4.0), flat, atol=1e-15)


def test_replacement_value_and_uint8_round_trip(tiny64):
    _, processor = tiny64
    ip = processor.image_processor
    rgb = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    pv = ip(images=Image.fromarray(rgb), return_tensors="pt")["pixel_values"][0]
    assert np.array_equal(to_uint8(pv, processor), rgb)
    assert torch.allclose(
        replacement_value(ip.image_mean, ip.image_mean, ip.image_std), torch.zeros(3, dtype=torch.float64)
    )
    assert webp_size(to_uint8(pv, processor)) == MF.webp_size(rgb)


# -- scoring -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny64, samples):
    model, processor = tiny64
    adapter = get_adapter(model, processor)
    sample = samples[1]
    prompt_ids, image_inputs = adapter.encode_prompts([sample.image], [sample.prompt])
    answer_ids = adapter.tokenize_answer(sample.answer)
    g = torch.Generator().manual_seed(6)
    heatmap = torch.rand(4, 4, generator=g, dtype=torch.float64)
    return adapter, sample, prompt_ids[0], answer_ids, image_inputs["pixel_values"][0], heatmap


def loop_perplexity(model, prompt_ids, answer_ids, image):
    """Reference: one image, a plain float64 forward over the whole sequence, full logits."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=image[None].double(), attention_mask=torch.ones_like(ids)).logits
    logp = logits[0].double().log_softmax(-1)
    n, t = ids.shape[1], len(answer_ids)
    nll = [-float(logp[n - t - 1 + i, answer_ids[i]]) for i in range(t)]
    return math.exp(sum(nll) / t)


def test_batched_perplexity_equals_one_image_loop(setup):
    adapter, _, prompt_ids, answer_ids, pv, heatmap = setup
    images = perturb(pv, heatmap, [0.0, 0.2, 0.5, 0.9], "positive")
    batched = answer_perplexity(adapter, prompt_ids, answer_ids, images, max_batch=None)
    expected = torch.tensor(
        [loop_perplexity(adapter.model, prompt_ids, answer_ids, im) for im in images], dtype=torch.float64
    )
    assert batched.dtype == torch.float64
    assert torch.allclose(batched, expected.double(), rtol=1e-10, atol=0)
    assert len(set(batched.tolist())) == 4  # the images really differ


def test_curves_equal_loop_reference_for_every_mode_and_chunking(setup):
    adapter, _, prompt_ids, answer_ids, pv, heatmap = setup
    levels = {"positive": [0.0, 0.3, 0.6], "negative": [0.0, 0.4], "insertion": [0.0, 0.5, 1.0], "pic": [0.0, 0.6, 1.0]}
    levels["deletion"] = [0.0, 0.3, 1.0]
    runs = [perturbation_curves(adapter, pv, prompt_ids, answer_ids, heatmap, MODES, levels, b) for b in (None, 1, 3)]
    original = loop_perplexity(adapter.model, prompt_ids, answer_ids, pv)
    for mode in MODES:
        images = perturb(pv, heatmap, levels[mode], mode)
        expected = torch.tensor(
            [loop_perplexity(adapter.model, prompt_ids, answer_ids, im) for im in images], dtype=torch.float64
        )
        for curves in runs:
            c = curves[mode]
            assert c.mode == mode and c.levels.tolist() == levels[mode]
            assert torch.allclose(c.ppl, expected.double(), rtol=1e-10, atol=0)
            assert math.isclose(c.ppl_original, original, rel_tol=1e-10)
            assert torch.allclose(c.nppl, c.ppl / original, rtol=1e-10)
        for curves in runs[1:]:  # chunking changes nothing
            assert torch.allclose(curves[mode].ppl, runs[0][mode].ppl, rtol=1e-12, atol=0)
    first = runs[0]
    # shared images are scored once: level 0 of removal and level 1 of reveal modes are the original
    assert first["positive"].ppl[0] == first["negative"].ppl[0] == first["pic"].ppl[2] == first["insertion"].ppl[2]
    assert first["positive"].ppl[0] == first["positive"].ppl_original and first["positive"].nppl[0] == 1.0
    assert first["pic"].ppl[1] == first["negative"].ppl[1]  # reveal top 60% over the mean = remove bottom 40%
    assert first["deletion"].ppl[1] == first["positive"].ppl[1]
    sizes = [webp_size(to_uint8(im, adapter.processor)) for im in perturb(pv, heatmap, levels["pic"], "pic")]
    assert first["pic"].webp_sizes.tolist() == sizes and sizes[0] < sizes[-1]
    assert first["positive"].webp_sizes is None


def test_curve_entry_points_agree(setup, tiny64):
    adapter, sample, prompt_ids, answer_ids, pv, heatmap = setup
    by_ids = perturbation_curve(adapter, pv, prompt_ids, answer_ids, heatmap, [0.0, 0.5], "negative", max_batch=2)
    by_text = perturbation_curve(adapter, sample.image, sample.prompt, sample.answer, heatmap, [0.0, 0.5], "negative")
    by_pixels = perturbation_curve(adapter, pv[None], sample.prompt, sample.answer, heatmap, [0.0, 0.5], "negative")
    assert torch.allclose(by_ids.ppl, by_text.ppl, rtol=1e-12) and torch.allclose(by_ids.ppl, by_pixels.ppl, rtol=1e-12)
    default = perturbation_curve(adapter, pv, prompt_ids, answer_ids, heatmap)
    assert default.levels.tolist() == list(DEFAULT_LEVELS["positive"])
    model, processor = tiny64
    exp = explain(model, processor, sample.image, sample.prompt, sample.answer)
    curves = explanation_curves(adapter, exp, ("positive",), [0.0, 0.5])
    direct = perturbation_curves(adapter, pv, prompt_ids, answer_ids, exp.sequence_map, ("positive",), [0.0, 0.5])
    assert torch.allclose(curves["positive"].ppl, direct["positive"].ppl, rtol=1e-12)


def test_invalid_arguments(setup):
    adapter, _, prompt_ids, answer_ids, pv, heatmap = setup
    with pytest.raises(ValueError, match="unknown perturbation mode"):
        perturb(pv, heatmap, [0.1], "blur")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        perturb(pv, heatmap, [1.5])
    with pytest.raises(ValueError, match="pic levels"):
        perturbation_curves(adapter, pv, prompt_ids, answer_ids, heatmap, ["pic"], [0.0, 0.5])
    with pytest.raises(ValueError, match="at least one token"):
        answer_perplexity(adapter, prompt_ids, [], pv[None])
    with pytest.raises(ValueError, match="NaN"):
        perturb(pv, torch.full((4, 4), math.nan), [0.5])


@pytest.mark.skipif(not (Path(SHAPES_CHECKPOINT) / "model.safetensors").exists(), reason="no bundled checkpoint")
def test_oracle_mask_beats_its_inverse_on_shapes(samples):
    from dexar import load_model

    model, processor = load_model(SHAPES_CHECKPOINT, dtype="float32")
    adapter = get_adapter(model, processor)
    oracle, inverse = [], []
    for sample in samples:
        prompt_ids, inputs = adapter.encode_prompts([sample.image], [sample.prompt])
        answer_ids = adapter.tokenize_answer(sample.answer)
        mask = torch.from_numpy(view_mask(sample.union_mask)).double()  # the pixels the model sees
        for heatmap, out in ((mask, oracle), (1 - mask, inverse)):
            curve = perturbation_curves(adapter, inputs["pixel_values"][0], prompt_ids[0], answer_ids, heatmap)
            out.append(curve["positive"].nppl)
    levels = DEFAULT_LEVELS["positive"]
    assert (
        MF.perturbation_auc(torch.stack(oracle), levels).mean()
        > MF.perturbation_auc(torch.stack(inverse), levels).mean()
    )
