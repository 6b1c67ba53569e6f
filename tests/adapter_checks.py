"""The adapter conformance suite every VLM family runs (:class:`AdapterConformance`, subclassed in each
``tests/test_adapter_<family>.py``, as transformers' ``ModelTesterMixin``) and its checks: the declared
contract, the batch layout, float64 exactness, padded batch == one by one, every method finite (the
refused ones refused in one line), pixel views, ``load_model`` round trip."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from dexar import load_model
from dexar.adapters import DexarInputError, get_adapter
from dexar.adapters.base import ARCHITECTURES, VLMAdapter, method_requirements, need_key
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
    return adapter.build_batch(*_encoded(adapter, samples, lengths))


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


def assert_methods_run(model, processor, samples, lengths, grid, names=None) -> None:
    """Every registered method (or those in ``names``) on one trace: finite maps of the full-image grid's shape."""
    methods = {name: build_method(name, **FAST_OPTIONS.get(name, {})) for name in names or METHODS}
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


class AdapterConformance:
    """The checks every VLM family passes; a family's test module subclasses it (``TestConformance``).

    The subclass provides two fixtures and a few class attributes:

    * ``vlm``: ``(model, processor)``, a tiny float64 model of the family (may be parametrised);
    * ``family_samples``: three or more samples; ``[0]`` and ``[2]`` give one image-token layout (they
      are batched together), the others may differ (:meth:`VLMAdapter.grid_key`);
    * :attr:`adapter_cls`, :attr:`exact_lengths` (answer tokens of ``[0]`` and ``[2]``, different, so the
      batch is padded), :attr:`methods_lengths` and :attr:`grid` (the full-image map of ``[0]`` and ``[2]``).

    A family overrides a check where its architecture needs another reference (Florence-2's
    cross-attention) or a stronger assertion (:meth:`check_grid_keys`).
    """

    adapter_cls: type[VLMAdapter]
    exact_lengths: tuple[int, int] = (5, 2)
    methods_lengths: tuple[int, int] = (4, 2)
    grid: tuple[int, int]
    distinct_grid_keys: int | None = None
    """How many image-token layouts ``family_samples`` hold (``None``: not checked)."""

    # -- the declared contract --------------------------------------------------------------------
    def test_declared_contract(self, vlm):
        model, processor = vlm
        adapter = get_adapter(model, processor)
        cls = type(adapter)
        assert cls is self.adapter_cls and model.config.model_type in cls.model_types
        assert not cls.__abstractmethods__ and cls.architecture in ARCHITECTURES
        assert isinstance(adapter.row_local_layers, bool) and isinstance(cls.pixel_perturbation, bool)
        assert adapter.cross_attention == (cls.architecture == "cross")
        assert adapter.num_image_tokens is None or adapter.num_image_tokens > 0
        assert cls.paper_prompt is None or isinstance(cls.paper_prompt, str)
        requirements = {name: method_requirements(build_method(name)) for name in METHODS}
        known = {need_key(need) for needs in requirements.values() for need in needs}
        assert set(cls.refused_needs) <= known, "refused_needs names a need no method has"
        refused = {
            name for name, needs in requirements.items() if {need_key(n) for n in needs} & set(cls.refused_needs)
        }
        assert set(cls.refused_methods) == refused and refused < set(METHODS)
        if cls.pixel_perturbation:
            adapter.check_pixel_perturbation()
        else:
            with pytest.raises(DexarInputError, match=f"not supported for {cls.__name__}"):
                adapter.check_pixel_perturbation()

    def test_prompt_with_the_image_token_is_refused(self, vlm):
        adapter = get_adapter(*vlm)
        token = adapter.tokenizer.convert_ids_to_tokens(adapter.image_token_id)
        with pytest.raises(DexarInputError) as err:
            adapter.format_prompt(f"what is {token} here ?")
        assert "\n" not in str(err.value)

    # -- the batch ---------------------------------------------------------------------------------
    def test_batch_layout(self, vlm, family_samples):
        """Answers right-aligned in their slots and found at their positions; image tokens = map columns."""
        adapter = get_adapter(*vlm)
        pair = [family_samples[0], family_samples[2]]
        batch = make_batch(adapter, pair, self.exact_lengths)
        assert batch.image_grid == self.grid
        assert batch.answer_lengths.tolist() == list(self.exact_lengths)
        for b, sample in enumerate(pair):
            answer = adapter.tokenize_answer(sample.answer)[: self.exact_lengths[b]]
            slots = batch.answer_ids[b][batch.answer_mask[b]]
            assert slots.tolist() == answer and batch.answer_mask[b, -len(answer) :].all()
            assert batch.input_ids[b, batch.answer_positions(b)].tolist() == answer
            alone = batch.sample_inputs(b)
            decoder = alone.get("decoder_input_ids", alone["input_ids"])
            assert decoder[0, batch.unpadded_answer_positions(b)].tolist() == answer
            image_tokens = int(adapter.image_token_mask(alone["input_ids"]).sum())
            columns = batch.cell_map.shape[1] if batch.cell_map is not None else self.grid[0] * self.grid[1]
            assert image_tokens == columns
        if batch.cell_map is not None:
            assert batch.cell_map.shape[0] == self.grid[0] * self.grid[1]
        moved = adapter.build_batch(*_encoded(adapter, pair, self.exact_lengths), device="cpu")
        assert moved.inputs.keys() == batch.inputs.keys()
        assert all(torch.equal(value, batch.inputs[key]) for key, value in moved.inputs.items())

    def test_pixel_view_round_trip(self, vlm, family_samples):
        """``repeat_sample(pixel_view)`` gives the sample back; ``pool_view`` gives one value per image token."""
        adapter = get_adapter(*vlm)
        batch = make_batch(adapter, [family_samples[0], family_samples[2]], self.methods_lengths)
        for b in range(2):
            view = adapter.pixel_view(batch, b)
            again = adapter.repeat_sample(batch, b, view[None].expand(2, *view.shape))
            alone, first = batch.sample_inputs(b), again.sample_inputs(0)
            assert alone.keys() == first.keys()
            assert all(torch.equal(value, first[key]) for key, value in alone.items())
            pooled = adapter.pool_view(batch, torch.ones(2, *view.shape[:-3], *view.shape[-2:], dtype=torch.float64))
            tokens = batch.cell_map.shape[1] if batch.cell_map is not None else self.grid[0] * self.grid[1]
            assert pooled.shape == (2, tokens)

    # -- the trace and the methods --------------------------------------------------------------------
    def test_one_pass_matches_naive_reference(self, vlm, family_samples):
        assert_exact(*vlm, [family_samples[0], family_samples[2]], list(self.exact_lengths))

    def check_grid_keys(self, adapter, samples):
        """The samples' layouts (default: their number, :attr:`distinct_grid_keys`)."""
        if self.distinct_grid_keys is not None:
            assert len({adapter.grid_key(s.image) for s in samples}) == self.distinct_grid_keys

    def test_padded_batch_equals_one_by_one(self, vlm, family_samples):
        self.check_grid_keys(get_adapter(*vlm), family_samples)
        assert_batch_equals_alone(*vlm, family_samples)

    def test_every_method_runs(self, vlm, family_samples):
        """Every method the family does not refuse runs; every refused one fails in one line, and is skipped."""
        model, processor = vlm
        refused = self.adapter_cls.refused_methods
        names = [name for name in METHODS if name not in refused]
        assert_methods_run(
            model, processor, [family_samples[0], family_samples[2]], self.methods_lengths, self.grid, names
        )
        for name, reason in refused.items():
            with pytest.raises(DexarInputError, match=f"^{name} is not supported for ") as err:
                Explainer(model, processor, {name: build_method(name)})
            assert "\n" not in str(err.value) and reason in str(err.value)
        if refused:
            explainer = Explainer(model, processor, {"dexar": DexAR(), **{n: build_method(n) for n in refused}}, True)
            assert explainer.skipped == refused and list(explainer.methods) == ["dexar"]

    def test_load_model_round_trip(self, vlm, family_samples, tmp_path):
        assert_load_roundtrip(*vlm, tmp_path, self.adapter_cls, family_samples[1])


def _encoded(adapter, samples, lengths):
    """``build_batch``'s arguments for ``samples`` with answers cut to ``lengths`` tokens."""
    answers = [adapter.tokenize_answer(s.answer)[:n] for s, n in zip(samples, lengths, strict=True)]
    prompt_ids, image_inputs = adapter.encode_prompts([s.image for s in samples], [s.prompt for s in samples])
    return prompt_ids, answers, image_inputs
