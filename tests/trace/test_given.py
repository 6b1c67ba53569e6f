"""The answer-rows re-run with given products (dexar.trace.given) equals the re-run that computes them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dexar.adapters import get_adapter
from dexar.testing.adapter_checks import make_batch
from dexar.testing.reference import naive_layer_grads
from dexar.trace import given, instrument
from dexar.trace import run as run_trace


def _computed(adapter, batch, monkeypatch):
    """The trace with the re-run computing every product (no :class:`~dexar.trace.given.RowCapture`)."""
    with monkeypatch.context() as patch:
        patch.setattr(instrument, "exact_rerun", lambda layer: False)
        return run_trace(adapter, batch)


def _attention_modules(adapter):
    return [layer.self_attn for layer in adapter.decoder_layers]


def test_given_rerun_equals_computed_rerun_and_skips_the_attention(tiny64, samples, monkeypatch):
    """float64 GQA LLaVA, padded batch: maps and lens as the computing re-run; the attention modules are skipped."""
    adapter = get_adapter(*tiny64)
    batch = make_batch(adapter, samples[:3], [9, 1, 5])
    for module in _attention_modules(adapter):
        given._BYPASS.pop(module, None)
    calls = []
    for module in _attention_modules(adapter):
        original = module.forward
        monkeypatch.setattr(module, "forward", lambda *a, f=original, **k: calls.append(1) or f(*a, **k))
    layers = len(adapter.decoder_layers)
    fast = run_trace(adapter, batch)
    assert len(calls) == layers  # the full forward ran each attention module; the re-runs did not
    assert [given._BYPASS[m] for m in _attention_modules(adapter)] == [2] * layers
    again = run_trace(adapter, batch)  # checked modules: the address check alone
    assert len(calls) == 2 * layers
    slow = _computed(adapter, batch, monkeypatch)
    assert fast.grads.abs().max() > 1e-3
    assert (fast.grads - slow.grads).abs().max() <= 1e-12
    assert (fast.logit_lens - slow.logit_lens).abs().max() <= 1e-12
    assert (again.grads - fast.grads).abs().max() == 0
    ref, _ = naive_layer_grads(adapter, batch, 0)
    length = int(batch.answer_lengths[0])
    assert (fast.grads[0, :, :, -length:] - ref).abs().max() <= 1e-10


def test_attention_output_changed_before_its_projection_is_not_skipped(tiny64, samples, monkeypatch):
    """An in-place change of the attention output before ``o_proj`` fails the value check: the module re-runs."""
    adapter = get_adapter(*tiny64)
    batch = make_batch(adapter, samples[:2], [4, 6])
    modules = _attention_modules(adapter)
    for module in modules:
        given._BYPASS.pop(module, None)

    def scale_in_place(module, args):
        args[0].mul_(1.5)

    handles = [m.o_proj.register_forward_pre_hook(scale_in_place) for m in modules]
    try:
        fast = run_trace(adapter, batch)
        assert all(given._BYPASS[m] is None for m in modules)
        slow = _computed(adapter, batch, monkeypatch)
        ref, _ = naive_layer_grads(adapter, batch, 1)
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:
            given._BYPASS.pop(module, None)
    assert (fast.grads - slow.grads).abs().max() <= 1e-12
    length = int(batch.answer_lengths[1])
    pad = int((batch.inputs["attention_mask"][1] == 0).sum())
    assert (fast.grads[1, :, :, -length:, pad:] - ref).abs().max() <= 1e-10


class _TwiceLayer(nn.Module):
    """A row-local toy layer whose ``shared`` linear runs twice (its rows are not one product's)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4, dtype=torch.float64)
        self.once = nn.Linear(4, 3, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.once(torch.tanh(self.shared(self.shared(x))))


def test_a_linear_called_twice_is_computed_in_the_rerun():
    """RowCapture gives ``once`` its rows and lets ``shared`` compute; the gradient is autograd's own."""
    torch.manual_seed(0)
    layer = _TwiceLayer().requires_grad_(False)
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    rows = slice(4, 7)
    capture = given.RowCapture(layer, rows, [])
    capture.arm(7)
    with torch.no_grad():
        layer(x)
    assert capture.calls[layer.shared] is given._AMBIGUOUS
    assert torch.equal(capture.calls[layer.once].rows, layer(x)[:, rows])
    attention = given.AttentionRows(nn.Identity(), torch.zeros(2, 1, 7, 1), torch.zeros(2, 3, 1, 1), -1)
    computed = []
    layer.shared.register_forward_hook(lambda *a: computed.append(1))
    leaf_x = x[:, rows].clone().requires_grad_(True)
    with capture.given(torch.zeros(2, 1, 3, 7), attention):
        out = layer(leaf_x)
    assert len(computed) == 2 and "forward" not in layer.once.__dict__  # restored
    (grad,) = torch.autograd.grad(out.sum(), leaf_x)
    reference = x[:, rows].clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(layer(reference).sum(), reference)
    assert (grad - expected).abs().max() <= 1e-14


@pytest.mark.parametrize(
    "dtype,exact", [(torch.float64, True), (torch.float32, True), (torch.bfloat16, False), (torch.float16, False)]
)
def test_given_products_only_in_the_models_own_precision(dtype, exact):
    """A bf16/fp16 layer's re-run computes in float32: the forward's narrow rows are not its values."""
    assert given.exact_rerun(nn.Linear(2, 2, dtype=dtype)) is exact
