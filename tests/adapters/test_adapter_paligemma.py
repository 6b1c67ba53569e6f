"""PaliGemma (prefix-LM) adapter: one pass == naive float64 reference, padding, geometry, methods, CLI."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dexar import DexarInputError, load_model
from dexar.adapters import PaliGemmaAdapter, get_adapter
from dexar.explain import Explainer
from dexar.methods import (
    IIA,
    TAM,
    AttnGrad,
    CheferCAM,
    DexAR,
    GradCAM,
    IntegratedGradients,
    RawAttention,
    Rise,
    Rollout,
)
from dexar.pipeline.cli import main as cli_main
from dexar.schema import Sample
from dexar.testing.adapter_checks import AdapterConformance
from dexar.testing.paligemma import random_paligemma
from dexar.testing.reference import naive_dexar, naive_layer_grads
from dexar.trace import instrument
from dexar.trace import run as run_trace

COLORS = [(200, 30, 30), (30, 180, 60), (40, 60, 210)]
PROMPTS = ["Cap.", "what is shown in the image ?", "Cap."]
ANSWERS = ["a red circle on the left", "blue", "a green square and a red triangle ."]


@pytest.fixture(scope="module")
def pali64():
    return random_paligemma(hidden=32, layers=2, heads=4, kv_heads=2, grid=4, dtype=torch.float64, seed=0)


def _images():
    out = []
    for i, color in enumerate(COLORS):
        image = Image.new("RGB", (40 + 8 * i, 30), color)
        image.paste((255 - color[0], 255, 0), (4 * i, 3, 4 * i + 12, 15))
        out.append(image)
    return out


@pytest.fixture(scope="module")
def padded(pali64):
    model, processor = pali64
    adapter = get_adapter(model, processor)
    prompt_ids, image_inputs = adapter.encode_prompts(_images(), PROMPTS)
    answers = [adapter.tokenize_answer(a) for a in ANSWERS]
    batch = adapter.build_batch(prompt_ids, answers, image_inputs)
    assert (batch.inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
    return adapter, batch


def _layout(adapter, batch, b):
    """Unpadded ids, image positions, predicting rows p_t and the text columns of each row."""
    inputs = batch.sample_inputs(b)
    ids, types = inputs["input_ids"][0], inputs["token_type_ids"][0]
    length = int(batch.answer_lengths[b])
    image = [j for j in range(len(ids)) if ids[j] == adapter.image_token_id]
    rows = [len(ids) - length - 1 + t for t in range(length)]
    # prefix-LM: row p_t sees the whole prefix (type 0) and the answer tokens up to itself
    text = [
        [j for j in range(len(ids)) if ids[j] != adapter.image_token_id and (types[j] == 0 or j <= p)] for p in rows
    ]
    return ids, image, rows, text


def test_adapter_registered_with_paper_prompt(pali64):
    adapter = get_adapter(*pali64)
    assert isinstance(adapter, PaliGemmaAdapter)
    assert adapter.paper_prompt == "Cap."
    assert adapter.image_grid({}) == (4, 4)


def test_gemma2_text_models_are_refused_in_one_line(pali64):
    model, processor = pali64
    text = model.config.text_config
    text.attn_logit_softcapping = 50.0
    try:
        with pytest.raises(DexarInputError, match="PaliGemma 2") as err:
            get_adapter(model, processor)
    finally:
        text.attn_logit_softcapping = None
    assert "\n" not in str(err.value)


def test_one_pass_equals_naive_reference_on_padded_batch(padded):
    adapter, batch = padded
    trace = run_trace(adapter, batch)
    out = DexAR()(trace)
    nonzero = 0
    for b in range(3):
        ref_g, ref_a = naive_layer_grads(adapter, batch, b)  # one autograd call per layer and token
        length = int(batch.answer_lengths[b])
        pad = int((batch.inputs["attention_mask"][b] == 0).sum())
        g, a = trace.grads[b, :, :, -length:, pad:], trace.attentions[b, :, :, -length:, pad:]
        assert ref_g.abs().max() > 1e-3
        assert (g - ref_g).abs().max() <= 1e-10
        assert (a - ref_a).abs().max() <= 1e-10
        _, image, _, text = _layout(adapter, batch, b)
        maps, weights, seq = naive_dexar(ref_g, torch.tensor(image), text, trace.grid)
        assert (out.token_maps[b, -length:] - maps).abs().max() <= 1e-10
        assert (out.token_weights[b, -length:] - weights).abs().max() <= 1e-10
        assert (out.sequence_map[b] - seq).abs().max() <= 1e-10
        nonzero += int(maps.abs().max() > 0)
    assert nonzero >= 2  # the maps are not trivially empty


def test_prefix_is_bidirectional_answer_causal_and_text_columns(padded):
    adapter, batch = padded
    trace = run_trace(adapter, batch, {"attention_rows", "layer_grads", "full_attention"})
    for b in range(3):
        ids, image, rows, text = _layout(adapter, batch, b)
        pad = int((batch.inputs["attention_mask"][b] == 0).sum())
        full = trace.full_attention[b, :, pad:, pad:]  # (L, N_b, N_b), head-averaged
        prompt = [j for j in range(len(ids)) if j not in image and j <= rows[0]]
        assert full[:, image[0], prompt[-1]].min() > 0, "image rows attend to later prompt tokens"
        for t, p in enumerate(rows):
            future = torch.arange(len(ids)) > p
            assert full[:, p, future].abs().max() == 0, "answer rows are causal"
            assert trace.attentions[b, :, :, t - len(rows), pad:][..., future].abs().max() == 0
            columns = torch.nonzero(trace.text_mask[b, t - len(rows), pad:])[:, 0].tolist()
            assert columns == text[t]
            assert not set(columns) & set(image)


BASELINE_CHECKS = [  # the model-specific ones (the attention mask, the last layer's norm, the LM head)
    ("test_attention_equals_averaged_eager_weights", ()),
    ("test_rollout_equals_explicit_matrix_products", ()),
    ("test_chefercam_equals_per_token_loop", ()),
    ("test_gradcam_equals_per_token_loop", (-1,)),
    ("test_tam_equals_loop_reference", ("own",)),
    ("test_tam_equals_loop_reference", ("predicting",)),  # the authors' ECI indexing
]


@pytest.mark.parametrize("check,args", BASELINE_CHECKS, ids=[f"{c[5:]}{a}" for c, a in BASELINE_CHECKS])
def test_baselines_equal_their_naive_references(padded, check, args):
    """The LLaVA suite's loop-by-loop references of every baseline, run on the padded PaliGemma batch.

    Their text columns (``j ≤ p_t``, non-image) and rollout rows are the prefix-LM's too: ``p_t`` is at
    or after the last prefix token, so every prefix column is before it.
    """
    getattr(_baselines_module(), check)(padded, *args)


def _baselines_module():
    """``tests/methods/test_baselines.py``, the one pytest imported if it did (else loaded by path, so that
    this module also runs on its own)."""
    if "test_baselines" in sys.modules:
        return sys.modules["test_baselines"]
    path = Path(__file__).resolve().parents[1] / "methods" / "test_baselines.py"
    spec = importlib.util.spec_from_file_location("test_baselines", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["test_baselines"] = module
    spec.loader.exec_module(module)
    return module


FAST = {
    "dexar": DexAR(),
    "dexar_attn": DexAR(weight_by_attention=True),
    "attention": RawAttention(),
    "rollout": Rollout(),
    "gradcam": GradCAM(),
    "gradcam0": GradCAM(layer=0),
    "chefercam": CheferCAM(),
    "attngrad": AttnGrad(),
    "integrated_gradients": IntegratedGradients(steps=3, batch_size=3),
    "rise": Rise(num_masks=6, batch_size=6),
    "iia": IIA(steps=1),
    "tam": TAM(),
}


def test_every_method_runs_and_padded_batch_equals_one_by_one(pali64):
    explainer = Explainer(*pali64, FAST)
    samples = [
        Sample(id=str(i), image=im, prompt=p, answer=a)
        for i, (im, p, a) in enumerate(zip(_images(), PROMPTS, ANSWERS, strict=True))
    ]
    together = explainer.explain_samples(samples)
    for i, sample in enumerate(samples):
        alone = explainer.explain_samples([sample])
        for name in FAST:
            a, b = together[name][i], alone[name][0]
            assert a.token_maps.shape == (len(a.tokens), 4, 4) and a.sequence_map.shape == (4, 4), name
            assert torch.isfinite(a.token_maps).all() and torch.isfinite(a.sequence_map).all(), name
            assert (a.token_maps - b.token_maps).abs().max() <= 1e-10, name
            assert (a.token_weights - b.token_weights).abs().max() <= 1e-10, name
            assert (a.sequence_map - b.sequence_map).abs().max() <= 1e-10, name


def test_maps_come_back_in_the_original_image_geometry():
    """Only the top-right cell of a non-square image differs; DEX-AR's map singles out exactly that cell.

    The fixture makes each image token a function of its own patch only (no SigLIP layer, no position
    embeddings, one decoder layer): the image-column gradients ``g_j = δ · v_j`` are then equal on
    every cell holding the uniform background and differ only where the patch differs.
    """
    model, processor = random_paligemma(layers=1, vision_layers=0, grid=4, dtype=torch.float64, seed=3)
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.zero_()
    processor.image_processor.resample = Image.NEAREST  # cell borders stay sharp
    image = Image.new("RGB", (64, 48), (90, 90, 90))  # 4×4 cells of 16×12 px
    image.paste((250, 20, 20), (48, 0, 64, 12))  # the top-right cell (row 0, column 3)
    adapter = get_adapter(model, processor)
    prompt_ids, image_inputs = adapter.encode_prompts([image], ["Cap."])
    batch = adapter.build_batch(prompt_ids, [adapter.tokenize_answer("a red square")], image_inputs)
    trace = run_trace(adapter, batch)
    cells = trace.image_columns(trace.grads)[0].reshape(-1, 4, 4)  # (L·H·T, h, w)
    others = torch.ones(4, 4, dtype=torch.bool)
    others[0, 3] = False
    rest = cells[:, others]
    assert (rest - rest[:, :1]).abs().max() <= 1e-12 * cells.abs().max()
    assert (cells[:, 0, 3] - rest[:, 0]).abs().max() > 1e-3 * cells.abs().max()
    out = DexAR(filler_filter=False)(trace)
    token_maps = out.token_maps[0][~out.token_empty[0]]
    assert len(token_maps) > 0
    for m in token_maps:
        assert (m[others] - m[others][0]).abs().max() <= 1e-12 and m[0, 3] != m[others][0]
    up = Explainer(model, processor).explain_samples([Sample("g", image, "Cap.", "a red square")])["dexar"][0]
    full = up.upsample((48, 64)).sequence_map
    assert full.shape == (48, 64)
    change = (full - full[40, 8]).abs()  # departure from the background level
    assert change[:12, 48:].max() == change.max() > 0  # peaks in the top-right cell of the original image
    assert change[12:, :].max() < change.max() and change[:, :32].max() <= 1e-6  # upsampled in float32


def test_cli_explains_a_saved_tiny_checkpoint(tmp_path, capsys):
    model, processor = random_paligemma(hidden=32, layers=2, grid=4, dtype=torch.float32, seed=1)
    path = tmp_path / "tiny-paligemma"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    loaded, loaded_processor = load_model(path, dtype="float64")
    assert isinstance(get_adapter(loaded, loaded_processor), PaliGemmaAdapter)
    image_path = tmp_path / "image.png"
    _images()[0].save(image_path)
    out_dir = tmp_path / "out"
    args = ["explain", str(image_path), "--model", str(path), "--prompt", "Cap.", "--out", str(out_dir)]
    assert cli_main([*args, "--max-new-tokens", "4"]) == 0, capsys.readouterr().err
    assert (out_dir / "explanation.json").is_file() and (out_dir / "sequence.png").is_file()
    assert cli_main([*args, "--answer", "a red circle", "--method", "attngrad"]) == 0, capsys.readouterr().err


def test_answer_rows_rerun_equals_full_graph(padded, monkeypatch):
    """Gemma blocks are row-local: the answer-rows re-run gives the full-row graph's trace."""
    adapter, batch = padded
    assert adapter.row_local_layers
    calls = []
    rerun = instrument.rerun_answer_rows
    monkeypatch.setattr(instrument, "rerun_answer_rows", lambda *a, **k: calls.append(a[1]) or rerun(*a, **k))
    rows = run_trace(adapter, batch)
    assert calls == list(range(len(adapter.decoder_layers)))
    monkeypatch.setattr(type(adapter), "row_local_layers", False)
    full = run_trace(adapter, batch)
    assert rows.grads.abs().max() > 1e-3
    assert (rows.grads - full.grads).abs().max() <= 1e-12
    assert (rows.logit_lens - full.logit_lens).abs().max() <= 1e-12


class TestConformance(AdapterConformance):
    """The suite every family runs, on the padded prefix-LM batch's images (every size → one 4×4 grid)."""

    adapter_cls = PaliGemmaAdapter
    exact_lengths = (5, 2)
    methods_lengths = (4, 2)
    grid = (4, 4)
    distinct_grid_keys = 1

    @pytest.fixture
    def vlm(self, pali64):
        return pali64

    @pytest.fixture
    def family_samples(self):
        return _samples()


def _samples():
    return [
        Sample(id=str(i), image=im, prompt=p, answer=a)
        for i, (im, p, a) in enumerate(zip(_images(), PROMPTS, ANSWERS, strict=True))
    ]
