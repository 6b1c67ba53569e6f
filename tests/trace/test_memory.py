"""The trace's memory model (dexar.trace.memory) against the peak measured on the CPU allocator."""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch

from datamodules.shapes import make_shapes_sample
from dexar.adapters import get_adapter
from dexar.explain import Explainer
from dexar.methods import METHODS, build_method
from dexar.testing.llava import random_llava
from dexar.trace import run as run_trace
from dexar.trace.memory import (
    HEADROOM,
    KNOWN_MODELS,
    ModelDims,
    measured_peak_bytes,
    retained_bytes,
    trace_peak_bytes,
)

SHARED = frozenset().union(*(build_method(name).needs for name in METHODS)) - {"extra_forwards"}
"""Every method's trace needs at once (the probes' own forwards are not part of the trace)."""


ANSWERS = (
    "i see a red circle",
    "i see a red square and a green circle",
    "i see a red square and a green circle and a red circle and a blue square",
)
"""Answers of 5, 9 and 17 word tokens: the model's terms scale differently with T, so one length is not enough."""


def _batch(adapter, count, answer):
    sample = make_shapes_sample(0, "test")
    answers = [adapter.tokenize_answer(answer)] * count
    prompt_ids, image_inputs = adapter.encode_prompts([sample.image] * count, [sample.prompt] * count)
    return adapter.build_batch(prompt_ids, answers, image_inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_predicted_peak_within_15_percent_of_measured(dtype):
    """Both plans, batch 1 and 3, answers of 5/9/17 tokens, GQA: predicted / measured in [0.85, 1.15].

    (DEX-AR's plan: float32 0.955-0.966, bf16 0.928-0.988 since each layer's re-run and backward run in
    its forward hook, the re-run's graph freed before the next layer; the model that kept every layer's
    re-run graph now over-predicts by up to 1.23.)
    """
    model, processor = random_llava(hidden=128, layers=3, heads=8, kv_heads=2, grid=12, dtype=dtype, seed=0)
    adapter = get_adapter(model, processor)
    dims = ModelDims.from_config(adapter.text_config)
    ratios = {}
    for answer in ANSWERS:
        for count in (1, 3):
            batch = _batch(adapter, count, answer)
            n, t = batch.input_ids.shape[1], batch.answer_ids.shape[1]
            for plan, needs in (("default", None), ("shared", SHARED)):
                call = partial(run_trace, adapter, batch)
                if needs is not None:
                    call = partial(run_trace, adapter, batch, needs, 1)
                call()  # warm-up: lazy buffers (rotary caches, registered functions) are not the trace's
                measured = measured_peak_bytes(call)
                ratios[plan, count, t] = trace_peak_bytes(dims, n, t, count, plan, dtype) / measured
    bad = {key: r for key, r in ratios.items() if not 0.85 <= r <= 1.15}
    assert not bad, sorted(ratios.items())


def test_measured_peak_sees_torch_allocations():
    def allocate():
        a = torch.zeros(1000, 1000)  # 4 MB
        b = torch.zeros(2000, 1000)  # 8 MB, with a: the peak
        del a
        c = torch.zeros(500, 1000)  # 2 MB after a is freed
        return b, c

    assert measured_peak_bytes(allocate) == 12_000_000


def test_known_models_match_their_configs():
    """Spot-check the table against the published config.json values (layers, hidden, heads, KV heads)."""
    assert KNOWN_MODELS["llava-1.5-7b"].layers == 32 and KNOWN_MODELS["llava-1.5-7b"].kv_heads == 32
    assert KNOWN_MODELS["llava-next-mistral-7b"].kv_heads == 8
    assert KNOWN_MODELS["qwen2-vl-7b"].hidden == 3584


def test_unknown_plan_is_refused():
    with pytest.raises(ValueError, match="unknown plan"):
        trace_peak_bytes(KNOWN_MODELS["llava-1.5-7b"], 600, 20, plan="everything")


SUB_BATCHED = {"dexar": "dexar", "chefercam": "chefercam", "gradcam": "gradcam", "iia": "iia", "attention": "attention"}


def test_sub_batched_explanations_equal_the_whole_batch(tiny64, samples, monkeypatch):
    """trace_batch=2 over three samples: traces of 2 + 1 samples; every method's maps as from one trace."""
    explain_module = importlib.import_module("dexar.explain")  # `dexar.explain` is also the function

    methods = {
        label: build_method(name, **({"steps": 1} if name == "iia" else {})) for label, name in SUB_BATCHED.items()
    }
    whole = Explainer(*tiny64, methods).explain_samples(samples[:3])
    sizes = []
    trace = explain_module.run_trace
    monkeypatch.setattr(
        explain_module, "run_trace", lambda a, batch, *r: sizes.append(len(batch.input_ids)) or trace(a, batch, *r)
    )
    explainer = Explainer(*tiny64, methods, trace_batch=2)
    parts = explainer.explain_samples(samples[:3])
    assert sizes == [2, 1]
    assert explainer.last_timings["trace"] > 0 and explainer.last_timings["method/iia"] > 0
    for label in methods:
        for a, b in zip(whole[label], parts[label], strict=True):
            assert a.sample_id == b.sample_id and a.tokens == b.tokens
            assert (a.token_maps - b.token_maps).abs().max() <= 1e-10, label
            assert (a.sequence_map - b.sequence_map).abs().max() <= 1e-10, label


def test_samples_per_trace_fill_the_free_memory(tiny64, samples, monkeypatch):
    """On an accelerator the trace batch is what the memory model fits in the free memory (at least 1)."""
    explain_module = importlib.import_module("dexar.explain")  # `dexar.explain` is also the function

    methods = {"dexar": build_method("dexar"), "chefercam": build_method("chefercam"), "iia": build_method("iia")}
    explainer = Explainer(*tiny64, methods)
    adapter = explainer.adapter
    batch = _batch(adapter, 3, ANSWERS[1])
    assert explainer.samples_per_trace(batch) == 3  # the CPU: the whole batch
    dims = ModelDims.from_config(adapter.text_config)
    n, t = batch.input_ids.shape[1], batch.answer_ids.shape[1]
    one = trace_peak_bytes(dims, n, t, 1, "shared", torch.float64)
    probe = retained_bytes(dims, n, t, "shared", torch.float64) + trace_peak_bytes(
        dims, n, t, 1, "probe", torch.float64
    )
    one = max(one, probe)
    for free, expected in ((int(2.5 * one / HEADROOM), 2), (one // 2, 1), (10 * one, 9)):
        monkeypatch.setattr(explain_module, "free_device_bytes", lambda device, free=free: free)
        assert explainer.samples_per_trace(batch) == expected
