"""The one-pass trace equals the naive reference (one autograd call per layer and token)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from dexar.adapters import DexarInputError, TeacherForcedBatch, get_adapter
from dexar.reference import naive_layer_grads
from dexar.trace import DEFAULT_NEEDS, attention, hidden_grads_need, instrument
from dexar.trace import run as run_trace
from dexar.trace.plan import Capture, Input, make_plan


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
    trace = run_trace(adapter, batch)
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
    original = attention.attention_probs

    def spy(module, query, key, attention_mask, *args):
        seen.append(attention_mask)
        return original(module, query, key, attention_mask, *args)

    monkeypatch.setattr(attention, "attention_probs", spy)
    trace = run_trace(adapter, batch)
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
    run_trace(adapter, batch)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.config.text_config._attn_implementation == "sdpa"


def test_memory_holds_answer_rows_only(tiny64, samples):
    model, processor = tiny64
    adapter, batch = _batch(model, processor, samples[:2], [4, 3])
    trace = run_trace(adapter, batch)
    b, n = batch.input_ids.shape
    layers, heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    assert trace.attentions.shape == (b, layers, heads, 4, n)
    assert trace.grads.shape == (b, layers, heads, 4, n)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_lower_precisions_track_float64(tiny64, samples, dtype, tol):
    model, processor = tiny64
    adapter, batch = _batch(model, processor, samples[:2], [5, 3])
    ref = run_trace(adapter, batch).grads
    low = model.to(dtype)
    try:
        trace = run_trace(get_adapter(low, processor), batch)
    finally:
        model.to(torch.float64)
    assert torch.isfinite(trace.grads).all()
    rel = (trace.grads.double() - ref).norm() / ref.norm()
    assert rel <= tol


def test_unknown_needs_rejected(tiny64, samples):
    model, processor = tiny64
    adapter, batch = _batch(model, processor, samples[:1], [2])
    with pytest.raises(ValueError, match="unknown trace needs"):
        run_trace(adapter, batch, {"hidden_states_everywhere"})


def test_answer_rows_rerun_equals_full_graph_and_is_used(tiny64, samples, monkeypatch):
    """The rows re-run (graph over T rows) gives the same trace as the graph over every row."""
    model, processor = tiny64
    adapter, batch = _batch(model, processor, samples[:3], [9, 1, 5])
    assert adapter.row_local_layers
    calls = []
    rerun = instrument.rerun_answer_rows
    monkeypatch.setattr(instrument, "rerun_answer_rows", lambda *a, **k: calls.append(a[1]) or rerun(*a, **k))
    rows = run_trace(adapter, batch)
    assert calls == list(range(len(adapter.decoder_layers)))
    monkeypatch.setattr(type(adapter), "row_local_layers", False)
    full = run_trace(adapter, batch)
    assert len(calls) == len(adapter.decoder_layers)  # the full-graph path does not re-run
    assert rows.grads.abs().max() > 1e-3
    assert (rows.grads - full.grads).abs().max() <= 1e-12
    assert (rows.attentions - full.attentions).abs().max() == 0
    assert (rows.logit_lens - full.logit_lens).abs().max() <= 1e-12


def test_plan_holds_one_mode_per_layer():
    """Needs → a per-layer plan, decided once (the capture functions and hooks only read it)."""
    leaf, rerun, rows, graph = Capture.LEAF_ROWS, Capture.RERUN_ROWS, Capture.GRAPH_ROWS, Capture.GRAPH
    detach, start, keep = Input.DETACH, Input.LEAF, Input.GRAPH

    def modes(needs, row_local=False, architecture="decoder"):
        plan = make_plan(needs, architecture, 3, row_local)
        return [(lp.capture, lp.input, lp.mean, lp.keep_input) for lp in plan.layers], plan

    layers, plan = modes(DEFAULT_NEEDS)
    assert layers == [(leaf, detach, False, False)] * 3 and plan.layer_grads and plan.forward_grad
    layers, plan = modes(DEFAULT_NEEDS, row_local=True)
    assert layers == [(rerun, detach, False, False)] * 3 and not plan.forward_grad  # the re-runs build the graph
    layers, plan = modes({"attention_rows", "full_attention"}, row_local=True)
    assert layers == [(leaf, detach, True, False)] * 3 and not plan.layer_grads and plan.full_attention
    layers, plan = modes({"final_logit_grads", "layer_grads"}, row_local=True)
    assert layers == [(graph, start, True, False), (graph, keep, True, False), (graph, keep, True, False)]
    assert plan.graph_from == 0 and plan.final_logit_grads
    layers, plan = modes({hidden_grads_need(-1), "layer_grads"}, row_local=True)
    assert layers == [(leaf, detach, False, False), (leaf, detach, False, False), (rows, start, False, True)]
    assert plan.hidden_grads == (2,) and plan.graph_from == 2
    layers, _ = modes({hidden_grads_need(1), "full_attention"})
    assert layers == [(leaf, detach, True, False), (graph, start, True, True), (graph, keep, True, False)]
    layers, plan = modes(DEFAULT_NEEDS, row_local=True, architecture="cross")
    assert layers == [(leaf, detach, False, False)] * 3  # a cross-attention layer is never re-run on its rows
    with pytest.raises(DexarInputError, match=r"\['full_attention'\] are not supported for an encoder-decoder"):
        make_plan({"attention_rows", "full_attention"}, "cross", 3)
    with pytest.raises(ValueError, match="unknown architecture"):
        make_plan(DEFAULT_NEEDS, "encoder", 3)


class _Module(torch.nn.Module):
    """What the attention functions read off an attention module."""

    def __init__(self, groups, causal):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, causal


@pytest.mark.parametrize("case", ["causal_fast_path", "bool_padding", "additive", "cross_unmasked"])
def test_the_one_masking_implementation_matches_torch_sdpa(case):
    """Probabilities × values == torch's own SDPA on every real row; fully masked rows are 0, never NaN."""
    gen = torch.Generator().manual_seed(0)
    b, h, kv, n, d = 2, 4, 2, 7, 8
    q, k, v = (torch.randn(b, heads, n, d, generator=gen, dtype=torch.float64) for heads in (h, kv, kv))
    pad = torch.tensor([0, 3])  # sample 1 is left-padded by 3
    real = torch.arange(n)[None, :] >= pad[:, None]  # (B, N)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    module, mask, expected_mask = _Module(h // kv, case != "cross_unmasked"), None, None
    if case == "causal_fast_path":
        expected_mask = causal.expand(b, 1, n, n)
    elif case in ("bool_padding", "additive"):
        expected_mask = causal & real[:, None, None, :] & real[:, None, :, None]  # padding rows fully masked
        low = torch.finfo(torch.float64).min
        mask = (
            expected_mask
            if case == "bool_padding"
            else torch.zeros(b, 1, n, n, dtype=torch.float64).masked_fill(~expected_mask, low)
        )
    probs = attention.attention_probs(module, q, k, mask, None, None)
    assert torch.isfinite(probs).all()
    out = attention.attend(module, probs, v, q.dtype)  # (B, N, H, D)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=expected_mask
    ).transpose(1, 2)
    rows = real if case in ("bool_padding", "additive") else torch.ones(b, n, dtype=torch.bool)
    assert (out[rows] - ref[rows]).abs().max() <= 1e-12
    if case == "bool_padding":
        assert probs[1, :, :3].abs().max() == 0  # the padding rows: zeros, as SDPA's output there
    some = slice(4, 6)  # the answer rows alone are the same rows as in the all-row computation
    assert (attention.attention_probs(module, q, k, mask, None, None, some) - probs[:, :, some]).abs().max() == 0


def test_run_dispatches_on_the_declared_architecture(tiny64, samples, monkeypatch):
    model, processor = tiny64
    adapter, batch = _batch(model, processor, samples[:1], [2])
    monkeypatch.setattr(type(adapter), "architecture", "cross")  # the cross runner reads a decoder prefix
    with pytest.raises(ValueError, match="needs a Seq2SeqBatch with a decoder prefix"):
        run_trace(adapter, batch)
    monkeypatch.setattr(type(adapter), "architecture", "ring")
    with pytest.raises(ValueError, match="architecture = 'ring'"):
        run_trace(adapter, batch)


def test_the_old_module_is_a_deprecated_alias_of_the_package(monkeypatch):
    """``dexar.tracing`` (code written before the package) warns on import and hands out the package's objects."""
    import dexar.trace as package

    monkeypatch.delitem(sys.modules, "dexar.tracing", raising=False)
    with pytest.warns(DeprecationWarning, match="import dexar.trace"):
        old = importlib.import_module("dexar.tracing")
    for name in package.__all__:
        assert getattr(old, name) is getattr(package, name), name
    assert old.TeacherForcedBatch is TeacherForcedBatch
    with pytest.raises(AttributeError, match="the tracer is dexar.trace"):
        old._rerun_answer_rows  # noqa: B018  (the old private helpers are gone)
