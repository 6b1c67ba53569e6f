"""Slow, obviously-correct references used by the tests and benchmarks.

The naive DEX-AR gradient: a full eager forward (no detaching, full attention tensors), then one
``autograd.grad`` call per layer and answer token of ``y_t^l`` w.r.t. the whole ``A^l``.

Independent of the tracer under test: the attention is the textbook ``softmax(QKᵀ·s + M) V`` and the
mask ``M`` is the one transformers itself builds for eager attention (``eager_mask``: causal, padding,
PaliGemma's bidirectional prefix), added as it is: no masking logic of its own, none of
:mod:`dexar.trace.attention`'s. It is not the model's own eager attention function: the decoders'
(Llama, Qwen2, Gemma) compute the softmax in float32, so in a float64 model their gradients are ~1e-7
(relative) off the exact ones, too coarse for the ≤ 1e-10 checks (the textbook form agrees with the tracer to
~1e-16). The one helper shared with the tracer switches ``config._attn_implementation`` and restores it.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from dexar.adapters.base import TeacherForcedBatch, VLMAdapter
from dexar.trace.instrument import attn_implementation

REFERENCE_NAME = "dexar_reference_eager"


def reference_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Textbook attention in the input dtype (no float32 softmax), the eager mask added; returns the probabilities."""
    groups = getattr(module, "num_key_value_groups", 1)
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = query @ key.transpose(-1, -2) * scale
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1)
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(REFERENCE_NAME, reference_attention_forward)
AttentionMaskInterface.register(REFERENCE_NAME, eager_mask)


def naive_layer_grads(adapter: VLMAdapter, batch: TeacherForcedBatch, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``g_t^l`` and ``A^l[:, p_t, :]`` for sample ``index`` of ``batch``, computed naively.

    Returns:
        ``(grads, attentions)``, each ``(L, H, T_b, N_b)`` over the sample's unpadded sequence.

    """
    model = adapter.model
    inputs = batch.sample_inputs(index)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    n = inputs["input_ids"].shape[1]
    length = int(batch.answer_lengths[index])
    answer = inputs["input_ids"][0, n - length :]
    layers = adapter.decoder_layers
    outputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
        for layer in layers
    ]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(True)  # nothing detached, nothing frozen: the textbook graph
    try:
        with attn_implementation(adapter.text_config, REFERENCE_NAME), torch.enable_grad():
            out = adapter.model.model(**inputs, output_attentions=True, use_cache=False)
            attentions = out.attentions
            grads = torch.zeros(
                len(layers), attentions[0].shape[1], length, n, dtype=attentions[0].dtype, device=device
            )
            rows = torch.zeros_like(grads)
            for layer in range(len(layers)):
                for t in range(length):
                    p = n - length - 1 + t  # the position predicting answer token t
                    h = adapter.final_norm(outputs[layer][0, p])
                    y = (adapter.unembedding.weight[answer[t]] * h).sum()
                    if getattr(adapter.unembedding, "bias", None) is not None:
                        y = y + adapter.unembedding.bias[answer[t]]
                    (g,) = torch.autograd.grad(y, attentions[layer], retain_graph=True)
                    grads[layer, :, t] = g[0, :, p]
                    rows[layer, :, t] = attentions[layer][0, :, p].detach()
    finally:
        for h in handles:
            h.remove()
        for param, flag in flags:
            param.requires_grad_(flag)
    return grads, rows


def naive_aggregate(values: list[float], mode: str) -> float:
    """A head filter's aggregation of a Python list of non-negative values (0 for an empty list)."""
    if not values:
        return 0.0
    if mode == "max":
        return max(values)
    if mode == "avg":
        return sum(values) / len(values)
    p = float(mode[4:])  # top-p: mean of the ceil(p·n) largest, at least one
    k = max(1, math.ceil(p * len(values) - 1e-9))
    return sum(sorted(values, reverse=True)[:k]) / k


def naive_dexar(
    grads: torch.Tensor,
    image_positions: torch.Tensor,
    text_positions: list[list[int]],
    grid: tuple[int, int],
    relu: bool = True,
    filler_filter: bool = True,
    head_filter: str = "max",
    layers: str = "all",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DEX-AR written loop by loop over tokens, layers, heads and columns, in Python floats.

    ``m_V``, ``m_T`` aggregate one head's positive image / text gradients with ``head_filter``
    (``none``: head weight 1, ``max`` for λ); ``λ_t = ReLU(max_{l,h} m_V − max_{l,h} m_T)``.

    Args:
        grads: ``(L, H, T, N)`` from :func:`naive_layer_grads`.
        image_positions: ``(V,)`` image columns in grid order.
        text_positions: Per answer token, the text columns of its predicting row.
        grid: ``(h, w)``.
        relu: Apply ReLU to the image gradients in the map.
        filler_filter: Token weights λ_t (else 1).
        head_filter: ``max``, ``avg``, ``none`` or ``top-p``.
        layers: ``all`` or ``last``.

    Returns:
        ``(token_maps (T, h, w), token_weights (T,), sequence_map (h, w))``.

    """
    n_layers, n_heads, length, _ = grads.shape
    mode = "max" if head_filter == "none" else head_filter
    layer_ids = range(n_layers) if layers == "all" else [n_layers - 1]
    maps, weights = [], []
    for t in range(length):
        raw = [0.0] * len(image_positions)
        best_v, best_t = 0.0, 0.0
        for layer in layer_ids:
            for head in range(n_heads):
                g = [float(x) for x in grads[layer, head, t]]
                g_v = [g[int(j)] for j in image_positions]
                m_v = naive_aggregate([max(x, 0.0) for x in g_v], mode)
                m_t = naive_aggregate([max(g[j], 0.0) for j in text_positions[t]], mode)
                w = 1.0 if head_filter == "none" else max(m_v - m_t, 0.0)
                for i, x in enumerate(g_v):
                    raw[i] += w * (max(x, 0.0) if relu else x)
                best_v, best_t = max(best_v, m_v), max(best_t, m_t)
        lo, hi = min(raw), max(raw)
        maps.append([(x - lo) / (hi - lo) if hi > lo else 0.0 for x in raw])
        weights.append(max(best_v - best_t, 0.0) if filler_filter else 1.0)
    token_maps = torch.tensor(maps, dtype=torch.float64).view(length, *grid)
    token_weights = torch.tensor(weights, dtype=torch.float64)
    seq = (token_weights[:, None, None] * token_maps).sum(0)
    lo, hi = seq.min(), seq.max()
    seq = (seq - lo) / (hi - lo) if hi > lo else torch.zeros_like(seq)
    return token_maps, token_weights, seq


def _textbook_forward(adapter: VLMAdapter, batch: TeacherForcedBatch, index: int, pixel_values=None):
    """Full eager forward of one unpadded sample with the LM head, every parameter in the graph.

    Returns:
        ``(outputs, answer, positions)``: the model outputs (``attentions``, ``hidden_states``,
        ``logits``), the answer ids and their predicting positions ``p_t``.

    """
    model = adapter.model
    inputs = batch.sample_inputs(index)
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    n = inputs["input_ids"].shape[1]
    length = int(batch.answer_lengths[index])
    answer = inputs["input_ids"][0, n - length :]
    positions = torch.arange(n - length - 1, n - 1, device=device)
    with attn_implementation(adapter.text_config, REFERENCE_NAME):
        out = model(**inputs, output_attentions=True, output_hidden_states=True, use_cache=False)
    return out, answer, positions


def naive_attentions(adapter: VLMAdapter, batch: TeacherForcedBatch, index: int) -> torch.Tensor:
    """``(L, H, N_b, N_b)`` every textbook attention matrix of sample ``index`` (unpadded)."""
    with torch.no_grad():
        out, _, _ = _textbook_forward(adapter, batch, index)
    return torch.cat(out.attentions, dim=0)


def _with_parameter_grads(model):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(True)  # nothing detached, nothing frozen: the textbook graph
    return flags


def naive_final_logit_grads(
    adapter: VLMAdapter, batch: TeacherForcedBatch, index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``∂y_t^L/∂A^l`` of the model's own logit ``y_t^L = logits[p_t, w_t]``, one autograd call per token.

    Returns:
        ``(grads (T_b, L, H, N_b, N_b), attentions (L, H, N_b, N_b))``.

    """
    flags = _with_parameter_grads(adapter.model)
    try:
        with torch.enable_grad():
            out, answer, positions = _textbook_forward(adapter, batch, index)
            grads = []
            for t in range(len(answer)):
                y = out.logits[0, positions[t], answer[t]]
                found = torch.autograd.grad(y, out.attentions, retain_graph=True)
                grads.append(torch.cat(found, dim=0))
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
    return torch.stack(grads), torch.cat(out.attentions, dim=0).detach()


def naive_hidden_grads(
    adapter: VLMAdapter, batch: TeacherForcedBatch, index: int, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``∂y_t^L/∂h^k`` w.r.t. decoder layer ``k``'s input hidden states, one autograd call per token.

    Returns:
        ``(grads (T_b, N_b, D), hidden (N_b, D))`` over the sample's unpadded sequence.

    """
    flags = _with_parameter_grads(adapter.model)
    k = layer % len(adapter.decoder_layers)
    try:
        with torch.enable_grad():
            out, answer, positions = _textbook_forward(adapter, batch, index)
            hidden = out.hidden_states[k]  # HF: hidden_states[k] is the input of decoder layer k
            grads = []
            for t in range(len(answer)):
                y = out.logits[0, positions[t], answer[t]]
                (g,) = torch.autograd.grad(y, hidden, retain_graph=True)
                grads.append(g[0])
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
    return torch.stack(grads), hidden[0].detach()


def naive_log_probs(
    adapter: VLMAdapter, batch: TeacherForcedBatch, index: int, pixel_values: torch.Tensor | None = None
) -> torch.Tensor:
    """``(T_b,)`` ``log p(w_t | image, prompt, w_<t)`` from the model's full logits (unpadded sample)."""
    with torch.no_grad():
        out, answer, positions = _textbook_forward(adapter, batch, index, pixel_values)
        logp = out.logits[0, positions].double().log_softmax(-1)
    return logp.gather(-1, answer[:, None])[:, 0]


def naive_integrated_gradients(
    adapter: VLMAdapter, batch: TeacherForcedBatch, index: int, alphas: list[float], weights: list[float]
) -> torch.Tensor:
    """``(C, H, W)`` ``x ⊙ Σ_i w_i ∂(Σ_t log p(w_t | α_i x))/∂x``: one textbook forward and backward per point."""
    x = batch.sample_inputs(index)["pixel_values"][0].double()
    total = torch.zeros_like(x)
    for alpha, weight in zip(alphas, weights, strict=True):
        point = (alpha * x).detach().requires_grad_(True)
        with torch.enable_grad():
            out, answer, positions = _textbook_forward(adapter, batch, index, point[None])
            logp = out.logits[0, positions].double().log_softmax(-1).gather(-1, answer[:, None]).sum()
            (grad,) = torch.autograd.grad(logp, point)
        total = total + weight * grad
    return x * total


_INJECT: dict[int, torch.Tensor] = {}
INJECT_NAME = "dexar_reference_inject"


def _inject_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Textbook attention, except that a layer listed in ``_INJECT`` uses the given probabilities."""
    probs = _INJECT.get(getattr(module, "layer_idx", -1))
    if probs is None:
        return reference_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    value = value.repeat_interleave(getattr(module, "num_key_value_groups", 1), dim=1)
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(INJECT_NAME, _inject_attention_forward)
AttentionMaskInterface.register(INJECT_NAME, eager_mask)


def naive_iia(adapter: VLMAdapter, batch: TeacherForcedBatch, index: int, steps: int) -> torch.Tensor:
    """IIA's integrated ``Ā_t^l`` for one unpadded sample, loop by loop (one autograd call per α, β, t).

    For ``α, β ∈ {0, 1/s, …, 1}``: the image ``α·x``, the last layer's attention replaced by the leaf
    ``β·A^L(α·x)``, ``f_t = log p(w_t)`` from the model's full logits; ``mean_{α,β} mean_h
    ReLU(∂f_t/∂A^{l,h} ⊙ A^{l,h})``.

    Returns:
        ``(T_b, L, N_b, N_b)``.

    """
    model = adapter.model
    last = len(adapter.decoder_layers) - 1
    pixels = batch.sample_inputs(index)["pixel_values"].to(next(model.parameters()).dtype)
    points = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    total = None
    flags = _with_parameter_grads(model)
    try:
        for alpha in points:
            with torch.no_grad():
                out, _, _ = _textbook_forward(adapter, batch, index, pixels * alpha)
            attn_last = out.attentions[last].detach()
            for beta in points:
                _INJECT[last] = (attn_last * beta).requires_grad_(True)
                try:
                    with torch.enable_grad(), attn_implementation(adapter.text_config, INJECT_NAME):
                        inputs = batch.sample_inputs(index)
                        inputs["pixel_values"] = pixels * alpha
                        inputs = {k: v.to(next(model.parameters()).device) for k, v in inputs.items()}
                        out = model(**inputs, output_attentions=True, use_cache=False)
                        n, length = inputs["input_ids"].shape[1], int(batch.answer_lengths[index])
                        answer = inputs["input_ids"][0, n - length :]
                        logp = out.logits[0, n - length - 1 : n - 1].log_softmax(-1)
                        cams = []
                        for t in range(length):
                            grads = torch.autograd.grad(logp[t, answer[t]], out.attentions, retain_graph=True)
                            pairs = zip(grads, out.attentions, strict=True)
                            cams.append(torch.cat([(g * a.detach()).clamp(min=0).mean(1) for g, a in pairs]))
                finally:
                    _INJECT.clear()
                cams = torch.stack(cams)
                total = cams if total is None else total + cams
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
    return total / len(points) ** 2


def naive_last_norm_grads(
    adapter: VLMAdapter, batch: TeacherForcedBatch, index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``∂y_t^L/∂x̂`` w.r.t. the last decoder layer's normalised input, one autograd call per token.

    ``x̂`` is the output of its ``input_layernorm`` (Llama family).

    Returns:
        ``(grads (T_b, N_b, D), normalised (N_b, D))`` over the sample's unpadded sequence.

    """
    captured: list[torch.Tensor] = []
    norm = adapter.decoder_layers[-1].input_layernorm
    handle = norm.register_forward_hook(lambda module, args, output: captured.append(output))
    flags = _with_parameter_grads(adapter.model)
    try:
        with torch.enable_grad():
            out, answer, positions = _textbook_forward(adapter, batch, index)
            grads = []
            for t in range(len(answer)):
                y = out.logits[0, positions[t], answer[t]]
                (g,) = torch.autograd.grad(y, captured[0], retain_graph=True)
                grads.append(g[0])
    finally:
        handle.remove()
        for param, flag in flags:
            param.requires_grad_(flag)
    return torch.stack(grads), captured[0][0].detach()
