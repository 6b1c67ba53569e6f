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
    quantize_map,
    rank_pixels,
    replacement_value,
    to_uint8,
    upsample_map,
    webp_size,
)
from metrics import functional as MF


def reference_levels(heatmap, levels=256):
    """The map's quantization levels, the slow way: min-max, × (levels − 1), round half to even."""
    flat = [float(v) for v in heatmap.reshape(-1).tolist()]
    lo, hi = min(flat), max(flat)
    return [0 if hi == lo else round((v - lo) / (hi - lo) * (levels - 1)) for v in flat]


def reference_order(heatmap):
    """Pixel indices by (−level, index): the stable descending order of the quantized map, the slow way."""
    flat = reference_levels(heatmap)
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


def test_maps_are_quantized_then_upsampled_bilinearly_before_ranking(pixels):
    g = torch.Generator().manual_seed(4)
    small = torch.rand(3, 5, generator=g)
    up = F.interpolate(small.double()[None, None], size=(12, 10), mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(upsample_map(small, (12, 10)), up)  # float64, whatever the map's dtype
    assert quantize_map(small).tolist() == torch.tensor(reference_levels(small)).view(3, 5).tolist()
    levels_up = upsample_map(quantize_map(small), (12, 10))
    assert torch.equal(rank_pixels(small, (12, 10)), pixel_order(levels_up))
    assert torch.equal(rank_pixels(small, (12, 10), levels=None), pixel_order(up))
    assert torch.equal(perturb(pixels, small, [0.2, 0.6]), perturb(pixels, levels_up, [0.2, 0.6], rank_levels=None))


def test_quantize_map_hand_cases():
    values = torch.tensor([[2.0, 3.0, 4.0], [2.0 + 2 * 0.49 / 255, 2.0 + 2 * 0.51 / 255, 2.0 + 2 * 127.5 / 255]])
    assert quantize_map(values).tolist() == [[0.0, 128.0, 255.0], [0.0, 1.0, 128.0]]  # 127.5: half to even
    assert quantize_map(values, levels=3).tolist() == [[0.0, 1.0, 2.0], [0.0, 0.0, 1.0]]
    assert quantize_map(torch.full((2, 2), 7.0)).tolist() == [[0.0, 0.0], [0.0, 0.0]]  # constant: row-major order
    assert quantize_map(torch.tensor([[1.0, 3.0]]), levels=256).dtype == torch.float64
    with pytest.raises(ValueError, match="at least 2"):
        quantize_map(values, levels=1)


def test_pixel_order_ignores_float_noise_of_a_batch():
    """A 1-ulp change of a token (what padding does to a map) leaves the perturbation order as it was.

    The clean map is symmetric, so pixels mirrored across its diagonal tie exactly and go in row-major
    order; nudging the lower-left token up by one float32 ulp makes its side strictly larger. The
    unquantized order follows the noise; the quantized one does not.
    """
    clean = torch.tensor([[0.25, 0.75], [0.75, 0.25]])
    noisy = clean.clone()
    noisy[1, 0] = torch.nextafter(noisy[1, 0], torch.tensor(1.0))
    assert not torch.equal(rank_pixels(noisy, (8, 8), levels=None), rank_pixels(clean, (8, 8), levels=None))
    assert torch.equal(rank_pixels(noisy, (8, 8)), rank_pixels(clean, (8, 8)))


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
    for mode in ("deletion", "insertion"):  # normalized between their end images: both must be on the grid
        with pytest.raises(ValueError, match=f"{mode} levels must start at 0 and end at 1"):
            perturbation_curves(adapter, pv, prompt_ids, answer_ids, heatmap, [mode], [0.0, 0.5, 0.9])
    with pytest.raises(ValueError, match="at least one token"):
        answer_perplexity(adapter, prompt_ids, [], pv[None])
    with pytest.raises(ValueError, match="NaN"):
        perturb(pv, torch.full((4, 4), math.nan), [0.5])


@pytest.mark.skipif(not (Path(SHAPES_CHECKPOINT) / "model.safetensors").exists(), reason="no bundled checkpoint")
def test_oracle_mask_beats_its_inverse_on_shapes(samples):
    """On the bundled model, a map equal to the objects' mask beats its inverse on every perturbation metric.

    Positive test and deletion: higher is better; insertion: lower is better. Deletion and insertion
    lie in [0, 1] (normalized between their end images) while the positive test does not.
    """
    from dexar import load_model

    model, processor = load_model(SHAPES_CHECKPOINT, dtype="float32")
    adapter = get_adapter(model, processor)
    modes = ("positive", "deletion", "insertion")
    aucs = {"oracle": {m: [] for m in modes}, "inverse": {m: [] for m in modes}}
    for sample in samples:
        prompt_ids, inputs = adapter.encode_prompts([sample.image], [sample.prompt])
        answer_ids = adapter.tokenize_answer(sample.answer)
        mask = torch.from_numpy(view_mask(sample.union_mask)).double()  # the pixels the model sees
        for name, heatmap in (("oracle", mask), ("inverse", 1 - mask)):
            curves = perturbation_curves(adapter, inputs["pixel_values"][0], prompt_ids[0], answer_ids, heatmap, modes)
            aucs[name]["positive"].append(MF.perturbation_auc(curves["positive"].nppl, DEFAULT_LEVELS["positive"]))
            aucs[name]["deletion"].append(MF.deletion_auc(curves["deletion"].ppl, DEFAULT_LEVELS["deletion"]))
            aucs[name]["insertion"].append(MF.insertion_auc(curves["insertion"].ppl, DEFAULT_LEVELS["insertion"]))
    values = {name: {m: torch.cat(v) for m, v in by_mode.items()} for name, by_mode in aucs.items()}
    for mode in ("deletion", "insertion"):
        # the end images do not depend on the map, so both maps skip the same samples (sample 0's blurred
        # image has a lower perplexity than the original: no recovery to measure)
        defined = values["oracle"][mode].isfinite()
        assert torch.equal(defined, values["inverse"][mode].isfinite()) and int(defined.sum()) >= 3, mode
        for name in values:
            kept = values[name][mode][defined]
            assert (kept >= 0).all() and (kept <= 1).all(), (name, mode, kept)
            values[name][mode] = kept
    oracle, inverse = ({m: float(v.mean()) for m, v in values[k].items()} for k in ("oracle", "inverse"))
    assert oracle["positive"] > inverse["positive"] and oracle["positive"] > 1  # not on the [0, 1] scale
    assert oracle["deletion"] > inverse["deletion"], (oracle, inverse)
    assert oracle["insertion"] < inverse["insertion"], (oracle, inverse)
