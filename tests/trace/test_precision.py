"""bf16 numerics: maps of every method on a bf16 model track the float64 maps; no bf16 min-max ties."""

from __future__ import annotations

import pytest
import torch

from datamodules.shapes import make_shapes_sample
from dexar import SHAPES_CHECKPOINT, load_model
from dexar.adapters import get_adapter
from dexar.methods import METHODS, build_method
from dexar.trace import precision
from dexar.trace import run as run_trace
from dexar.trace.precision import upcast

MIN_RANK_CORRELATION = {
    "dexar": 0.99,
    "attention": 0.99,
    "rollout": 0.99,
    "chefercam": 0.99,
    "attngrad": 0.99,
    "gradcam": 0.98,
    "tam": 0.98,
    "iia": 0.98,
    "integrated_gradients": 0.98,
    "rise": 0.5,
}
"""Spearman correlation of a bf16 sequence map with the float64 one, per method (measured on 8 Shapes
test images after the fp32 read-outs: min 0.9993–0.9996 for the attention/gradient maps, 0.9922–0.9984
for GradCAM, TAM, IG, IIA; RISE 0.68: its 16 masked forwards' log-likelihoods differ by less than the bf16
forward's own noise). Not loose: a random map correlates at most 0.34 with the float64 map, and a
bf16 min-max (the old path) still passes the correlation, which is why the tie test below exists."""


def _batch(adapter, count):
    samples = [make_shapes_sample(i, "test") for i in range(count)]
    answers = [adapter.tokenize_answer(s.answer) for s in samples]
    prompt_ids, image_inputs = adapter.encode_prompts([s.image for s in samples], [s.prompt for s in samples])
    return adapter.build_batch(prompt_ids, answers, image_inputs)


def _ranks(x):
    return x.argsort(-1).argsort(-1).double()


def _spearman(a, b):
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


@pytest.fixture(scope="module")
def maps():
    out = {}
    for dtype in ("float64", "bfloat16"):
        model, processor = load_model(SHAPES_CHECKPOINT, dtype=dtype)
        adapter = get_adapter(model, processor)
        batch = _batch(adapter, 3)
        for name in METHODS:
            method = build_method(name)
            out[dtype, name] = method(run_trace(adapter, batch, method.needs))
    return out


@pytest.mark.parametrize("name", sorted(MIN_RANK_CORRELATION))
def test_bf16_maps_track_float64(maps, name):
    exact, low = maps["float64", name].sequence_map.flatten(1), maps["bfloat16", name].sequence_map.flatten(1)
    assert low.dtype == torch.float32  # normalised in float32, not bf16
    noise = torch.rand(exact.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert _spearman(exact, noise).abs().max() < 0.5 <= MIN_RANK_CORRELATION[name]
    assert _spearman(exact, low.double()).min() >= MIN_RANK_CORRELATION[name]


def test_bf16_tam_maps_have_no_ties(maps):
    """TAM's min-max used to run in bf16: 4–12 tied pixels per sequence map (8 samples), now none,
    as in float64. (GradCAM's bf16 sums over D tied 0–6 pixels; now 0–2, left by its bf16 gradients.)"""
    for dtype in ("float64", "bfloat16"):
        for row in maps[dtype, "tam"].sequence_map.flatten(1):
            positive = row[row > 0]
            assert len(torch.unique(positive)) == len(positive), dtype


def test_upcast_linear_and_its_gradient_run_in_the_input_precision():
    layer = torch.nn.Linear(16, 8).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(4, 16, dtype=torch.float32, requires_grad=True)
    with upcast():
        y = layer(x)
    weight, bias = layer.weight.float(), layer.bias.float()
    assert y.dtype == torch.float32
    assert torch.equal(y, x @ weight.T + bias)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(grad, torch.ones(4, 8) @ weight)


def test_upcast_mode_is_entered_only_for_narrow_parameters():
    """The mode costs a Python dispatch per op: a float32/float64 block runs without it, a bf16 one with it.

    The block's narrowest floating parameter decides (a bf16 linear beside a float32 norm needs it);
    objects without parameters are skipped, and without any parameter the mode is entered.
    """
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2).to(torch.bfloat16), torch.nn.LayerNorm(2)).requires_grad_(False)
    depth = torch._C._len_torch_function_stack
    base = depth()
    blocks = (
        ((torch.nn.Linear(2, 2),), False),
        ((torch.nn.Linear(2, 2), "not a module"), False),
        ((torch.nn.Linear(2, 2).double(),), False),
        ((torch.nn.Linear(2, 2).to(torch.bfloat16),), True),
        ((mixed,), True),
        (("not a module",), True),
        ((), True),
    )
    for modules, entered in blocks:
        with upcast(*modules):
            assert depth() == base + entered, modules
    x = torch.randn(3, 2, dtype=torch.float32)
    with upcast(mixed):
        assert mixed[0](x).dtype == torch.float32  # the bf16 linear computes in its float32 input's precision


def _emulated_fp32_out_gemm(calls):
    """The kernel's arithmetic on the CPU: bf16 products are exact in float32, and the sums accumulate in float32."""

    def gemm(a, b):
        assert a.dtype == b.dtype == torch.bfloat16
        calls.append(a.shape)
        return a.float() @ b.float()

    return gemm


def test_split_bf16_parts_sum_to_the_float32_value_exactly():
    generator = torch.Generator().manual_seed(0)
    scale = 2.0 ** torch.randint(-60, 60, (4096,), generator=generator).float()
    x = torch.randn(4096, generator=generator) * scale
    parts = precision.split_bf16(x)
    assert parts.dtype == torch.bfloat16 and parts.shape == (3, 4096)
    assert torch.equal((parts[0].float() + parts[1].float()) + parts[2].float(), x)
    assert not torch.equal(parts[0].float(), x)  # one bf16 part alone would not do


def test_the_fp32_output_gemm_is_probed_once_per_device(monkeypatch):
    """Used only where it returns the float32 product: not where it raises (this CPU) or rounds to bf16."""
    cpu = torch.device("cpu")
    for gemm, expected in ((lambda a, b: a @ b, False), (_emulated_fp32_out_gemm([]), True)):  # bf16 output, float32
        monkeypatch.setattr(precision, "_FP32_OUT_GEMM", {})
        monkeypatch.setattr(precision, "fp32_out_gemm", gemm)
        assert precision._has_fp32_out_gemm(cpu) is expected
    monkeypatch.setattr(precision, "fp32_out_gemm", lambda a, b: 1 / 0)
    assert precision._has_fp32_out_gemm(cpu) is True  # cached, not tried again

    def unsupported(a, b):
        raise NotImplementedError("aten::mm.dtype has no CPU kernel")

    monkeypatch.setattr(precision, "_FP32_OUT_GEMM", {})
    monkeypatch.setattr(precision, "fp32_out_gemm", unsupported)
    assert precision._has_fp32_out_gemm(cpu) is False


def test_split_gemm_re_run_equals_the_cast_weights_re_run(monkeypatch):
    """A bf16 model's float32 re-run through the split GEMM (emulated) against the float32 weight copies."""
    model, processor = load_model(SHAPES_CHECKPOINT, dtype="bfloat16")
    adapter = get_adapter(model, processor)
    batch = _batch(adapter, 2)
    cast = run_trace(adapter, batch)
    calls = []
    monkeypatch.setattr(precision, "_FP32_OUT_GEMM", {torch.device("cpu"): True})
    monkeypatch.setattr(precision, "fp32_out_gemm", _emulated_fp32_out_gemm(calls))
    split = run_trace(adapter, batch)
    t = batch.answer_ids.shape[1]
    assert calls and all(rows == 3 * 2 * t for rows, _ in calls)  # every re-run linear, forward and backward
    # measured 4.8e-7 of the largest gradient; two bf16 parts instead of three give 2.7e-6, one 2.6e-3
    scale = cast.grads.abs().max()
    assert scale > 1e-3
    assert (split.grads - cast.grads).abs().max() <= 1.5e-6 * scale
    assert (split.logit_lens - cast.logit_lens).abs().max() <= 1.5e-6 * cast.logit_lens.abs().max()
