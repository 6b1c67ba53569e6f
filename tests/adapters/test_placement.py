"""Explanations placed on the pixels the model saw, end to end: explain → upsample / seen → metrics, overlays.

Each family explains 2:1 and 1:2 images with an object where a center crop would cut it away. The
families that crop (LLaVA-1.5 and the Shapes model: shortest edge + center crop; LLaVA-NeXT: the
sliver ``unpad_image`` trims) must give a zero map and ``seen`` False there; the others see the whole
image and keep the bilinear stretch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessorPil

import metrics as M
from dexar import SHAPES_CHECKPOINT, Explainer, load_model
from dexar.adapters import get_adapter
from dexar.labels import sample_token_labels
from dexar.methods import DexAR, RawAttention
from dexar.perturbation import upsample_map
from dexar.pipeline.evaluation import EvaluationSettings, Evaluator
from dexar.plotting import blend, overlay
from dexar.schema import Sample
from dexar.testing.florence2 import random_florence2
from dexar.testing.idefics3 import random_idefics3
from dexar.testing.llava import random_llava
from dexar.testing.llava_next import random_llava_next
from dexar.testing.paligemma import random_paligemma
from dexar.testing.qwen2_vl import random_qwen2_vl
from metrics import functional as MF

METHODS = {"dexar": DexAR(filler_filter=False), "attention": RawAttention()}


def scene(
    height: int, width: int, boxes: list[tuple[int, int, int, int]], seed: int = 0
) -> tuple[Image.Image, np.ndarray]:
    """A noisy grey image with red squares at ``boxes`` (top, left, bottom, right) and their masks."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(128, 30, size=(height, width, 3))
    masks = np.zeros((len(boxes), height, width), dtype=bool)
    for k, (top, left, bottom, right) in enumerate(boxes):
        pixels[top:bottom, left:right] = (220, 40, 40)
        masks[k, top:bottom, left:right] = True
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), masks


def explain(model, processor, image: Image.Image, prompt: str = "describe the image .", answer: str = "a red square"):
    sample = Sample("s", image, prompt, answer)
    return Explainer(model, processor, METHODS).explain_samples([sample])


def margin_of(size: tuple[int, int], short: int) -> tuple[slice, slice]:
    """The first quarter of the long side of an image whose central ``short × short`` square is kept."""
    height, width = size
    if width > height:
        return slice(None), slice(0, (width - short) // 2)
    return slice(0, (height - short) // 2), slice(None)


def assert_zero_outside_view(explanations, size, margin) -> None:
    for exps in explanations.values():
        exp = exps[0]
        up = exp.upsample(size)
        assert up.seen.shape == size and torch.equal(up.seen, exp.seen)
        assert not up.seen[margin].any()
        assert up.sequence_map[margin].abs().max() == 0 and up.token_maps[(slice(None), *margin)].abs().max() == 0
        assert up.sequence_map[up.seen].max() > 0  # the map is not trivially zero
        stretched = F.interpolate(exp.sequence_map[None, None].float(), size=size, mode="bilinear")[0, 0]
        assert stretched[margin].max() > 0  # what the stretch put on pixels the model never saw


@pytest.fixture(scope="module")
def llava15():
    """Tiny LLM on LLaVA-1.5's image geometry (336 px CLIP, patch 14, shortest edge 336 + center crop 336)."""
    model, processor = random_llava(hidden=32, layers=2, heads=2, grid=24, patch=14, dtype=torch.float64, seed=2)
    processor.image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    return model, processor


@pytest.mark.parametrize("size", [(336, 672), (672, 336)])
def test_llava15_maps_are_zero_on_the_cropped_margin(llava15, size):
    model, processor = llava15
    box = (150, 20, 190, 100) if size[1] > size[0] else (20, 150, 100, 190)  # in the cropped margin
    image, _ = scene(*size, [box])
    pixel_values = get_adapter(model, processor).encode_prompts([image], ["describe"])[1]["pixel_values"][0]
    red = torch.tensor([220, 40, 40]) / 255.0
    raw = pixel_values * torch.tensor(processor.image_processor.image_std)[:, None, None]
    raw = raw + torch.tensor(processor.image_processor.image_mean)[:, None, None]
    assert ((raw - red[:, None, None]).abs().amax(0) < 0.05).sum() == 0  # the model never sees the object
    explanations = explain(model, processor, image)
    assert_zero_outside_view(explanations, size, margin_of(size, 336))
    exp = explanations["dexar"][0]
    crop = [0.0, 168.0, 336.0, 504.0] if size[1] > size[0] else [168.0, 0.0, 504.0, 336.0]
    assert exp.to_dict()["geometry"]["seen_box"] == crop


def test_llava15_perturbation_ranks_the_same_map_on_the_view(llava15):
    """Perturbation stretches the grid over pixel_values (the crop): the same values as the placed map there."""
    model, processor = llava15
    image, _ = scene(336, 672, [(150, 200, 190, 260)])
    exp = explain(model, processor, image)["dexar"][0]
    on_view = upsample_map(exp.sequence_map, tuple(exp.inputs["pixel_values"].shape[-2:]))
    on_image = exp.upsample((336, 672)).sequence_map
    assert torch.allclose(on_view.double(), on_image[:, 168:504].double(), atol=1e-12)


@pytest.fixture(scope="module")
def shapes():
    return load_model(SHAPES_CHECKPOINT)


@pytest.mark.parametrize("size", [(64, 128), (128, 64)])
def test_shapes_model_maps_are_zero_on_the_cropped_margin(shapes, size):
    model, processor = shapes
    box = (24, 4, 40, 20) if size[1] > size[0] else (4, 24, 20, 40)
    image, _ = scene(*size, [box, (24, 54, 40, 70) if size[1] > size[0] else (54, 24, 70, 40)])
    assert_zero_outside_view(explain(model, processor, image), size, margin_of(size, 64))


@pytest.mark.parametrize("size", [(20, 64), (64, 20)])
def test_llava_next_maps_are_zero_on_the_trimmed_sliver(size):
    """Tiles of 32 px, 4×4 tokens: a 20-pixel side is padded by 6 px, unpad keeps tokens from canvas pixel 8."""
    model, processor = random_llava_next(seed=3)
    image, _ = scene(*size, [(0, 8, 2, 16) if size[1] > size[0] else (8, 0, 16, 2)])
    sliver = (slice(0, 2), slice(None)) if size[1] > size[0] else (slice(None), slice(0, 2))
    assert_zero_outside_view(explain(model, processor, image), size, sliver)


def whole_image_families():
    yield "paligemma", random_paligemma, "cap."
    yield "florence2", random_florence2, "<DETAILED_CAPTION>"
    yield "qwen2_vl", random_qwen2_vl, "describe the image ."
    yield "idefics3", random_idefics3, "describe the image ."


@pytest.mark.parametrize("family", list(whole_image_families()), ids=lambda f: f[0])
@pytest.mark.parametrize("size", [(32, 64), (64, 32)])
def test_whole_image_families_see_everything_and_keep_the_stretch(family, size):
    _, build, prompt = family
    model, processor = build()
    image, _ = scene(*size, [(4, 2, 12, 10)])
    sample = Sample("s", image, prompt, "a red square")
    exp = Explainer(model, processor, {"attention": RawAttention()}).explain_samples([sample])["attention"][0]
    up = exp.upsample(size)
    assert up.seen.all() and exp.seen.all()
    stretched = F.interpolate(exp.token_maps[:, None].double(), size=size, mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(up.token_maps.double(), stretched, atol=1e-6)


# -- metrics and overlays ------------------------------------------------------------------------------
def two_object_sample(size=(64, 128)) -> Sample:
    """Object 0 in the left margin (never seen by the Shapes model's center crop), object 1 in the crop."""
    image, masks = scene(*size, [(20, 4, 36, 20), (24, 50, 40, 74)])
    return Sample(
        "two",
        image,
        "describe the image .",
        "i see a red square and a red square",
        masks=masks,
        word_is_content=[False, False, False, True, True, False, False, True, True],
        word_mask_index=[-1, -1, -1, 0, 0, -1, -1, 1, 1],
    )


def test_localization_scores_seen_pixels_and_reports_the_unseen_mask(shapes):
    model, processor = shapes
    explainer = Explainer(model, processor, {"dexar": DexAR()})
    sample = two_object_sample()
    exp = explainer.explain_samples([sample])["dexar"][0]
    group = {
        "epg": M.EnergyPointingGame(),
        "iou": M.BestThresholdIoU(),
        "soft_iou": M.SoftIoU(),
        "mse": M.MaskMSE(),
        "unseen": M.UnseenMaskFraction(),
    }
    Evaluator(explainer.adapter, {"dexar": group}).update([sample], {"dexar": [exp]})
    seen = exp.seen
    assert seen.shape == (64, 128) and seen[:, 32:96].all() and not seen[:, :32].any() and not seen[:, 96:].any()
    union = torch.from_numpy(sample.union_mask)
    assert float(group["unseen"].compute()) == pytest.approx(16 * 16 / (16 * 16 + 16 * 24))
    placed = replace(exp, sequence_map=exp.sequence_map.double()).upsample((64, 128)).sequence_map[None]
    outside = ~seen[None]
    epg = float(MF.energy_pointing_game(placed, union[None]))  # a zero map outside the view: its energy is all seen
    assert float(group["epg"].compute()) == pytest.approx(epg, abs=1e-12)
    for name, fn in [("iou", MF.best_threshold_iou), ("soft_iou", MF.soft_iou), ("mse", MF.mask_mse)]:
        expected = float(fn(placed, union[None], outside))
        assert float(group[name].compute()) == pytest.approx(expected, abs=1e-12)
        naive = float(fn(placed, union[None]))  # scoring unseen pixels too: the object in the margin counts
        assert naive != pytest.approx(expected, abs=1e-6)


def test_token_localization_reports_each_objects_unseen_share(shapes):
    model, processor = shapes
    explainer = Explainer(model, processor, {"dexar": DexAR()})
    sample = two_object_sample()
    exp = explainer.explain_samples([sample])["dexar"][0]
    unseen = M.UnseenMaskFraction()
    Evaluator(explainer.adapter, {"dexar": {"unseen": unseen}}, EvaluationSettings("tokens")).update(
        [sample], {"dexar": [exp]}
    )
    # token localization is scored on words (issue 15.2): one value per content word, those of the first
    # "red square" (in the margin: all unseen), then the second's (in the crop), whatever the pieces
    labels = sample_token_labels(sample, processor.tokenizer, context=explainer.adapter.format_prompt(sample.prompt))
    pieces = [k for k in labels.mask_index if k >= 0]
    assert pieces == sorted(pieces) and set(pieces) == {0, 1} and pieces.count(0) == pieces.count(1)
    assert len(pieces) > 4  # the bundled tokenizer splits "square" (``▁squ`` + ``are``): words are not pieces
    assert unseen.per_sample().tolist() == [1.0, 1.0, 0.0, 0.0]


def test_evaluator_warns_once_when_no_metric_reports_the_unseen_mask(shapes, caplog):
    model, processor = shapes
    explainer = Explainer(model, processor, {"dexar": DexAR()})
    sample = two_object_sample()
    exp = explainer.explain_samples([sample])["dexar"][0]
    evaluator = Evaluator(explainer.adapter, {"dexar": {"epg": M.EnergyPointingGame()}})
    with caplog.at_level(logging.WARNING, logger="dexar.pipeline.evaluation"):
        evaluator.update([sample], {"dexar": [exp]})
        evaluator.update([sample], {"dexar": [exp]})
    warnings = [r for r in caplog.records if "outside the model's view" in r.getMessage()]
    assert len(warnings) == 1 and "40.0% of sample two" in warnings[0].getMessage()


def test_overlays_show_the_placed_map(shapes, tmp_path):
    """sequence.png and tokens.png: the margin the model never saw carries the zero colour."""
    model, processor = shapes
    sample = two_object_sample()
    exp = Explainer(model, processor, {"dexar": DexAR()}).explain_samples([sample])["dexar"][0]
    # maps falling from 1 (left) to 0 (right), so that stretching them over the whole image would colour the
    # left margin whatever the trained model's maps are
    ramp = torch.linspace(1.0, 0.0, exp.sequence_map.shape[-1]).expand_as(exp.sequence_map)
    exp = replace(exp, sequence_map=ramp.clone(), token_maps=ramp.expand_as(exp.token_maps).clone())
    exp.image = sample.image
    exp.save(tmp_path)
    saved = np.asarray(Image.open(tmp_path / "sequence.png").convert("RGB")).astype(int)
    zero = np.asarray(overlay(sample.image, torch.zeros(64, 128))).astype(int)
    stretched = np.asarray(overlay(sample.image, exp.sequence_map)).astype(int)
    left = (slice(0, 128), slice(0, 60))  # the overlay doubles images under 128 px: margin = columns < 64
    assert np.abs(saved[left] - zero[left]).max() <= 1
    assert np.abs(stretched[left] - zero[left]).max() > 10  # the stretch coloured it
    strip = np.asarray(Image.open(tmp_path / "tokens.png").convert("RGB")).astype(int)
    assert strip.shape[1] == 256 * len(exp.tokens)  # 128 px high panels at the image's 2:1 aspect ratio
    zeros = np.asarray(blend(sample.image.resize((256, 128), Image.BILINEAR), torch.zeros(128, 256))).astype(int)
    assert np.abs(strip[:128, :60] - zeros[:128, :60]).max() <= 1  # first token's panel: the unseen margin
    assert json.loads((tmp_path / "explanation.json").read_text())["geometry"]["seen_box"] == [0.0, 32.0, 64.0, 96.0]
