"""The hand-written backward of SwiGLU blocks (dexar.trace.tail) against autograd's re-run and the naive reference."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

from dexar.adapters import get_adapter
from dexar.testing.adapter_checks import make_batch
from dexar.testing.llava import random_llava
from dexar.testing.paligemma import random_paligemma
from dexar.testing.reference import naive_layer_grads
from dexar.trace import instrument, lens, tail
from dexar.trace import run as run_trace


def _rerun(adapter, batch, monkeypatch):
    """The trace with every layer re-run through autograd (no hand-written block backward)."""
    with monkeypatch.context() as patch:
        patch.setattr(instrument, "_block_backward", lambda *a, **k: None)
        return run_trace(adapter, batch)


def _forget(adapter):
    """Drop the verdicts cached for this model's modules (a test patches the norms' code)."""
    for layer in adapter.decoder_layers:
        tail.CHECKED.pop(layer, None)
    lens.FORMULA.pop(adapter.final_norm, None)


def _norm_in_own_precision(self, hidden_states):
    """LLaMA's RMS norm without its float32 round trip (so a float64 model is float64 throughout)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _norm_one_plus_w(self, hidden_states):
    """Gemma's RMS norm (scaling by ``1 + w``) under LLaMA's names: off the formula the checks accept."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return (1 + self.weight) * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_block_backward_equals_the_reference_in_float64(tiny64, samples, monkeypatch):
    """A float64 GQA LLaVA whose norms compute in float64, padded batch: ≤ 1e-10 from the naive reference."""
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _norm_in_own_precision)
    adapter = get_adapter(*tiny64)
    batch = make_batch(adapter, samples[:3], [9, 1, 5])
    _forget(adapter)
    try:
        fast = run_trace(adapter, batch)
        assert [tail.CHECKED[layer] for layer in adapter.decoder_layers] == [True] * len(adapter.decoder_layers)
        assert lens.FORMULA[adapter.final_norm]  # the lens' gradient is written out too
        slow = _rerun(adapter, batch, monkeypatch)
        for b in range(3):
            ref, _ = naive_layer_grads(adapter, batch, b)
            length = int(batch.answer_lengths[b])
            pad = int((batch.inputs["attention_mask"][b] == 0).sum())
            assert (fast.grads[b, :, :, -length:, pad:] - ref).abs().max() <= 1e-10
    finally:
        _forget(adapter)
    assert fast.grads.abs().max() > 1e-3
    assert (fast.grads - slow.grads).abs().max() <= 1e-12
    assert (fast.logit_lens - slow.logit_lens).abs().max() == 0
    assert fast.grads[1, :, :, :-1].abs().max() == 0  # padding slots


def test_float64_model_with_float32_norms_keeps_the_rerun(tiny64, samples):
    """LLaMA's norm rounds through float32: the rows miss the float64 formula, so the layer is re-run."""
    adapter = get_adapter(*tiny64)
    _forget(adapter)
    run_trace(adapter, make_batch(adapter, samples[:1], [4]))
    assert [tail.CHECKED[layer] for layer in adapter.decoder_layers] == [False] * len(adapter.decoder_layers)
    _forget(adapter)


@pytest.mark.parametrize("norm", ["stock", "one_plus_w"])
def test_lens_gradient_by_formula_equals_autograd(samples, monkeypatch, norm):
    """The lens' written-out gradient at padded float32 rows equals autograd's; a 1 + w norm is refused."""
    if norm == "one_plus_w":
        monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _norm_one_plus_w)
    model, processor = random_llava(hidden=64, layers=2, heads=4, kv_heads=2, grid=4, dtype=torch.float32, seed=5)
    adapter = get_adapter(model, processor)
    answer_ids = torch.tensor([[3, 7, 11, -1], [-1, -1, 5, 9]])
    rows = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0)) * 3
    readout = lens.LogitLens(adapter, answer_ids)
    values, grad = readout.value_and_grad(rows)
    assert lens.FORMULA[adapter.final_norm] is (norm == "stock")
    leaf = rows.clone().requires_grad_(True)
    expected = readout(leaf)
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    assert (values - expected.detach()).abs().max() == 0
    assert grad.abs().max() > 1e-2
    assert (grad - expected_grad).abs().max() <= 1e-6 * expected_grad.abs().max()
    assert grad[1, :2].abs().max() == 0 and grad[0, 3].abs().max() == 0  # padding slots


def test_float32_block_backward_tracks_the_rerun(samples, monkeypatch):
    """The float32 model used by the benchmarks: the hand-written backward within float32 rounding of autograd's."""
    model, processor = random_llava(hidden=64, layers=2, heads=4, kv_heads=2, grid=4, dtype=torch.float32, seed=3)
    adapter = get_adapter(model, processor)
    batch = make_batch(adapter, samples[:2], [6, 3])
    fast = run_trace(adapter, batch)
    assert all(tail.CHECKED[layer] for layer in adapter.decoder_layers)
    slow = _rerun(adapter, batch, monkeypatch)
    scale = slow.grads.abs().max()
    assert scale > 1e-3
    assert (fast.grads - slow.grads).abs().max() <= 1e-5 * scale
    assert (fast.logit_lens - slow.logit_lens).abs().max() == 0


def test_a_block_off_the_formula_keeps_the_rerun(tiny64, samples, monkeypatch):
    """A norm scaling by 1 + w (Gemma's) under LLaMA's names fails the check; the trace is still exact."""
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _norm_one_plus_w)
    adapter = get_adapter(*tiny64)
    batch = make_batch(adapter, samples[:2], [5, 7])
    _forget(adapter)
    try:
        trace = run_trace(adapter, batch)
        assert not any(tail.CHECKED[layer] for layer in adapter.decoder_layers)
        ref, _ = naive_layer_grads(adapter, batch, 0)
    finally:
        _forget(adapter)
    length = int(batch.answer_lengths[0])
    pad = int((batch.inputs["attention_mask"][0] == 0).sum())
    assert (trace.grads[0, :, :, -length:, pad:] - ref).abs().max() <= 1e-10


@pytest.mark.parametrize("family", ["paligemma"])
def test_other_families_are_not_swiglu_blocks(family):
    """Gemma's GeGLU MLP is not a SwiGLU block: no hand-written backward is offered."""
    model, _ = random_paligemma()
    layer = model.model.language_model.layers[0]
    assert tail.SwiGLUBlock.of(layer) is None
