"""The one-pass trace equals the naive reference (one autograd call per layer and token)."""

from __future__ import annotations

import pytest
import torch

from dexar import tracing
from dexar.adapters import get_adapter
from dexar.reference import naive_layer_grads


def _batch(model, processor, samples, lengths):
    adapter = get_adapter(model, processor)
    answers = [adapter.tokenize_answer(s.answer)[:n] for s, n in zip(samples, lengths, strict=True)]
    prompt_ids, image_inputs = adapter.encode_prompts([s.image for s in samples], [s.prompt for s in samples])
    return adapter, adapter.build_batch(prompt_ids, answers, image_inputs)


def _sample_rows(trace, batch, b):
    length = int(batch.answer_lengths[b])
    pad = int((batch.inputs["attention_mask"][b] == 0).sum())
    return trace.grads[b, :, :, -length:, pad:], trace.attentions[b, :, :, -length:, pad:]


def test_one_pass_matches_naive_on_padded_batch(tiny64, samples):
    model, processor = tiny64
    adapter, batch = _batch(model, processor, samples[:3], [9, 1, 5])
    assert (batch.inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
    trace = tracing.run(adapter, batch)
    for b in range(3):
        ref_g, ref_a = naive_layer_grads(adapter, batch, b)
        g, a = _sample_rows(trace, batch, b)
        assert ref_g.abs().max() > 1e-3  # the reference is not trivially zero
        assert (g - ref_g).abs().max() <= 1e-10
        assert (a - ref_a).abs().max() <= 1e-10
    # padding slots of shorter answers carry no gradient
    assert trace.grads[1, :, :, :-1].abs().max() == 0


def test_causal_fast_path_single_unpadded_sample(tiny64, samples, monkeypatch):
    """Without padding sdpa_mask returns None; the captured rows must still be causal."""
    model, processor = tiny64
    adapter, batch = _batch(model, processor, samples[:1], [6])
    seen = []
    original = tracing._answer_row_probs

    def spy(module, query, key, attention_mask, *args):
        seen.append(attention_mask)
        return original(module, query, key, attention_mask, *args)

    monkeypatch.setattr(tracing, "_answer_row_probs", spy)
    trace = tracing.run(adapter, batch)
    assert seen and all(m is None for m in seen)
    n = batch.input_ids.shape[1]
    rows = torch.arange(n - 1 - 6, n - 1)
    future = torch.arange(n)[None, :] > rows[:, None]
    assert trace.attentions[0][..., future].abs().max() == 0
    assert trace.grads[0][..., future].abs().max() > 0, "masked future columns do get gradients"
    assert not trace.text_mask[0][future].any(), "future columns are never text columns"
    ref_g, _ = naive_layer_grads(adapter, batch, 0)
    assert (trace.grads[0] - ref_g).abs().max() <= 1e-10


def test_parameters_get_no_gradients_and_flags_restored(tiny64, samples):
    model, processor = tiny64
    adapter, batch = _batch(model, processor, samples[:2], [4, 3])
    flags = [p.requires_grad for p in model.parameters()]
    tracing.run(adapter, batch)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.config.text_config._attn_implementation == "sdpa"


def test_memory_holds_answer_rows_only(tiny64, samples):
    model, processor = tiny64
    adapter, batch = _batch(model, processor, samples[:2], [4, 3])
    trace = tracing.run(adapter, batch)
    b, n = batch.input_ids.shape
    layers, heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    assert trace.attentions.shape == (b, layers, heads, 4, n)
    assert trace.grads.shape == (b, layers, heads, 4, n)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_lower_precisions_track_float64(tiny64, samples, dtype, tol):
    model, processor = tiny64
    adapter, batch = _batch(model, processor, samples[:2], [5, 3])
    ref = tracing.run(adapter, batch).grads
    low = model.to(dtype)
    try:
        trace = tracing.run(get_adapter(low, processor), batch)
    finally:
        model.to(torch.float64)
    assert torch.isfinite(trace.grads).all()
    rel = (trace.grads.double() - ref).norm() / ref.norm()
    assert rel <= tol


def test_unknown_needs_rejected(tiny64, samples):
    model, processor = tiny64
    adapter, batch = _batch(model, processor, samples[:1], [2])
    with pytest.raises(ValueError, match="unknown trace needs"):
        tracing.run(adapter, batch, {"hidden_states_everywhere"})


def test_answer_rows_rerun_equals_full_graph_and_is_used(tiny64, samples, monkeypatch):
    """The rows re-run (graph over T rows) gives the same trace as the graph over every row."""
    model, processor = tiny64
    adapter, batch = _batch(model, processor, samples[:3], [9, 1, 5])
    assert adapter.row_local_layers
    calls = []
    rerun = tracing._rerun_answer_rows
    monkeypatch.setattr(tracing, "_rerun_answer_rows", lambda *a, **k: calls.append(a[1]) or rerun(*a, **k))
    rows = tracing.run(adapter, batch)
    assert calls == list(range(len(adapter.decoder_layers)))
    monkeypatch.setattr(type(adapter), "row_local_layers", False)
    full = tracing.run(adapter, batch)
    assert len(calls) == len(adapter.decoder_layers)  # the full-graph path does not re-run
    assert rows.grads.abs().max() > 1e-3
    assert (rows.grads - full.grads).abs().max() <= 1e-12
    assert (rows.attentions - full.attentions).abs().max() == 0
    assert (rows.logit_lens - full.logit_lens).abs().max() <= 1e-12
