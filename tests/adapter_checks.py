"""Checks shared by the per-family adapter tests (Qwen2-VL, LLaVA-NeXT, Idefics3): float64 exactness,
padded batch == one by one, every method finite, ``load_model`` round trip."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from dexar import load_model
from dexar.adapters import get_adapter
from dexar.explain import Explainer
from dexar.methods import METHODS, DexAR, build_method
from dexar.reference import naive_dexar, naive_layer_grads
from dexar.schema import Sample
from dexar.trace import run as run_trace

TOL = 1e-10
FAST_OPTIONS = {
    "integrated_gradients": {"steps": 1, "batch_size": 1},
    "rise": {"num_masks": 2, "batch_size": 2},
    "iia": {"steps": 1},
}
"""Cheap settings of the costly baselines: these tests check plumbing and shapes, not the estimators."""


def make_batch(adapter, samples, lengths):
    """Teacher-forced batch of ``samples`` with answers cut to ``lengths`` tokens."""
    answers = [adapter.tokenize_answer(s.answer)[:n] for s, n in zip(samples, lengths, strict=True)]
    prompt_ids, image_inputs = adapter.encode_prompts([s.image for s in samples], [s.prompt for s in samples])
    return adapter.build_batch(prompt_ids, answers, image_inputs)


def assert_exact(model, processor, samples, lengths) -> float:
    """One-pass ``g_t^l``, ``A^l`` rows and DEX-AR maps == the naive float64 reference for every sample.

    Returns:
        The largest absolute difference seen.

    """
    adapter = get_adapter(model, processor)
    batch = make_batch(adapter, samples, lengths)
    assert (batch.inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
    trace = run_trace(adapter, batch)
    out = DexAR()(trace)
    worst = 0.0
    for b in range(len(samples)):
        ref_g, ref_a = naive_layer_grads(adapter, batch, b)
        length = int(batch.answer_lengths[b])
        pad = int((batch.inputs["attention_mask"][b] == 0).sum())
        assert ref_g.abs().max() > 1e-3  # the reference is not trivially zero
        g = trace.grads[b, :, :, -length:, pad:]
        a = trace.attentions[b, :, :, -length:, pad:]
        ids = batch.sample_inputs(b)["input_ids"][0]
        image = torch.nonzero(ids == adapter.image_token_id)[:, 0]
        text = [[j for j in range(len(ids) - length + t) if ids[j] != adapter.image_token_id] for t in range(length)]
        cell_map = batch.cell_map
        if cell_map is None:
            maps, weights, seq = naive_dexar(ref_g, image, text, trace.grid)
        else:  # tiles: the naive token values merged with the adapter's cell map, then normalised
            maps, weights, seq = naive_tiled_dexar(ref_g, image, text, trace.grid, cell_map)
        diffs = [
            (g - ref_g).abs().max(),
            (a - ref_a).abs().max(),
            (out.token_maps[b, -length:] - maps).abs().max(),
            (out.token_weights[b, -length:] - weights).abs().max(),
            (out.sequence_map[b] - seq).abs().max(),
        ]
        assert maps.abs().max() > 0
        worst = max(worst, *(float(d) for d in diffs))
    assert worst <= TOL, worst
    return worst


def naive_tiled_dexar(grads, image, text, grid, cell_map):
    """DEX-AR (max head filter) loop by loop, each token's raw map merged into the full-image cells by ``cell_map``."""
    n_layers, n_heads, length, _ = grads.shape
    maps, weights = [], []
    for t in range(length):
        raw = torch.zeros(len(image), dtype=grads.dtype)
        best_v = best_t = 0.0
        for layer in range(n_layers):
            for head in range(n_heads):
                g = grads[layer, head, t]
                m_v = float(g[image].clamp(min=0).max())
                m_t = max([float(g[j].clamp(min=0)) for j in text[t]] or [0.0])
                raw += max(m_v - m_t, 0.0) * g[image].clamp(min=0)
                best_v, best_t = max(best_v, m_v), max(best_t, m_t)
        cells = cell_map.to(raw.dtype) @ raw
        lo, hi = cells.min(), cells.max()
        maps.append((cells - lo) / (hi - lo) if hi > lo else torch.zeros_like(cells))
        weights.append(max(best_v - best_t, 0.0))
    maps = torch.stack(maps)
    weights = torch.tensor(weights, dtype=grads.dtype)
    seq = (weights[:, None] * maps).sum(0)
    lo, hi = seq.min(), seq.max()
    seq = (seq - lo) / (hi - lo) if hi > lo else torch.zeros_like(seq)
    return maps.view(length, *grid), weights, seq.view(*grid)


def assert_batch_equals_alone(model, processor, samples) -> float:
    """Explaining ``samples`` together (padded, possibly several grids) == one by one."""
    explainer = Explainer(model, processor, {"dexar": DexAR()})
    together = explainer.explain_samples(samples)["dexar"]
    worst = 0.0
    for i, sample in enumerate(samples):
        alone = explainer.explain_samples([sample])["dexar"][0]
        mine = together[i]
        assert mine.tokens == alone.tokens and mine.token_maps.shape == alone.token_maps.shape
        assert torch.equal(mine.inputs["input_ids"], alone.inputs["input_ids"])
        for key, value in alone.inputs.items():
            assert torch.equal(mine.inputs[key], value), key
        diffs = [
            (mine.token_maps - alone.token_maps).abs().max(),
            (mine.token_weights - alone.token_weights).abs().max(),
            (mine.sequence_map - alone.sequence_map).abs().max(),
        ]
        worst = max(worst, *(float(d) for d in diffs))
    assert worst <= TOL, worst
    return worst


def assert_methods_run(model, processor, samples, lengths, grid) -> None:
    """Every registered method on one trace: finite maps of the full-image grid's shape."""
    methods = {name: build_method(name, **FAST_OPTIONS.get(name, {})) for name in METHODS}
    explainer = Explainer(model, processor, methods)
    adapter = explainer.adapter
    batch = make_batch(adapter, samples, lengths)
    trace = run_trace(adapter, batch, explainer.needs)
    assert trace.grid == grid
    for name, method in methods.items():
        out = method(trace)
        b, t = trace.answer_mask.shape
        assert out.token_maps.shape == (b, t, *grid), name
        assert out.sequence_map.shape == (b, *grid), name
        for value in (out.token_maps, out.token_weights, out.sequence_map):
            assert torch.isfinite(value).all(), name
        assert out.token_maps.abs().max() > 0, name


def assert_load_roundtrip(model, processor, path, adapter_cls, sample) -> None:
    """``save_pretrained`` + :func:`dexar.load_model`: same family, same encoding, same DEX-AR trace."""
    model.save_pretrained(path)
    processor.save_pretrained(path)
    loaded, loaded_processor = load_model(path, dtype="float64")
    assert isinstance(get_adapter(loaded, loaded_processor), adapter_cls)
    assert loaded.config._attn_implementation == "sdpa"
    traces = []
    for m, p in ((model, processor), (loaded, loaded_processor)):
        adapter = get_adapter(m, p)
        batch = make_batch(adapter, [sample], [3])
        traces.append((batch, run_trace(adapter, batch)))
    (b0, t0), (b1, t1) = traces
    assert b0.inputs.keys() == b1.inputs.keys()
    for key, value in b0.inputs.items():
        assert torch.equal(value, b1.inputs[key]), key
    assert (t0.grads - t1.grads).abs().max() <= TOL


@contextmanager
def local_vision(model, tower: str):
    """Zero the vision tower's attention output: every patch feature depends on its own pixels only.

    ``tower`` is the parameter-name fragment of the tower (``vision_model``, ``vision_tower``).
    """
    saved = []
    for name, param in model.named_parameters():
        if tower in name and "self_attn.out_proj" in name:
            saved.append((param, param.detach().clone()))
            param.data.zero_()
    try:
        yield
    finally:
        for param, value in saved:
            param.data.copy_(value)


def image_embeddings(adapter, image):
    """The batch of one captioned ``image`` and the image-token inputs of its first decoder layer."""
    batch = make_batch(adapter, [Sample(id="m", image=image, prompt="describe the image .", answer="i see")], [1])
    seen: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    hook = adapter.decoder_layers[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.backbone_forward(batch.inputs)
    finally:
        hook.remove()
    return batch, seen[0][0, batch.inputs["input_ids"][0] == adapter.image_token_id]
