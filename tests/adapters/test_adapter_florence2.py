"""Florence-2 (encoder-decoder) adapter: DEX-AR over cross-attention == naive float64 reference, and the rest."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dexar import DexarInputError, load_model
from dexar.adapters import Florence2Adapter, get_adapter
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
from dexar.testing.florence2 import random_florence2
from dexar.testing.reference import REFERENCE_NAME, naive_dexar
from dexar.trace import run as run_trace
from dexar.trace.instrument import attn_implementation
from dexar.trace.plan import CROSS_NEEDS

COLORS = [(200, 30, 30), (30, 180, 60), (40, 60, 210)]
PROMPTS = ["<DETAILED_CAPTION>", "what is shown in the image ?", "<CAPTION>"]
ANSWERS = ["a red circle on the left", "blue", "a green square and a red triangle ."]


@pytest.fixture(scope="module")
def flo64():
    return random_florence2(hidden=32, encoder_layers=1, decoder_layers=2, heads=4, dtype=torch.float64, seed=0)


def _images():
    out = []
    for i, color in enumerate(COLORS):
        image = Image.new("RGB", (40 + 8 * i, 30), color)
        image.paste((255 - color[0], 255, 0), (4 * i, 3, 4 * i + 12, 15))
        out.append(image)
    return out


@pytest.fixture(scope="module")
def padded(flo64):
    adapter = get_adapter(*flo64)
    prompt_ids, image_inputs = adapter.encode_prompts(_images(), PROMPTS)
    batch = adapter.build_batch(prompt_ids, [adapter.tokenize_answer(a) for a in ANSWERS], image_inputs)
    assert (batch.inputs["attention_mask"] == 0).any() and (batch.inputs["decoder_attention_mask"] == 0).any()
    return adapter, batch


def naive_cross_grads(adapter, batch, index):
    """``∂y_t^l/∂C^l[:, p_t, :]`` by a textbook eager forward, one autograd call per layer and token.

    Returns:
        ``(grads, attentions, logits)``: ``(L, H, T_b, N_enc)`` twice over the unpadded sample, and
        the model's own ``(T_b,)`` logits of the answer tokens.

    """
    inputs = batch.sample_inputs(index)
    prefix = batch.prefix_length
    outputs = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
        for layer in adapter.decoder_layers
    ]
    for param in adapter.model.parameters():
        param.requires_grad_(True)  # nothing detached, nothing frozen
    try:
        with attn_implementation(adapter.text_config, REFERENCE_NAME), torch.enable_grad():
            out = adapter.model(**inputs, output_attentions=True, use_cache=False)
            cross = out.cross_attentions
            decoder = inputs["decoder_input_ids"][0]
            length = len(decoder) - prefix
            grads = torch.zeros(len(cross), cross[0].shape[1], length, cross[0].shape[-1], dtype=torch.float64)
            rows = torch.zeros_like(grads)
            for layer in range(len(cross)):
                for t in range(length):
                    p = prefix - 1 + t
                    y = (adapter.unembedding.weight[decoder[prefix + t]] * outputs[layer][0, p]).sum()
                    (g,) = torch.autograd.grad(y, cross[layer], retain_graph=True)
                    grads[layer, :, t] = g[0, :, p]
                    rows[layer, :, t] = cross[layer][0, :, p].detach()
            logits = out.logits[0, prefix - 1 : prefix - 1 + length].gather(-1, decoder[prefix:, None])[:, 0]
    finally:
        for h in hooks:
            h.remove()
        for param in adapter.model.parameters():
            param.requires_grad_(False)
    return grads, rows, logits.detach()


def test_adapter_registered_with_paper_prompt(flo64):
    adapter = get_adapter(*flo64)
    assert isinstance(adapter, Florence2Adapter) and adapter.paper_prompt == "<DETAILED_CAPTION>"
    assert adapter.decoder_prefix == [2, 0]  # </s> <s>, as BART decoders start


def check_cross_attention_trace_equals_naive_reference(padded):
    """Run by :meth:`TestConformance.test_one_pass_matches_naive_reference` (the suite's exactness check)."""
    adapter, batch = padded
    trace = run_trace(adapter, batch)
    out = DexAR()(trace)
    h, w = batch.image_grid
    nonzero = 0
    for b in range(3):
        ref_g, ref_a, logits = naive_cross_grads(adapter, batch, b)
        length = int(batch.answer_lengths[b])
        ids = batch.sample_inputs(b)["input_ids"][0]
        n = len(ids)  # the encoder is right-padded: the sample's columns come first
        assert ref_g.abs().max() > 1e-3
        assert (trace.grads[b, :, :, -length:, :n] - ref_g).abs().max() <= 1e-10
        assert (trace.attentions[b, :, :, -length:, :n] - ref_a).abs().max() <= 1e-10
        # the last layer's logit lens is the model's own logit (no final norm in BART's decoder)
        assert (trace.logit_lens[b, -1, -length:] - logits).abs().max() <= 1e-10
        image_tokens = [j for j in range(n) if ids[j] == adapter.image_token_id]
        grid = image_tokens[1:]  # the projector's order: the grid mean first, then the grid
        assert len(grid) == h * w and trace.image_index[b].tolist() == grid
        text = [j for j in range(n) if ids[j] != adapter.image_token_id]  # <s> prompt </s>
        maps, weights, seq = naive_dexar(ref_g, torch.tensor(grid), [text] * length, (h, w))
        assert (out.token_maps[b, -length:] - maps).abs().max() <= 1e-10
        assert (out.token_weights[b, -length:] - weights).abs().max() <= 1e-10
        assert (out.sequence_map[b] - seq).abs().max() <= 1e-10
        nonzero += int(maps.abs().max() > 0)
    assert nonzero >= 2
    assert trace.grads[1, :, :, : -int(batch.answer_lengths[1])].abs().max() == 0  # padding slots


SUPPORTED = {
    "dexar": DexAR(),
    "dexar_attn": DexAR(weight_by_attention=True),
    "attention": RawAttention(),
    "attngrad": AttnGrad(),
    "integrated_gradients": IntegratedGradients(steps=3, batch_size=3),
    "rise": Rise(num_masks=6, batch_size=6),
}


def test_supported_methods_run_and_padded_batch_equals_one_by_one(flo64):
    explainer = Explainer(*flo64, SUPPORTED)
    samples = [
        Sample(id=str(i), image=im, prompt=p, answer=a)
        for i, (im, p, a) in enumerate(zip(_images(), PROMPTS, ANSWERS, strict=True))
    ]
    together = explainer.explain_samples(samples)
    for i, sample in enumerate(samples):
        alone = explainer.explain_samples([sample])
        for name in SUPPORTED:
            a, b = together[name][i], alone[name][0]
            assert a.token_maps.shape == (len(a.tokens), 4, 4) and a.sequence_map.shape == (4, 4), name
            assert torch.isfinite(a.token_maps).all() and torch.isfinite(a.sequence_map).all(), name
            assert (a.token_maps - b.token_maps).abs().max() <= 1e-10, name
            assert (a.token_weights - b.token_weights).abs().max() <= 1e-10, name
            assert (a.sequence_map - b.sequence_map).abs().max() <= 1e-10, name
            assert a.answer_positions.tolist() == list(range(2, 2 + len(a.tokens)))  # in decoder_input_ids
            assert a.inputs["decoder_input_ids"][0, 2:].tolist() == a.token_ids


@pytest.mark.parametrize("method", [Rollout(), CheferCAM(), IIA(steps=1), GradCAM(), TAM()], ids=lambda m: m.name)
def test_self_attention_methods_are_refused_in_one_line(flo64, padded, method):
    with pytest.raises(DexarInputError, match=f"^{method.name} is not supported for Florence-2") as err:
        Explainer(*flo64, {method.name: method})
    assert "\n" not in str(err.value)
    if method.needs != {"extra_forwards"}:  # the tracer knows needs, not methods: it names the needs it refuses
        adapter, batch = padded
        with pytest.raises(DexarInputError, match="not supported for an encoder-decoder's cross-attention") as err:
            run_trace(adapter, batch, method.needs)
        refused = sorted(method.needs - CROSS_NEEDS)
        assert refused and str(refused) in str(err.value) and "\n" not in str(err.value)


def test_maps_come_back_in_the_original_image_geometry():
    """Only the top-right cell of a non-square image differs; the cross-attention map singles it out.

    Each encoder image position is made a function of its own 8×8 cell: non-overlapping patch
    convolutions and no DaViT block, no 2-D position embedding, no encoder layer and no encoder
    positions; one decoder layer, so ``g_j = δ · v_j`` differs only where the cell differs.
    """
    model, processor = random_florence2(
        encoder_layers=0, decoder_layers=1, vision_depths=(0, 0), vision_kernels=(4, 2), dtype=torch.float64, seed=3
    )
    with torch.no_grad():
        projector = model.model.multi_modal_projector.image_position_embed
        projector.row_embeddings.weight.zero_()
        projector.column_embeddings.weight.zero_()
        model.model.language_model.encoder.embed_positions.weight.zero_()
    processor.image_processor.resample = Image.NEAREST  # cell borders stay sharp
    image = Image.new("RGB", (64, 48), (90, 90, 90))  # 4×4 cells of 16×12 px
    image.paste((250, 20, 20), (48, 0, 64, 12))  # the top-right cell (row 0, column 3)
    adapter = get_adapter(model, processor)
    prompt_ids, image_inputs = adapter.encode_prompts([image], ["<DETAILED_CAPTION>"])
    batch = adapter.build_batch(prompt_ids, [adapter.tokenize_answer("a red square")], image_inputs)
    trace = run_trace(adapter, batch)
    cells = trace.image_columns(trace.grads)[0].reshape(-1, 4, 4)  # (L·H·T, h, w)
    others = torch.ones(4, 4, dtype=torch.bool)
    others[0, 3] = False
    rest = cells[:, others]
    assert (rest - rest[:, :1]).abs().max() <= 1e-12 * cells.abs().max()
    assert (cells[:, 0, 3] - rest[:, 0]).abs().max() > 1e-3 * cells.abs().max()
    sample = Sample("g", image, "<DETAILED_CAPTION>", "a red square")
    for method in (DexAR(filler_filter=False), AttnGrad()):
        explanation = Explainer(model, processor, {"m": method}).explain_samples([sample])["m"][0]
        maps = explanation.token_maps[~explanation.token_empty]
        assert len(maps) > 0
        for m in maps:
            assert (m[others] - m[others][0]).abs().max() <= 1e-12 and m[0, 3] != m[others][0]
        full = explanation.upsample((48, 64)).sequence_map
        change = (full - full[40, 8]).abs()
        assert change[:12, 48:].max() == change.max() > 0  # peaks in the top-right cell of the original image
        assert change[:, :32].max() <= 1e-6


def test_cli_explains_a_saved_tiny_checkpoint(tmp_path, capsys):
    model, processor = random_florence2(dtype=torch.float32, seed=1)
    path = tmp_path / "tiny-florence2"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    loaded, loaded_processor = load_model(path, dtype="float64")
    assert isinstance(get_adapter(loaded, loaded_processor), Florence2Adapter)
    image_path = tmp_path / "image.png"
    _images()[0].save(image_path)
    out_dir = tmp_path / "out"
    args = ["explain", str(image_path), "--model", str(path), "--prompt", "<DETAILED_CAPTION>", "--out", str(out_dir)]
    assert cli_main([*args, "--max-new-tokens", "4"]) == 0, capsys.readouterr().err
    assert (out_dir / "explanation.json").is_file() and (out_dir / "sequence.png").is_file()
    assert cli_main([*args, "--answer", "a red circle", "--method", "attention"]) == 0, capsys.readouterr().err
    assert cli_main([*args, "--answer", "a red circle", "--method", "rollout"]) == 2
    assert "rollout is not supported for Florence-2" in capsys.readouterr().err


def test_perturbation_curves_score_the_encoder_prompt(flo64):
    """Perturbation re-encodes the whole encoder prompt: the unperturbed point is the explained perplexity."""
    from dexar.perturbation import answer_perplexity, explanation_curves

    explainer = Explainer(*flo64, {"dexar": DexAR()})
    sample = Sample(id="0", image=_images()[0], prompt=PROMPTS[0], answer=ANSWERS[0])
    exp = explainer.explain_samples([sample])["dexar"][0]
    adapter = explainer.adapter
    prompt = adapter.explained_prompt_ids(exp.inputs, exp.answer_positions)
    assert prompt == exp.inputs["input_ids"][0][exp.inputs["attention_mask"][0].bool()].tolist()
    assert len(prompt) > len(adapter.decoder_prefix)
    curves = explanation_curves(adapter, exp, modes=("positive",), levels=[0.0, 0.5])
    direct = answer_perplexity(adapter, prompt, exp.token_ids, exp.inputs["pixel_values"])
    assert torch.isclose(curves["positive"].ppl[0], direct.reshape(-1)[0].to(curves["positive"].ppl.dtype), rtol=1e-9)


class TestConformance(AdapterConformance):
    """The suite every family runs; exactness against the cross-attention reference (:func:`naive_cross_grads`)."""

    adapter_cls = Florence2Adapter
    exact_lengths = (5, 2)
    methods_lengths = (4, 2)
    grid = (4, 4)
    distinct_grid_keys = 1

    @pytest.fixture
    def vlm(self, flo64):
        return flo64

    @pytest.fixture
    def family_samples(self):
        return [
            Sample(id=str(i), image=im, prompt=p, answer=a)
            for i, (im, p, a) in enumerate(zip(_images(), PROMPTS, ANSWERS, strict=True))
        ]

    def test_one_pass_matches_naive_reference(self, padded):
        """The decoder's cross-attention ``g_t^l``, rows and logit lens == the textbook eager forward (appendix D)."""
        check_cross_attention_trace_equals_naive_reference(padded)
