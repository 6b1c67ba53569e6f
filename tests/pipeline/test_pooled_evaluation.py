"""The pooled evaluator gives the per-sample, per-method reference's values, and fails per (sample, method)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import metrics as M
from datamodules.shapes import make_shapes_sample
from dexar import SHAPES_CHECKPOINT, Explainer, load_model
from dexar.methods import build_method
from dexar.perturbation import perturb
from dexar.pipeline.evaluation import EvaluationSettings, Evaluator
from dexar.pipeline.pooled_perturbation import CurveRequest, _Pool, pooled_curves

BUNDLED = (Path(SHAPES_CHECKPOINT) / "model.safetensors").exists()


def demo_metrics() -> dict:
    return {
        "epg": M.EnergyPointingGame(),
        "filler_snr": M.FillerSNR(),
        "pos_auc": M.PerturbationAUC(),
        "neg_auc": M.NegativePerturbationAUC(),
        "insertion": M.InsertionAUC(),
        "deletion": M.DeletionAUC(),
        "pic": M.PICAUC(),
    }


@pytest.fixture(scope="module")
def bundled():
    if not BUNDLED:
        pytest.skip("no bundled checkpoint")
    model, processor = load_model(SHAPES_CHECKPOINT)
    explainer = Explainer(model, processor, {m: build_method(m) for m in ("dexar", "attention")})
    samples = [make_shapes_sample(i, "test") for i in range(6)]  # answers of 5, 9 and 13 tokens
    return explainer, samples, explainer.explain_samples(samples, "ground_truth", keep_images=False)


def _evaluate(explainer, samples, explanations, pooled: bool, max_batch: int = 16) -> dict:
    groups = {label: demo_metrics() for label in explanations}
    settings = EvaluationSettings("tokens", max_batch, pooled=pooled)
    Evaluator(explainer.adapter, groups, settings).update(samples, explanations)
    return groups


@pytest.mark.parametrize("max_batch", [16, 7])
def test_pooled_metrics_equal_the_reference_path(bundled, max_batch):
    explainer, samples, explanations = bundled
    reference = _evaluate(explainer, samples, explanations, pooled=False, max_batch=max_batch)
    pooled = _evaluate(explainer, samples, explanations, pooled=True, max_batch=max_batch)
    for label, group in reference.items():
        for name, metric in group.items():
            ref, new = metric.per_sample(), pooled[label][name].per_sample()
            assert ref.shape == new.shape and ref.numel() > 0, (label, name)
            assert torch.equal(ref.isnan(), new.isnan()), (label, name)
            assert torch.allclose(ref.nan_to_num(), new.nan_to_num(), rtol=0, atol=1e-6), (label, name, ref, new)
            if hasattr(metric, "mean_curve"):
                for a, b in zip(metric.mean_curve(), pooled[label][name].mean_curve(), strict=True):
                    assert torch.allclose(a, b, rtol=0, atol=1e-6), (label, name)


def test_pool_builds_the_reference_images(tiny64, samples):
    """Every distinct image of the pool is bitwise the image :func:`perturb` builds for its mode and level."""
    _, processor = tiny64
    pixel_values = processor(images=samples[0].image, text="<image>", return_tensors="pt")["pixel_values"][0]
    heatmap = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    levels = {"positive": [0.0, 0.3, 0.5], "negative": [0.2, 0.9], "insertion": [0.0, 0.4, 1.0], "pic": [0.0, 0.6, 1.0]}
    pool = _Pool(0.25, 2.0, 256)
    pool.add("a", CurveRequest("s", pixel_values, [1, 2], [3], heatmap, levels))
    pool.add("b", CurveRequest("s", pixel_values, [1, 2], [3], heatmap.flip(0), levels))
    _, slots_by_mode, _ = pool.entries["a"]
    for mode, grid in levels.items():
        expected = perturb(pixel_values, heatmap, grid, mode, replacement=0.25, blur_sigma=2.0)
        assert torch.equal(pool.build(slots_by_mode[mode]), expected), mode
    # the original and the fully obscured image are shared by both maps of the sample, the rest are not
    a = {s for slots in pool.entries["a"][1].values() for s in slots}
    b = {s for slots in pool.entries["b"][1].values() for s in slots}
    assert len(a & b) == 3  # original, all-mean, all-blurred


def test_a_bad_request_fails_alone(bundled):
    explainer, samples, explanations = bundled
    adapter = explainer.adapter
    exp = explanations["dexar"][0]
    prompt = adapter.explained_prompt_ids(exp.inputs, exp.answer_positions)
    answer = adapter.tokenize_answer(samples[0].answer)
    good = CurveRequest("s0", exp.inputs["pixel_values"], prompt, answer, exp.sequence_map, {"positive": [0.0, 0.5]})
    nan_map = CurveRequest("s0", exp.inputs["pixel_values"], prompt, answer, exp.sequence_map * torch.nan, good.levels)
    empty = CurveRequest("s1", exp.inputs["pixel_values"], prompt, [], exp.sequence_map, good.levels)
    out = pooled_curves(adapter, {"good": good, "nan": nan_map, "empty": empty})
    assert isinstance(out["nan"], ValueError) and "NaN" in str(out["nan"])
    assert isinstance(out["empty"], ValueError) and "at least one token" in str(out["empty"])
    assert out["good"]["positive"].ppl.shape == (2,)


def test_webp_sizes_are_the_same_inline_and_in_threads(bundled):
    """PIC's sizes: encoded in the main thread (the CPU default) or in a thread pool (accelerators)."""
    explainer, samples, explanations = bundled
    adapter = explainer.adapter
    requests = {}
    for i, exp in enumerate(explanations["dexar"][:2]):
        prompt = adapter.explained_prompt_ids(exp.inputs, exp.answer_positions)
        answer = adapter.tokenize_answer(samples[i].answer)
        levels = {"pic": [0.0, 0.3, 0.6, 1.0]}
        requests[i] = CurveRequest(i, exp.inputs["pixel_values"], prompt, answer, exp.sequence_map, levels)
    inline = pooled_curves(adapter, requests, workers=0)
    threaded = pooled_curves(adapter, requests, workers=2)
    for i in requests:
        sizes = inline[i]["pic"].webp_sizes
        assert sizes.shape == (4,) and bool((sizes > 0).all()) and sizes.unique().numel() > 1
        assert torch.equal(sizes, threaded[i]["pic"].webp_sizes)
        assert torch.equal(inline[i]["pic"].ppl, threaded[i]["pic"].ppl)
