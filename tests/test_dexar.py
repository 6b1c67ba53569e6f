"""DEX-AR maps, weights and every ablation switch against loop-by-loop references (float64)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dexar.adapters import get_adapter
from dexar.explain import Explainer
from dexar.methods import HEAD_FILTERS, DexAR
from dexar.reference import naive_dexar, naive_layer_grads
from dexar.testing import random_llava
from dexar.trace import run as run_trace


def _trace(model, processor, samples, lengths):
    adapter = get_adapter(model, processor)
    answers = [adapter.tokenize_answer(s.answer)[:n] for s, n in zip(samples, lengths, strict=True)]
    prompt_ids, image_inputs = adapter.encode_prompts([s.image for s in samples], [s.prompt for s in samples])
    batch = adapter.build_batch(prompt_ids, answers, image_inputs)
    return adapter, batch, run_trace(adapter, batch)


def _columns(batch, adapter, b):
    """Image positions and per-token text positions of sample b in its unpadded sequence."""
    inputs = batch.sample_inputs(b)
    ids = inputs["input_ids"][0]
    n, length = len(ids), int(batch.answer_lengths[b])
    image = torch.nonzero(ids == adapter.image_token_id)[:, 0]
    text = [[j for j in range(n - length + t) if ids[j] != adapter.image_token_id] for t in range(length)]
    return image, text


@pytest.mark.parametrize("relu,filler", [(True, True), (False, True), (True, False), (False, False)])
def test_dexar_equals_naive_reference(tiny64, samples, relu, filler):
    model, processor = tiny64
    adapter, batch, trace = _trace(model, processor, samples[:3], [9, 1, 5])
    out = DexAR(relu=relu, filler_filter=filler)(trace)
    for b in range(3):
        grads, _ = naive_layer_grads(adapter, batch, b)
        image, text = _columns(batch, adapter, b)
        maps, weights, seq = naive_dexar(grads, image, text, trace.grid, relu=relu, filler_filter=filler)
        length = maps.shape[0]
        assert (out.token_maps[b, -length:] - maps).abs().max() <= 1e-10
        assert (out.token_weights[b, -length:] - weights).abs().max() <= 1e-10
        assert (out.sequence_map[b] - seq).abs().max() <= 1e-10
        assert maps.abs().max() > 0


@pytest.fixture(scope="module")
def tiny64_grid8():
    """float64 random LLaVA with an 8×8 grid: 64 image columns, so top-0.05 (4 values) is not max (1)."""
    return random_llava(hidden=32, layers=3, heads=4, kv_heads=2, grid=8, dtype=torch.float64, seed=0)


@pytest.mark.parametrize("head_filter", ["max", "none", "avg", "top-0.05", "top-0.3", "top-0.9"])
@pytest.mark.parametrize("layers", ["all", "last"])
def test_head_filters_and_layers_equal_naive_reference(tiny64_grid8, samples, head_filter, layers):
    """Maps, λ_t (with the head filter's aggregation) and sequence map against the float64 loops."""
    model, processor = tiny64_grid8
    adapter, batch, trace = _trace(model, processor, samples[:2], [9, 6])
    out = DexAR(head_filter=head_filter, layers=layers)(trace)
    peak = 0.0
    for b in range(2):
        grads, _ = naive_layer_grads(adapter, batch, b)
        image, text = _columns(batch, adapter, b)
        maps, weights, seq = naive_dexar(grads, image, text, trace.grid, head_filter=head_filter, layers=layers)
        length = maps.shape[0]
        assert (out.token_maps[b, -length:] - maps).abs().max() <= 1e-10
        assert (out.token_weights[b, -length:] - weights).abs().max() <= 1e-10
        assert (out.sequence_map[b] - seq).abs().max() <= 1e-10
        peak = max(peak, float(weights.max()))
    assert peak > 0  # some λ_t is not clipped to 0: the comparison is not of zeros


def test_table8_head_filters_give_different_token_weights(tiny64_grid8, samples):
    """Appendix L's rows (max, avg, top-p) must not share λ: the strategy reaches the token weight."""
    model, processor = tiny64_grid8
    _, _, trace = _trace(model, processor, samples[:2], [9, 6])
    filters = ["max", "avg", "top-0.05", "top-0.1", "top-0.3", "top-0.5", "top-0.9"]
    weights = {f: DexAR(head_filter=f)(trace).token_weights for f in filters}
    assert torch.equal(DexAR(head_filter="none")(trace).token_weights, weights["max"])  # none keeps max for λ
    for i, a in enumerate(filters):
        for b in filters[i + 1 :]:
            assert not torch.allclose(weights[a], weights[b]), (a, b)


def test_every_paper_head_filter_is_accepted():
    assert {"max", "avg", "none", "top-0.05", "top-0.1", "top-0.5", "top-0.9"} <= set(HEAD_FILTERS)
    for name in HEAD_FILTERS:
        DexAR(head_filter=name)
    for bad in ("top-0", "top-1.5", "median", "top-x"):
        with pytest.raises(ValueError):
            DexAR(head_filter=bad)
    with pytest.raises(ValueError):
        DexAR(layers="first")


def test_no_visual_evidence_gives_zero_maps_and_flags(tiny64, samples):
    model, processor = tiny64
    _, _, trace = _trace(model, processor, samples[:2], [4, 2])
    zeroed = trace.grads.clone()
    image_cols = trace.image_index[:, None, None, None, :].expand(*zeroed.shape[:-1], trace.image_index.shape[1])
    zeroed.scatter_(-1, image_cols, 0.0)
    out = DexAR()(replace(trace, grads=zeroed))
    assert torch.isfinite(out.token_maps).all() and torch.isfinite(out.sequence_map).all()
    assert out.token_maps.abs().max() == 0 and out.sequence_map.abs().max() == 0
    assert out.token_empty[trace.answer_mask].all() and out.sequence_empty.all()
    assert out.token_weights.abs().max() == 0  # λ_t = ReLU(0 − m_T) = 0


def test_token_weight_zero_but_maps_present_flags_only_sequence(tiny64, samples):
    model, processor = tiny64
    _, _, trace = _trace(model, processor, samples[:1], [3])
    big = trace.grads.clone()
    big[..., trace.text_mask[0][-3:].nonzero()[:, 1].unique()] += 1e6  # text dominates every head
    out = DexAR()(replace(trace, grads=big))
    assert out.token_weights.abs().max() == 0
    assert out.sequence_empty.all() and out.sequence_map.abs().max() == 0


def test_padded_batch_equals_one_by_one(tiny64, samples):
    model, processor = tiny64
    methods = {"dexar": DexAR(), "dexar_top": DexAR(head_filter="top-0.1", filler_filter=False)}
    explainer = Explainer(model, processor, methods)
    batch = samples[:3]
    together = explainer.explain_samples(batch)
    for i, sample in enumerate(batch):
        alone = explainer.explain_samples([sample])
        for name in methods:
            a, b = together[name][i], alone[name][0]
            assert a.tokens == b.tokens and a.token_ids == b.token_ids
            assert (a.token_maps - b.token_maps).abs().max() <= 1e-10
            assert (a.token_weights - b.token_weights).abs().max() <= 1e-10
            assert (a.sequence_map - b.sequence_map).abs().max() <= 1e-10
            assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])


def test_single_token_answer(tiny64, samples):
    model, processor = tiny64
    explainer = Explainer(model, processor)
    sample = replace(samples[0], answer="red")
    exp = explainer.explain_samples([sample])["dexar"][0]
    assert exp.tokens == ["red"] and exp.token_maps.shape == (1, 4, 4)
    assert torch.isfinite(exp.sequence_map).all()
