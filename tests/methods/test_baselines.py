"""Baselines against naive, line-by-line references of their equations (float64, tiny random LLaVA)."""

from __future__ import annotations

import pytest
import torch

from dexar import SHAPES_CHECKPOINT, DexarInputError, load_model
from dexar.adapters import get_adapter
from dexar.explain import Explainer
from dexar.methods import (
    IIA,
    METHODS,
    TAM,
    AttnGrad,
    CheferCAM,
    DexAR,
    GradCAM,
    IntegratedGradients,
    RawAttention,
    Rise,
    Rollout,
    build_method,
)
from dexar.methods.rise import rise_masks
from dexar.testing.llava import random_llava
from dexar.testing.reference import (
    _textbook_forward,
    naive_attentions,
    naive_final_logit_grads,
    naive_hidden_grads,
    naive_iia,
    naive_integrated_gradients,
    naive_last_norm_grads,
    naive_layer_grads,
    naive_log_probs,
)
from dexar.trace import hidden_grads_need
from dexar.trace import run as run_trace

LENGTHS = [9, 1, 5]  # three samples, left-padded against each other


def _batch(model, processor, samples, lengths):
    adapter = get_adapter(model, processor)
    answers = [adapter.tokenize_answer(s.answer)[:n] for s, n in zip(samples, lengths, strict=True)]
    prompt_ids, image_inputs = adapter.encode_prompts([s.image for s in samples], [s.prompt for s in samples])
    return adapter, adapter.build_batch(prompt_ids, answers, image_inputs)


@pytest.fixture(scope="module")
def bundled64():
    try:
        return load_model(SHAPES_CHECKPOINT, dtype="float64")
    except DexarInputError as err:  # the checkpoint is built by the Shapes training run
        pytest.skip(f"bundled Shapes checkpoint not available: {err}")


@pytest.fixture(scope="module", params=["tiny64", "bundled64"])
def padded(request, samples):
    model, processor = request.getfixturevalue(request.param)
    adapter, batch = _batch(model, processor, samples[:3], LENGTHS)
    assert (batch.inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
    return adapter, batch


def _layout(adapter, batch, b):
    """Image positions, predicting positions p_t and answer length of sample b (unpadded sequence)."""
    ids = batch.sample_inputs(b)["input_ids"][0]
    length = int(batch.answer_lengths[b])
    image = [int(j) for j in torch.nonzero(ids == adapter.image_token_id)[:, 0]]
    rows = [len(ids) - length - 1 + t for t in range(length)]
    return image, rows, length


def _minmax(x):
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def _assert_maps(out, b, raw, weights=None, tol=1e-10):
    """raw: per-token lists of image-column values (loop reference); weights default to 1."""
    length = len(raw)
    maps = torch.stack([_minmax(torch.tensor(r, dtype=torch.float64)) for r in raw])
    weights = torch.ones(length, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    seq = _minmax((weights[:, None] * maps).sum(0))
    assert (out.token_maps[b, -length:].flatten(1) - maps).abs().max() <= tol
    assert (out.token_weights[b, -length:] - weights).abs().max() <= 1e-10
    assert (out.sequence_map[b].flatten() - seq).abs().max() <= tol
    assert (out.token_weights[b, :-length] == 0).all()  # padding slots
    assert maps.abs().max() > 0


def test_attention_equals_averaged_eager_weights(padded):
    adapter, batch = padded
    out = RawAttention()(run_trace(adapter, batch, RawAttention.needs))
    for b in range(3):
        attn = naive_attentions(adapter, batch, b)  # (L, H, N, N)
        image, rows, _ = _layout(adapter, batch, b)
        n_layers, n_heads = attn.shape[:2]
        raw = []
        for p in rows:
            raw.append(
                [
                    sum(
                        sum(float(attn[layer, head, p, j]) for head in range(n_heads)) / n_heads
                        for layer in range(n_layers)
                    )
                    for j in image
                ]
            )
        _assert_maps(out, b, raw)


def test_rollout_equals_explicit_matrix_products(padded):
    adapter, batch = padded
    trace = run_trace(adapter, batch, Rollout.needs)
    assert trace.grads is None and trace.final_grad_rollout is None
    out = Rollout()(trace)
    for b in range(3):
        attn = naive_attentions(adapter, batch, b)
        image, rows, _ = _layout(adapter, batch, b)
        n = attn.shape[-1]
        eye = torch.eye(n, dtype=torch.float64)
        rollout = eye
        for layer in range(attn.shape[0]):  # R = Â^L ⋯ Â^1
            a_hat = attn[layer].mean(0) + eye
            a_hat = a_hat / a_hat.sum(-1, keepdim=True)
            rollout = a_hat @ rollout
        _assert_maps(out, b, [[float(rollout[p, j]) for j in image] for p in rows])


def test_chefercam_equals_per_token_loop(padded):
    adapter, batch = padded
    out = CheferCAM()(run_trace(adapter, batch, CheferCAM.needs, grad_chunk=2))
    for b in range(3):
        grads, attn = naive_final_logit_grads(adapter, batch, b)  # one autograd call per token
        image, rows, length = _layout(adapter, batch, b)
        raw = []
        for t in range(length):
            relevance = torch.eye(attn.shape[-1], dtype=torch.float64)
            for layer in range(attn.shape[0]):
                cam = (grads[t, layer] * attn[layer]).clamp(min=0).mean(0)
                relevance = relevance + cam @ relevance
            raw.append([float(relevance[rows[t], j]) for j in image])
        _assert_maps(out, b, raw)


@pytest.mark.parametrize("layer", [-1, 1, 0])
def test_gradcam_equals_per_token_loop(padded, layer):
    adapter, batch = padded
    method = GradCAM(layer=layer)
    trace = run_trace(adapter, batch, method.needs)
    out = method(trace)
    k = layer % len(adapter.decoder_layers)
    for b in range(3):
        if k == len(adapter.decoder_layers) - 1:  # the last layer's normalised input (its input_layernorm output)
            grads, hidden = naive_last_norm_grads(adapter, batch, b)  # one autograd call per token
        else:
            grads, hidden = naive_hidden_grads(adapter, batch, b, layer)
        image, _, length = _layout(adapter, batch, b)
        product = (grads[:, image] * hidden[image]).sum(-1)
        scale = (grads[:, image] * hidden[image]).abs().sum(-1).max()  # the summands' size
        assert (trace.grad_x_hidden[k][b, -length:] - product).abs().max() <= 1e-10 * scale
        raw = [[max(float((grads[t, j] * hidden[j]).sum()), 0.0) for j in image] for t in range(length)]
        _assert_maps(out, b, raw)


def test_attngrad_equals_naive_layer_grads(padded):
    adapter, batch = padded
    out = AttnGrad()(run_trace(adapter, batch, AttnGrad.needs))
    for b in range(3):
        grads, attn = naive_layer_grads(adapter, batch, b)  # (L, H, T, N)
        image, _, length = _layout(adapter, batch, b)
        n_layers, n_heads = grads.shape[:2]
        raw = []
        for t in range(length):
            row = []
            for j in image:
                total = 0.0
                for layer in range(n_layers):
                    heads = [max(float(attn[layer, h, t, j] * grads[layer, h, t, j]), 0.0) for h in range(n_heads)]
                    total += sum(heads) / n_heads
                row.append(total)
            raw.append(row)
        _assert_maps(out, b, raw)


def test_dexar_weight_by_attention_equals_loop(padded):
    adapter, batch = padded
    out = DexAR(weight_by_attention=True)(run_trace(adapter, batch))
    for b in range(3):
        grads, attn = naive_layer_grads(adapter, batch, b)
        image, rows, length = _layout(adapter, batch, b)
        ids = batch.sample_inputs(b)["input_ids"][0]
        n_layers, n_heads = grads.shape[:2]
        raw, weights = [], []
        for t in range(length):
            text = [j for j in range(rows[t] + 1) if ids[j] != adapter.image_token_id]
            row = [0.0] * len(image)
            best_v = best_t = 0.0
            for layer in range(n_layers):
                for head in range(n_heads):
                    g, a = grads[layer, head, t], attn[layer, head, t]
                    m_v = max(max(float(g[j]), 0.0) for j in image)
                    m_t = max([max(float(g[j]), 0.0) for j in text] or [0.0])
                    w = max(m_v - m_t, 0.0)
                    for i, j in enumerate(image):
                        row[i] += w * float(a[j]) * max(float(g[j]), 0.0)  # A ⊙ ReLU(∇A)
                    best_v, best_t = max(best_v, m_v), max(best_t, m_t)
            raw.append(row)
            weights.append(max(best_v - best_t, 0.0))
        _assert_maps(out, b, raw, weights)


def test_one_forward_serves_every_need_and_equals_separate_traces(padded):
    """final_logit_grads keeps the graph; layer_grads from the same forward equal the detached trace."""
    adapter, batch = padded
    base = run_trace(adapter, batch)
    assert base.full_attention is None and base.final_grad_rollout is None and base.final_hidden is None
    every = {"attention_rows", "layer_grads", "full_attention", "final_logit_grads", "hidden_states"}
    every |= {hidden_grads_need(-1), hidden_grads_need(0)}
    last = len(adapter.decoder_layers) - 1
    together = run_trace(adapter, batch, every)
    assert (together.grads - base.grads).abs().max() <= 1e-10
    assert (together.attentions - base.attentions).abs().max() <= 1e-10
    assert (together.logit_lens - base.logit_lens).abs().max() <= 1e-10
    one_by_one = run_trace(adapter, batch, {"final_logit_grads"}, grad_chunk=1)
    assert (together.final_grad_rollout - one_by_one.final_grad_rollout).abs().max() <= 1e-10
    alone = run_trace(adapter, batch, {hidden_grads_need(-1), "layer_grads"})
    assert (together.grad_x_hidden[last] - alone.grad_x_hidden[last]).abs().max() <= 1e-10
    assert (together.grads - alone.grads).abs().max() <= 1e-10
    assert (together.full_attention - run_trace(adapter, batch, {"full_attention"}).full_attention).abs().max() <= 1e-10


def test_every_method_is_registered():
    expected = {"dexar", "attention", "rollout", "gradcam", "chefercam", "attngrad"}
    expected |= {"integrated_gradients", "rise", "iia", "tam"}
    assert expected <= set(METHODS)
    for name in expected:
        assert build_method(name).name == name


FAST = {
    "dexar": DexAR(),
    "dexar_attn": DexAR(weight_by_attention=True),
    "attention": RawAttention(),
    "rollout": Rollout(),
    "gradcam": GradCAM(),
    "gradcam0": GradCAM(layer=0),
    "chefercam": CheferCAM(),
    "attngrad": AttnGrad(),
}
SLOW = {
    "integrated_gradients": IntegratedGradients(steps=4, batch_size=3),
    "rise": Rise(num_masks=12, batch_size=5),
    "iia": IIA(steps=1),
    "tam": TAM(),
}


@pytest.mark.parametrize("methods", [FAST, SLOW], ids=["one-trace", "extra-forwards"])
@pytest.mark.parametrize("model", ["tiny64", "bundled64"])
def test_padded_batch_equals_one_by_one(request, samples, methods, model):
    explainer = Explainer(*request.getfixturevalue(model), methods)
    together = explainer.explain_samples(samples[:3])
    for i, sample in enumerate(samples[:3]):
        alone = explainer.explain_samples([sample])
        for name in methods:
            a, b = together[name][i], alone[name][0]
            assert a.tokens == b.tokens
            assert (a.token_maps - b.token_maps).abs().max() <= 1e-10, name
            assert (a.token_weights - b.token_weights).abs().max() <= 1e-10, name
            assert (a.sequence_map - b.sequence_map).abs().max() <= 1e-10, name


# --- methods with extra forwards -------------------------------------------------------------------


@pytest.fixture(scope="module")
def smooth64():
    """A random LLaVA with halved weights: smooth enough along a straight pixel path for 64-step IG."""
    model, processor = random_llava(hidden=32, layers=3, heads=4, kv_heads=2, grid=4, dtype=torch.float64, seed=2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.mul_(0.5)
    return model, processor


def test_integrated_gradients_completeness_at_64_steps(smooth64, samples):
    # Not on the bundled model: its answer log-likelihoods jump within α ≈ 0.05 of the mean image
    # (e.g. -15 → 0 nats), which no 64-point uniform rule resolves (IG's quadrature, not its gradients).
    adapter, batch = _batch(*smooth64, samples[:3], LENGTHS)
    trace = run_trace(adapter, batch, IntegratedGradients.needs)
    per_token = IntegratedGradients(steps=64, batch_size=32, per_token=True).attributions(trace)
    answer = IntegratedGradients(steps=64, batch_size=32).attributions(trace)  # the answer's log-likelihood
    for b in range(3):
        length = int(batch.answer_lengths[b])
        gain = naive_log_probs(adapter, batch, b) - naive_log_probs(
            adapter, batch, b, torch.zeros_like(batch.inputs["pixel_values"][b : b + 1])
        )
        total = per_token[b, -length:].sum(-1)
        assert ((total - gain).abs() <= 0.01 * gain.abs()).all(), (total, gain)
        assert (per_token[b, :-length] == 0).all()
        assert (answer[b, -length:].sum(-1) - gain.sum()).abs().max() <= 0.01 * gain.sum().abs()


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_integrated_gradients_equals_point_by_point_loop(padded, spacing):
    adapter, batch = padded
    steps = 3
    u = [(i + 0.5) / steps for i in range(steps)]
    alphas, weights = (
        (u, [1 / steps] * steps) if spacing == "uniform" else ([v * v for v in u], [2 * v / steps for v in u])
    )
    method = IntegratedGradients(steps=steps, batch_size=2, spacing=spacing)
    out = method.attributions(run_trace(adapter, batch, IntegratedGradients.needs))
    h, w = batch.image_grid
    for b in range(3):
        pixel_map = naive_integrated_gradients(adapter, batch, b, alphas, weights).sum(0)  # over channels
        ph, pw = pixel_map.shape[0] // h, pixel_map.shape[1] // w
        expect = pixel_map.view(h, ph, w, pw).sum((1, 3)).flatten()
        length = int(batch.answer_lengths[b])
        for t in range(length):  # every token gets the answer's map
            assert (out[b, t - length] - expect).abs().max() <= 1e-6 * expect.abs().max()
    with pytest.raises(ValueError, match="spacing must be one of"):
        IntegratedGradients(spacing="log")


def test_integrated_gradients_of_the_answer_is_the_sum_over_tokens(padded):
    adapter, batch = padded
    trace = run_trace(adapter, batch, IntegratedGradients.needs)
    per_token = IntegratedGradients(steps=3, per_token=True).attributions(trace)
    answer = IntegratedGradients(steps=3, per_token=False).attributions(trace)
    for b in range(3):
        length = int(batch.answer_lengths[b])
        expect = per_token[b, -length:].sum(0)
        # HF's LlamaRMSNorm computes in float32 even in a float64 model: batched and summed
        # backwards round differently there (~1e-7 relative).
        assert (answer[b, -length:] - expect).abs().max() <= 1e-5 * expect.abs().max()


def test_rise_equals_mask_by_mask_loop_and_is_seeded(padded):
    adapter, batch = padded
    trace = run_trace(adapter, batch, Rise.needs)
    method = Rise(num_masks=6, cells=3, batch_size=4, seed=7)
    saliency = method.saliency(trace)
    assert torch.equal(saliency, method.saliency(trace))  # seeded: a rerun is bit-identical
    # batch_size only regroups the masked forwards. MKL's float64 GEMM is not batch-invariant: a row of
    # (4·17, 32) @ (32, 32) differs in the last bit from the same row of (17, 32) @ (32, 32) (every one of
    # 200 random draws), so 4 + 2 vs 5 + 1 masked copies round differently (8.9e-16 measured on sample 9;
    # the first differing op is the vision tower's q_proj). Exact up to float64 rounding, not bitwise.
    other = Rise(num_masks=6, cells=3, batch_size=5, seed=7).saliency(trace)
    assert (saliency - other).abs().max() <= 1e-13 * saliency.abs().max()
    assert not torch.equal(saliency, Rise(num_masks=6, cells=3, seed=8).saliency(trace))
    pixels = batch.inputs["pixel_values"]
    masks = rise_masks(6, 3, 0.5, tuple(pixels.shape[-2:]), seed=7)
    assert masks.shape == (6, *pixels.shape[-2:]) and 0 <= masks.min() and masks.max() <= 1 + 1e-12
    h, w = trace.grid
    ph, pw = pixels.shape[-2] // h, pixels.shape[-1] // w
    for b in range(3):
        length = int(batch.answer_lengths[b])
        scores = [naive_log_probs(adapter, batch, b, (pixels[b] * m)[None]) for m in masks]  # one forward each
        for t in range(length):
            pixel_map = sum(s[t] * m for s, m in zip(scores, masks, strict=True)) / masks.sum(0)
            for i in range(h):
                for j in range(w):
                    expect = pixel_map[i * ph : (i + 1) * ph, j * pw : (j + 1) * pw].mean()
                    assert abs(float(saliency[b, t - length, i * w + j]) - float(expect)) <= 1e-10


@pytest.mark.parametrize("model", ["tiny64", "bundled64"])
def test_iia_equals_loop_over_paths_and_tokens(request, samples, model):
    adapter, batch = _batch(*request.getfixturevalue(model), samples[:3], [4, 1, 2])
    out = IIA(steps=1, per_token=True)(run_trace(adapter, batch, IIA.needs))
    for b in range(3):
        cams = naive_iia(adapter, batch, b, steps=1)  # (T, L, N, N)
        image, rows, length = _layout(adapter, batch, b)
        eye = torch.eye(cams.shape[-1], dtype=torch.float64)
        raw = []
        for t in range(length):
            rollout = eye
            for layer in range(cams.shape[1]):
                a_hat = cams[t, layer] + eye
                rollout = (a_hat / a_hat.sum(-1, keepdim=True)) @ rollout
            raw.append([float(rollout[rows[t], j]) for j in image])
        _assert_maps(out, b, raw)


def _loop_rank_gaussian(grid):
    """TAM's rank Gaussian filter, pixel by pixel (3×3, reflect padding)."""
    h, w = len(grid), len(grid[0])

    def reflect(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    out = [[0.0] * w for _ in range(h)]
    for i in range(h):
        for j in range(w):
            window = sorted(grid[reflect(i + di, h)][reflect(j + dj, w)] for di in (-1, 0, 1) for dj in (-1, 0, 1))
            mean = sum(window) / 9
            if mean <= 0:
                continue
            sigma = (sum((v - mean) ** 2 for v in window) / 9) ** 0.5 / mean
            if sigma == 0:
                out[i][j] = window[4]
                continue
            kernel = [torch.exp(torch.tensor(-((r - 4) ** 2) / (2 * sigma**2), dtype=torch.float64)) for r in range(9)]
            out[i][j] = float(sum(v * k for v, k in zip(window, kernel, strict=True)) / sum(kernel))
    return out


@pytest.mark.parametrize("context_weight", ["own", "predicting"])
def test_tam_equals_loop_reference(padded, context_weight):
    """``predicting`` (the authors' indexing): an earlier answer token at c is weighed by a_t(c − 1)."""
    adapter, batch = padded
    out = TAM(context_weight=context_weight)(run_trace(adapter, batch, TAM.needs))
    for b in range(3):
        with torch.no_grad():
            logits = _textbook_forward(adapter, batch, b)[0].logits[0]  # U·norm(h^L) + b at every position
        ids = batch.sample_inputs(b)["input_ids"][0].tolist()
        image, rows, length = _layout(adapter, batch, b)
        h, w = out.token_maps.shape[-2:]
        raw = []
        for t in range(length):
            word = ids[rows[t] + 1]
            own = [max(float(logits[j, word]), 0.0) for j in image]
            window = range(max(image) + 1, rows[t] + 1)
            context = [c for c in window if ids[c] != word]
            first_answer = rows[0] + 1
            source = [c - 1 if context_weight == "predicting" and c >= first_answer else c for c in context]
            weights = [max(float(logits[q, word]), 0.0) for q in source]
            norm = sum(weights) + 1e-8
            interference = [0.0] * len(image)
            for c, wgt in zip(context, weights, strict=True):
                for i, j in enumerate(image):
                    interference[i] += wgt / norm * max(float(logits[j, ids[c]]), 0.0)
            energy = sum(v * v for v in interference)
            kappa = sum(a * v for a, v in zip(own, interference, strict=True)) / energy if energy > 0 else 0.0
            own = [max(a - kappa * v, 0.0) for a, v in zip(own, interference, strict=True)]
            text = [max(float(logits[j, word]), 0.0) for j in window if j != rows[t]]
            lo, hi = min(own + text), max(own + text)
            normed = [(a - lo) / (hi - lo) if hi > lo else 0.0 for a in own]
            smoothed = _loop_rank_gaussian([normed[r * w : (r + 1) * w] for r in range(h)])
            raw.append([v for row in smoothed for v in row])
        _assert_maps(out, b, raw)


def test_tam_authors_indexing_changes_maps_of_later_tokens_only(padded):
    """The option moves the ECI weight of earlier answer tokens: the first answer token is unchanged."""
    adapter, batch = padded
    trace = run_trace(adapter, batch, TAM.needs)
    own, authors = TAM()(trace), TAM(context_weight="predicting")(trace)
    first = batch.answer_ids.shape[1] - batch.answer_lengths  # slot of each sample's first answer token
    rows = torch.arange(len(first))
    assert torch.equal(own.token_maps[rows, first], authors.token_maps[rows, first])
    assert not torch.allclose(own.token_maps, authors.token_maps)
    with pytest.raises(ValueError, match="context_weight"):
        TAM(context_weight="next")
