"""One instrumented teacher-forced forward (+ the fewest backwards) recording what the methods need.

The exact one-pass computation of DEX-AR's gradients (ARCHITECTURE.md):

* ``y_t^l = U[w_t] · norm(h^l_{p_t})`` (logit lens) depends on layer ``l``'s attention ``A^l`` only
  through layer ``l`` itself, and position ``p_t``'s output only through row ``p_t`` of ``A^l``.
* So the sequence runs once with every decoder layer's *input* detached; the answer rows of each
  ``A^l`` are captured as leaf tensors and the rows' output is computed from them; one backward of
  ``Σ_{l,t} y_t^l`` gives every ``g_t^l = ∂y_t^l/∂A^l[:, p_t, :]`` exactly.

Only the answer rows are materialised (memory ``O(L·H·T·N)``): the capture function is registered
in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` under :data:`CAPTURE_NAME`;
every other row is computed by SDPA. Parameters never receive gradients.

The baselines add needs (:data:`NEEDS`, plus ``hidden_grads:<layer>``); :func:`run` serves their union
with one forward:

* ``attention_rows``, ``layer_grads``: the DEX-AR trace above (the default; memory and passes unchanged).
* ``full_attention``: every row of every ``A^l``, averaged over heads (``(B, L, N, N)``), computed
  without gradients beside the SDPA output.
* ``hidden_states``: the last layer's output at every position after the final norm (``(B, N, D)``),
  the states the LM head reads.
* ``final_logit_grads``: gradients of the *final-layer* logit ``y_t^L`` of every answer token w.r.t.
  every ``A^l``. These flow through all later layers, so the forward keeps the graph from the first
  decoder layer on (layer inputs not detached) and computes every attention row explicitly. All
  tokens go through one backward with ``is_grads_batched`` (chunked to bound memory); the trace keeps
  them in the form the methods consume, Chefer et al.'s ``Ā_t^l = mean_h ReLU(∇A^{l,h} ⊙ A^{l,h})``
  (``(B, T, L, N, N)``): per-head raw gradients would cost ``H×`` more.
* ``hidden_grads:<k>``: GradCAM's gradient × activation ``Σ_d ∂y_t^L/∂h_{j,d} · h_{j,d}`` for every
  answer token at the image positions of decoder layer ``k``'s input hidden states (for the last
  layer: its normalised input, see :func:`_grad_x_hidden`). The graph is kept from layer ``k`` on
  only; for the last layer the per-token work crosses that layer's attention only.
* ``extra_forwards``: the method runs its own forwards on ``trace.adapter`` / ``trace.batch``
  (:func:`answer_log_probs`, :func:`grad_weighted_attention`); nothing is recorded for it.

When the graph is kept, DEX-AR's layer-local gradients come from the same forward: one
``autograd.grad`` per graph layer of ``Σ_t y_t^l`` w.r.t. ``A^l`` only visits layer ``l`` (autograd
prunes every node that does not lead to the requested input), so the values equal the detached trace.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dexar.adapters.base import TeacherForcedBatch, VLMAdapter

CAPTURE_NAME = "dexar_capture"
NEEDS = frozenset(
    {"attention_rows", "layer_grads", "full_attention", "final_logit_grads", "hidden_states", "extra_forwards"}
)
HIDDEN_GRADS = "hidden_grads"
"""Prefix of the parameterised need ``hidden_grads:<layer>`` (see :func:`hidden_grads_need`)."""
DEFAULT_NEEDS = frozenset({"attention_rows", "layer_grads"})
"""What DEX-AR needs: the answer rows of every ``A^l`` and their layer-local gradients."""
GRAD_CHUNK_BYTES = 1 << 30
"""Memory budget of one batched backward's gradients on an accelerator; the answer tokens are chunked to fit it."""
CPU_GRAD_CHUNK_BYTES = 64 << 20
"""The same budget on the CPU, where a batched backward is bound by memory traffic: with CheferCAM's
``(c, B, H, N, N)`` gradients (187 MB per token in ``benchmarks/methods.py``) 5 tokens per backward took
1.5× longer than one at a time (13.6 s vs 9.2 s for 20 tokens)."""


def hidden_grads_need(layer: int) -> str:
    """The need for final-logit gradients w.r.t. decoder layer ``layer``'s input hidden states."""
    return f"{HIDDEN_GRADS}:{int(layer)}"


@dataclass
class _CaptureState:
    """What the capture function records during one traced forward.

    Layers below ``graph_from`` (all layers when it is ``None``) run SDPA and capture the answer rows
    as leaves; layers from ``graph_from`` on compute every row explicitly and keep it in the graph
    (``full_probs``), or use ``inject[layer]`` instead of ``softmax(QK^T)``. Layer ``rows_only`` (the
    last, when only its answer rows can matter) keeps just its answer rows, keys and values in the
    graph (``probs``) and runs SDPA without a graph for the other rows.
    """

    start: int
    stop: int
    requires_grad: bool
    probs: dict[int, torch.Tensor] = field(default_factory=dict)
    full: bool = False
    graph_from: int | None = None
    inject: dict[int, torch.Tensor] = field(default_factory=dict)
    full_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    mean_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    rows_only: int | None = None
    rows_pass: bool = False
    rows_layer: int | None = None
    row_values: dict[int, torch.Tensor] = field(default_factory=dict)


_STATE: ContextVar[_CaptureState | None] = ContextVar("dexar_capture_state", default=None)


def _answer_row_probs(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
    start: int,
    stop: int,
) -> torch.Tensor:
    """Attention probabilities of query rows ``start:stop``: ``(B, H, T, N)``, float32 or wider."""
    groups = getattr(module, "num_key_value_groups", 1)
    key = repeat_kv(key, groups) if groups > 1 else key
    work = torch.promote_types(query.dtype, torch.float32)
    q = query[:, :, start:stop].to(work)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(q, key.to(work).transpose(-1, -2)) * scale
    n = key.shape[2]
    if attention_mask is not None:
        rows = attention_mask[:, :, start:stop, :n]
        if rows.dtype == torch.bool:
            scores = scores.masked_fill(~rows, float("-inf"))
        else:
            scores = scores + rows.to(work)
    elif is_causal if is_causal is not None else getattr(module, "is_causal", True):
        # sdpa_mask returned None (pure causal fast path): apply causality to these rows ourselves.
        offset = n - query.shape[2]
        q_pos = torch.arange(start, stop, device=query.device)[:, None] + offset
        k_pos = torch.arange(n, device=query.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def _all_row_probs(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
) -> torch.Tensor:
    """Attention probabilities of every row: ``(B, H, N, N)``, float32 or wider, differentiable.

    Masked scores are set to the most negative finite value rather than ``-inf`` (their probability is
    still exactly 0), and a fully masked (left-padding) row is all zeros, as SDPA returns it, instead
    of NaN: no NaN reaches real positions' gradients.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    key = repeat_kv(key, groups) if groups > 1 else key
    work = torch.promote_types(query.dtype, torch.float32)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # The scale goes on the (N, d) queries, the masks in place: each (B, H, N, N) pass costs memory traffic.
    scores = torch.matmul(query.to(work) * scale, key.to(work).transpose(-1, -2))
    n = key.shape[2]
    low = torch.finfo(work).min
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :n]
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, low)
            return torch.softmax(scores, dim=-1) * mask.any(-1, keepdim=True)
        scores = scores.add_(mask.to(work)).clamp(min=low)
    elif is_causal if is_causal is not None else getattr(module, "is_causal", True):
        offset = n - query.shape[2]
        q_pos = torch.arange(query.shape[2], device=query.device)[:, None] + offset
        k_pos = torch.arange(n, device=query.device)[None, :]
        scores.masked_fill_(k_pos > q_pos, low)
    return torch.softmax(scores, dim=-1)


def _graph_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
    state: _CaptureState,
    layer: int,
) -> tuple[torch.Tensor, None]:
    """Explicit attention over every row, kept in the autograd graph (or an injected probability tensor)."""
    if state.rows_only == layer and layer not in state.inject:
        return _graph_answer_rows(module, query, key, value, attention_mask, scaling, is_causal, state, layer)
    probs = state.inject.get(layer)
    if probs is None:
        probs = _all_row_probs(module, query, key, attention_mask, scaling, is_causal)
    state.full_probs[layer] = probs
    if state.full:
        state.mean_probs[layer] = probs.detach().mean(1)
    groups = getattr(module, "num_key_value_groups", 1)
    value_in = value
    value = repeat_kv(value, groups) if groups > 1 else value
    out = torch.matmul(probs, value.to(probs.dtype)).to(query.dtype).transpose(1, 2).contiguous()
    state.outputs[layer] = out
    state.keys[layer], state.values[layer] = key, value_in
    return out, None


def _graph_answer_rows(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
    state: _CaptureState,
    layer: int,
) -> tuple[torch.Tensor, None]:
    """SDPA without a graph for every row; the answer rows recomputed in the graph from ``q``, ``K``, ``V``."""
    out, _ = sdpa_attention_forward(
        module, query.detach(), key.detach(), value.detach(), attention_mask, scaling=scaling, is_causal=is_causal
    )
    probs = _answer_row_probs(module, query, key, attention_mask, scaling, is_causal, state.start, state.stop)
    state.probs[layer] = probs
    groups = getattr(module, "num_key_value_groups", 1)
    values = repeat_kv(value, groups) if groups > 1 else value
    rows = torch.matmul(probs, values.to(probs.dtype)).to(out.dtype).transpose(1, 2)  # (B, T, H, D)
    out = torch.cat([out[:, : state.start], rows, out[:, state.stop :]], dim=1)
    state.outputs[layer] = out
    state.keys[layer], state.values[layer] = key, value
    return out, None


def capture_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA for every row; the traced rows recomputed from a captured (leaf) probability tensor."""
    state = _STATE.get()
    layer = getattr(module, "layer_idx", None)
    if state is not None and layer is not None and state.rows_layer == layer:
        # The answer-rows re-run of this layer (see _detach_layer_inputs): rows from the leaf.
        values = state.row_values.pop(layer)
        return torch.matmul(state.probs[layer], values).to(query.dtype).transpose(1, 2), None
    if state is not None and layer is not None and state.graph_from is not None and layer >= state.graph_from:
        return _graph_attention(module, query, key, value, attention_mask, scaling, is_causal, state, layer)
    if state is None or layer is None or not state.full:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if state is None or layer is None:
        return out, None
    groups = getattr(module, "num_key_value_groups", 1)
    value = repeat_kv(value, groups) if groups > 1 else value
    if state.full:  # every row's probabilities are computed anyway: the output from them, not a second pass
        with torch.no_grad():
            every = _all_row_probs(module, query, key, attention_mask, scaling, is_causal)
            state.mean_probs[layer] = every.mean(1)
            out = torch.matmul(every, value.to(every.dtype)).to(query.dtype).transpose(1, 2).contiguous()
    probs = _answer_row_probs(module, query, key, attention_mask, scaling, is_causal, state.start, state.stop)
    leaf = probs.detach().requires_grad_(state.requires_grad)
    state.probs[layer] = leaf
    if state.rows_pass:  # the graph is built by the layer's answer-rows re-run, not here
        state.row_values[layer] = value.detach().to(leaf.dtype)
        return out, None
    rows = torch.matmul(leaf, value.to(leaf.dtype)).to(out.dtype).transpose(1, 2)  # (B, T, H, D)
    out = torch.cat([out[:, : state.start], rows, out[:, state.stop :]], dim=1)
    return out, None


AttentionInterface.register(CAPTURE_NAME, capture_attention_forward)
AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)


@dataclass
class Trace:
    """Everything recorded for one batch. ``T`` answer slots are right-aligned (see ``answer_mask``).

    Attributes:
        batch: The teacher-forced batch that was traced.
        attentions: ``(B, L, H, T, N)`` attention probabilities of the predicting rows ``p_t``.
        grads: ``(B, L, H, T, N)`` ``g_t^l = ∂y_t^l/∂A^l[:, p_t, :]``, or ``None`` if not requested.
        logit_lens: ``(B, L, T)`` the layer-wise logits ``y_t^l`` of the answer tokens.
        image_index: ``(B, V)`` sequence positions of the image tokens (grid order).
        text_mask: ``(B, T, N)`` text columns of row ``p_t``: unmasked, non-image, at or before ``p_t``.
        answer_mask: ``(B, T)`` True for real answer tokens.
        grid: ``(h, w)`` of the image-token grid.
        adapter: The model's adapter, for methods that run their own forwards.
        full_attention: ``(B, L, N, N)`` head-averaged ``A^l`` over every row (``full_attention``).
        final_grad_attention: ``(B, T, L, N, N)`` ``mean_h ReLU(∂y_t^L/∂A^{l,h} ⊙ A^{l,h})`` with the
            final-layer logit ``y_t^L`` (``final_logit_grads``).
        grad_x_hidden: Layer ``k`` → ``(B, T, V)`` ``Σ_d ∂y_t^L/∂h^k_{j,d} · h^k_{j,d}`` at the image
            positions ``j`` of decoder layer ``k``'s input, normalised for the last layer
            (``hidden_grads:<k>``, ``k`` stored non-negative): the product GradCAM consumes (the
            raw gradients would cost ``T·V·D``).
        final_hidden: ``(B, N, D)`` last layer's output after the final norm (``hidden_states``).

    """

    batch: TeacherForcedBatch
    attentions: torch.Tensor
    grads: torch.Tensor | None
    logit_lens: torch.Tensor
    image_index: torch.Tensor
    text_mask: torch.Tensor
    answer_mask: torch.Tensor
    grid: tuple[int, int]
    adapter: VLMAdapter | None = None
    full_attention: torch.Tensor | None = None
    final_grad_attention: torch.Tensor | None = None
    grad_x_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    final_hidden: torch.Tensor | None = None

    @property
    def rows(self) -> slice:
        """Sequence positions ``p_t`` of the right-aligned answer slots (the predicting rows)."""
        n, t = self.batch.input_ids.shape[1], self.batch.answer_ids.shape[1]
        return slice(n - 1 - t, n - 1)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers ``L`` in the trace."""
        return self.attentions.shape[1]

    def select_layers(self, layers: slice) -> Trace:
        """The same trace restricted to some decoder layers (e.g. ``slice(-1, None)``: the last)."""
        grads = self.grads[:, layers] if self.grads is not None else None
        full = self.full_attention[:, layers] if self.full_attention is not None else None
        final = self.final_grad_attention[:, :, layers] if self.final_grad_attention is not None else None
        return dataclasses.replace(
            self,
            attentions=self.attentions[:, layers],
            grads=grads,
            logit_lens=self.logit_lens[:, layers],
            full_attention=full,
            final_grad_attention=final,
        )

    def image_columns(self, values: torch.Tensor) -> torch.Tensor:
        """Gather the image columns of a ``(B, ..., N)`` tensor: ``(B, ..., V)`` in grid order."""
        index = self.image_index.view(self.image_index.shape[0], *([1] * (values.dim() - 2)), -1)
        return torch.gather(values, -1, index.expand(*values.shape[:-1], index.shape[-1]))


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Temporarily turn off ``requires_grad`` on every parameter (restored afterwards)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _attn_implementation(config, name: str) -> Iterator[None]:
    """Temporarily switch a (text) config's attention implementation."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def _session(adapter: VLMAdapter, state: _CaptureState, grad: bool = True) -> Iterator[None]:
    """Capture state, capture attention, frozen parameters and the grad mode for one traced pass."""
    token = _STATE.set(state)
    try:
        with _frozen(adapter.model), _attn_implementation(adapter.text_config, CAPTURE_NAME):
            with torch.set_grad_enabled(grad):
                yield
    finally:
        _STATE.reset(token)


def _detach_layer_inputs(
    layers: nn.ModuleList, outputs: list[torch.Tensor | None], start: int, stop: int, state: _CaptureState
) -> list:
    """Hooks: detach each decoder layer's input hidden states; keep its output rows ``start:stop``.

    With ``state.rows_pass`` the forward runs without autograd and each layer, right after its full
    forward, is run again on its answer rows only, with grad: its attention returns ``leaf @ V`` (the
    captured probabilities times the full pass's values), and everything after attention (output
    projection, residuals, norms, MLP) is row-local, so the rows equal the full pass's rows while the
    graph holds ``T`` rows instead of ``N``. Memory: ``L·T·(D + MLP width)`` instead of ``L·N·(…)``.
    """

    def pre_hook(module, args, kwargs):
        if state.rows_layer is not None:  # the answer-rows re-run: inputs already sliced and detached
            return None
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"].detach()
        return args, kwargs

    def make_post(index: int):
        def post_hook(module, args, kwargs, output):
            if state.rows_layer is not None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            if state.rows_pass and index in state.row_values:
                hidden = _rerun_answer_rows(module, index, args, kwargs, hidden.shape[1], start, stop, state)
                outputs[index] = hidden
            else:
                outputs[index] = hidden[:, start:stop]
            return None

        return post_hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(layer.register_forward_hook(make_post(i), with_kwargs=True))
    return handles


def _slice_sequence(value: Any, n: int, start: int, stop: int, dim: int) -> Any:
    """``value[..., start:stop, ...]`` along ``dim`` for tensors (or tuples of them) of length ``n`` there."""
    if isinstance(value, tuple):
        return tuple(_slice_sequence(v, n, start, stop, dim) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() >= -dim and value.shape[dim] == n:
        return value.narrow(dim % value.dim(), start, stop - start)
    return value


def _without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A decoder layer's call kwargs with its KV cache set to ``None``, under the name the call used.

    transformers renamed the layers' ``past_key_values`` to ``cache``; passing both raises a FutureWarning.
    """
    return {**kwargs, "use_cache": False, **{k: None for k in ("cache", "past_key_values") if k in kwargs}}


def _rerun_answer_rows(
    layer: nn.Module, index: int, args: tuple, kwargs: dict, n: int, start: int, stop: int, state: _CaptureState
) -> torch.Tensor:
    """Decoder layer ``index`` on its answer rows only, with grad; attention rows come from the leaf."""
    hidden = (args[0] if args else kwargs["hidden_states"]).detach()[:, start:stop]
    rows_kwargs = _without_cache({k: v for k, v in kwargs.items() if k != "hidden_states"})
    if "position_embeddings" in rows_kwargs:  # (cos, sin): sequence on dim -2 (also M-RoPE's (3, B, N, d))
        rows_kwargs["position_embeddings"] = _slice_sequence(rows_kwargs["position_embeddings"], n, start, stop, -2)
    for key in ("position_ids", "cache_position"):
        if key in rows_kwargs:
            rows_kwargs[key] = _slice_sequence(rows_kwargs[key], n, start, stop, -1)
    state.rows_layer = index
    try:
        with torch.enable_grad():
            out = layer(hidden, *args[1:], **rows_kwargs)
    finally:
        state.rows_layer = None
    return out[0] if isinstance(out, tuple) else out


def _graph_layer_hooks(
    layers: nn.ModuleList,
    graph_from: int,
    keep: set[int],
    inputs: dict[int, torch.Tensor],
    outputs: list[torch.Tensor | None],
    start: int,
    stop: int,
) -> list:
    """Hooks: detach inputs below ``graph_from``, make that layer's input a leaf, keep the graph above.

    The inputs of the layers in ``keep`` are recorded; every layer's output rows ``start:stop`` too.
    """

    def make_pre(index: int):
        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index < graph_from:
                hidden = hidden.detach()
            elif index == graph_from:
                hidden = hidden.detach().requires_grad_(True)
            if index in keep:
                inputs[index] = hidden
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return pre_hook

    def make_post(index: int):
        def post_hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[index] = hidden[:, start:stop]

        return post_hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(make_pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(make_post(i)))
    return handles


@dataclass
class _Forward:
    """What one instrumented forward produced (tensors may carry graph).

    ``layer_lens[l]`` is ``(B, T)`` layer ``l``'s logit lens, one graph per layer: a backward from one
    layer's slice of a stacked ``(B, L, T)`` tensor would also push zero gradients down every other layer.
    """

    rows: list[torch.Tensor]
    inputs: dict[int, torch.Tensor]
    last: torch.Tensor | None
    layer_lens: list[torch.Tensor]
    answer_ids: torch.Tensor
    answer_mask: torch.Tensor


def _model_inputs(
    adapter: VLMAdapter, batch: TeacherForcedBatch, pixel_values: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    dtype = next(adapter.model.parameters()).dtype
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.inputs.items()}
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values.to(dtype)
    return inputs


def _forward(
    adapter: VLMAdapter,
    batch: TeacherForcedBatch,
    state: _CaptureState,
    keep: set[int] | None = None,
    keep_last: bool = False,
    pixel_values: torch.Tensor | None = None,
) -> _Forward:
    """One instrumented forward inside :func:`_session`; returns rows, inputs and the logit lens."""
    layers = adapter.decoder_layers
    rows: list[torch.Tensor | None] = [None] * len(layers)
    inputs: dict[int, torch.Tensor] = {}
    last: list[torch.Tensor | None] = [None]
    if state.graph_from is None:
        handles = _detach_layer_inputs(layers, rows, state.start, state.stop, state)
    else:
        handles = _graph_layer_hooks(layers, state.graph_from, keep or set(), inputs, rows, state.start, state.stop)
    if keep_last:

        def keep_output(module, args, output):
            last[0] = output[0] if isinstance(output, tuple) else output

        handles.append(layers[-1].register_forward_hook(keep_output))
    try:
        adapter.backbone_forward(_model_inputs(adapter, batch, pixel_values))
    finally:
        for h in handles:
            h.remove()
    answer_ids = batch.answer_ids.to(batch.input_ids.device)
    answer_mask = answer_ids >= 0
    unembed = adapter.unembedding.weight[answer_ids.clamp(min=0)]  # (B, T, D)
    bias = getattr(adapter.unembedding, "bias", None)
    layer_lens = []
    with torch.set_grad_enabled(torch.is_grad_enabled() or state.rows_pass):  # rows-pass rows carry the graph
        for hidden in rows:  # (B, T, D) each: one graph per layer (see _Forward)
            lens = (adapter.final_norm(hidden) * unembed.to(hidden.dtype)).sum(-1)  # (B, T)
            if bias is not None:
                lens = lens + bias[answer_ids.clamp(min=0)]
            layer_lens.append(lens * answer_mask)
    return _Forward(rows, inputs, last[0], layer_lens, answer_ids, answer_mask)


def _log_probs(adapter: VLMAdapter, rows: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """``log p(w_t)`` from the last layer's output rows ``(B, T, D)``; 0 on padding slots."""
    logits = adapter.unembedding(adapter.final_norm(rows))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = logits.log_softmax(-1).gather(-1, answer_ids.clamp(min=0)[..., None])[..., 0]
    return picked * (answer_ids >= 0)


def _chunk_size(inputs: list[torch.Tensor], requested: int | None) -> int:
    if requested is not None:
        return max(1, int(requested))
    per_token = sum(x.numel() * x.element_size() for x in inputs) * 2  # gradients + products
    budget = CPU_GRAD_CHUNK_BYTES if inputs[0].device.type == "cpu" else GRAD_CHUNK_BYTES
    return max(1, budget // max(per_token, 1))


def batched_grads(
    target: torch.Tensor, inputs: list[torch.Tensor], chunk: int | None
) -> Iterator[tuple[int, int, tuple[torch.Tensor | None, ...]]]:
    """Gradients of every ``target[:, t]`` (summed over the batch) w.r.t. ``inputs``, chunked over ``t``.

    Yields ``(t0, c, grads)`` with each gradient ``(c, *input.shape)``: one ``is_grads_batched``
    backward per chunk of ``c`` answer slots. Samples do not interact, so slice ``b`` of a gradient
    is sample ``b``'s own.
    """
    b, t = target.shape
    size = _chunk_size(inputs, chunk)
    for t0 in range(0, t, size):
        c = min(size, t - t0)
        go = torch.zeros(c, b, t, dtype=target.dtype, device=target.device)
        index = torch.arange(c, device=target.device)
        go[index, :, t0 + index] = 1
        if c == 1:  # a plain backward: vmap's batching machinery costs ~10% for a batch of one (CPU)
            grads = torch.autograd.grad(
                target, inputs, go[0], retain_graph=True, allow_unused=True, materialize_grads=True
            )
            yield t0, c, tuple(g[None] for g in grads)
            continue
        grads = torch.autograd.grad(
            target, inputs, go, retain_graph=True, is_grads_batched=True, allow_unused=True, materialize_grads=True
        )
        yield t0, c, grads


def _grad_attention(
    target: torch.Tensor, probs: list[torch.Tensor], chunk: int | None, per_token: bool = True
) -> torch.Tensor:
    """``mean_h ReLU(∂target_t/∂A^l ⊙ A^l)`` for every slot ``t`` and layer: ``(B, T, L, N, N)``.

    With ``per_token=False`` the target is ``Σ_t target_t`` and the result ``(B, 1, L, N, N)``.
    """
    if not per_token:
        grads = torch.autograd.grad(target.sum(), probs, retain_graph=True, allow_unused=True, materialize_grads=True)
        return torch.stack([(g * p.detach()).clamp(min=0).mean(1) for g, p in zip(grads, probs, strict=True)], 1)[
            :, None
        ]
    parts = []
    for _, _, grads in batched_grads(target, probs, chunk):
        layers = [(g * p.detach()).clamp(min=0).mean(2) for g, p in zip(grads, probs, strict=True)]  # (c, B, N, N)
        parts.append(torch.stack(layers, dim=2).transpose(0, 1))  # (B, c, L, N, N)
    return torch.cat(parts, dim=1)


def _grad_x_hidden(
    final: torch.Tensor,
    inputs: dict[int, torch.Tensor],
    state: _CaptureState,
    layers: list[int],
    image_index: torch.Tensor,
    num_layers: int,
    chunk: int | None,
) -> dict[int, torch.Tensor]:
    """Gradient × activation of the image hidden states, summed over the hidden dimension.

    Layers ``k`` below the last: ``Σ_d ∂y_t^L/∂h^k_{j,d} · h^k_{j,d}`` of the residual stream entering
    layer ``k``, from one batched backward per chunk of tokens.

    The last layer reads the image states only through its input norm (the residual and query of an
    image row never reach ``p_t``), and RMSNorm is scale-invariant, so the same product on its
    residual input is ≈ 0 by construction. It is taken on the normalised states ``x̂_j`` that its
    attention reads (the standard GradCAM target of a transformer block, its pre-attention norm).
    With bias-free key/value projections (the Llama family; rotary is linear too) ``K_j``, ``V_j``
    are linear in ``x̂_j``, so ``Σ_d ∂y_t/∂x̂_{j,d} x̂_{j,d} = ⟨∂y_t/∂K_j, K_j⟩ + ⟨∂y_t/∂V_j, V_j⟩``
    exactly. The per-token ``∂y_t/∂(K, V)`` come from ``δ_t = ∂y_t/∂out[p_t]`` (one plain backward:
    row ``p_t`` of the attention output feeds only ``y_t``) by a batched backward through the
    attention alone, not the projections and MLP of every row.

    Returns:
        Layer → ``(B, T, V)``.

    """
    index = image_index[:, None, :]  # (B, 1, V)
    parts: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    last = num_layers - 1
    direct = [k for k in layers if k != last]
    if direct:
        for _, _, grads in batched_grads(final, [inputs[k] for k in direct], chunk):
            for k, g in zip(direct, grads, strict=True):  # g: (c, B, N, D)
                product = (g * inputs[k].detach()).sum(-1).transpose(0, 1)  # (B, c, N)
                parts[k].append(torch.gather(product, 2, index.expand(-1, product.shape[1], -1)))
    if last in layers:
        out, key, value = state.outputs[last], state.keys[last], state.values[last]
        (delta,) = torch.autograd.grad(final.sum(), out, retain_graph=True)  # (B, N, H, D)
        t = final.shape[1]
        size = _chunk_size([key, value], chunk)
        for t0 in range(0, t, size):
            c = min(size, t - t0)
            seed = torch.zeros(c, *out.shape, dtype=out.dtype, device=out.device)
            steps = torch.arange(c, device=out.device)
            rows = state.start + t0 + steps
            seed[steps, :, rows] = delta[:, rows].transpose(0, 1)
            g_key, g_value = torch.autograd.grad(
                out, [key, value], seed, retain_graph=True, is_grads_batched=True, materialize_grads=True
            )  # (c, B, H_kv, N, D)
            product = (g_key * key.detach()).sum((2, 4)) + (g_value * value.detach()).sum((2, 4))  # (c, B, N)
            parts[last].append(torch.gather(product.transpose(0, 1), 2, index.expand(-1, c, -1)))
    return {k: torch.cat(parts[k], dim=1) for k in layers}


def _parse_needs(needs: frozenset[str] | set[str], num_layers: int) -> tuple[set[str], list[int]]:
    plain: set[str] = set()
    layers: set[int] = set()
    unknown = []
    for need in needs:
        name, sep, arg = need.partition(":")
        if need in NEEDS:
            plain.add(need)
        elif name == HIDDEN_GRADS and sep:
            try:
                k = int(arg)
            except ValueError:
                unknown.append(need)
                continue
            if not -num_layers <= k < num_layers:
                raise ValueError(f"{need}: the model has {num_layers} decoder layers")
            layers.add(k % num_layers)
        else:
            unknown.append(need)
    if unknown:
        known = sorted(NEEDS) + [f"{HIDDEN_GRADS}:<layer>"]
        raise ValueError(f"unknown trace needs {sorted(unknown)}; known: {known}")
    return plain, sorted(layers)


def _image_index(adapter: VLMAdapter, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    image_mask = adapter.image_token_mask(input_ids)
    counts = image_mask.sum(1)
    if counts.min() != counts.max() or int(counts[0]) == 0:
        raise ValueError(f"every sample needs the same, non-zero number of image tokens; got {counts.tolist()}")
    return image_mask, torch.nonzero(image_mask)[:, 1].view(input_ids.shape[0], -1)


def _answer_span(batch: TeacherForcedBatch) -> tuple[int, int]:
    n = batch.input_ids.shape[1]
    t_max = batch.answer_ids.shape[1]
    start, stop = n - 1 - t_max, n - 1  # predicting rows p_t of the right-aligned answer slots
    if start < 0:
        raise ValueError("sequence too short for its answer")
    return start, stop


def run(
    adapter: VLMAdapter,
    batch: TeacherForcedBatch,
    needs: frozenset[str] | set[str] = DEFAULT_NEEDS,
    grad_chunk: int | None = None,
) -> Trace:
    """Trace one teacher-forced batch: one forward and the fewest backwards the needs allow.

    Passes: the default DEX-AR needs (``attention_rows``, ``layer_grads``) take one forward with
    detached layer inputs and one backward; ``full_attention`` and ``hidden_states`` add nothing but
    memory. ``final_logit_grads`` / ``hidden_grads:<k>`` keep the graph from layer 0 / ``k`` on and
    add one batched backward per chunk of answer tokens (see :data:`GRAD_CHUNK_BYTES`,
    :data:`CPU_GRAD_CHUNK_BYTES`); with them, ``layer_grads`` costs one layer-local ``autograd.grad``
    per graph layer instead of a second forward.

    Args:
        adapter: Adapter of the model (its parameters are frozen for the call).
        batch: Left-padded prompt + answer batch from :meth:`VLMAdapter.build_batch`.
        needs: Subset of :data:`NEEDS` plus any ``hidden_grads:<layer>``.
        grad_chunk: Answer tokens per batched backward (default: as many as fit the memory budget).

    Returns:
        The :class:`Trace`; tensors stay on the model's device.

    """
    if getattr(adapter, "cross_attention", False):  # encoder-decoder: the decoder's cross-attention
        from dexar import tracing_cross

        return tracing_cross.run(adapter, batch, needs, grad_chunk)
    layers = adapter.decoder_layers
    num_layers = len(layers)
    plain, grad_layers = _parse_needs(needs, num_layers)
    input_ids = batch.input_ids
    n = input_ids.shape[1]
    start, stop = _answer_span(batch)
    image_mask, image_index = _image_index(adapter, input_ids)
    want_grads = "layer_grads" in plain
    want_final = "final_logit_grads" in plain
    graph_from = 0 if want_final else (grad_layers[0] if grad_layers else None)
    full = want_final or "full_attention" in plain
    state = _CaptureState(start, stop, want_grads, full=full, graph_from=graph_from)
    state.rows_pass = want_grads and graph_from is None and adapter.row_local_layers
    if graph_from is not None and not full:
        state.rows_only = num_layers - 1  # only hidden_grads: y^L needs the last layer's answer rows only

    layer_grads: dict[int, torch.Tensor] = {}
    final_grad_attention = None
    grad_x_hidden: dict[int, torch.Tensor] = {}
    with _session(adapter, state, grad=not state.rows_pass):
        fwd = _forward(adapter, batch, state, set(grad_layers), "hidden_states" in plain)
        layer_lens = fwd.layer_lens
        if graph_from is None:
            if want_grads:
                with torch.enable_grad():  # the rows pass ran the forward itself without autograd
                    torch.stack(layer_lens).sum().backward()
        else:
            graph = list(range(graph_from, num_layers))
            final = layer_lens[-1]  # y_t^L: the model's own logit of w_t
            if want_final:
                final_grad_attention = _grad_attention(final, [state.full_probs[i] for i in graph], grad_chunk)
            if grad_layers:
                grad_x_hidden = _grad_x_hidden(
                    final, fwd.inputs, state, grad_layers, image_index, num_layers, grad_chunk
                )
            if want_grads:
                local = list(range(graph_from))
                if local:
                    target = sum(layer_lens[i].sum() for i in local)
                    found = torch.autograd.grad(
                        target, [state.probs[i] for i in local], retain_graph=True, allow_unused=True
                    )
                    layer_grads.update(zip(local, found, strict=True))
                for i in graph:  # layer_lens[i] reaches A^i through layer i only
                    if i in state.full_probs:
                        (g,) = torch.autograd.grad(layer_lens[i].sum(), state.full_probs[i], retain_graph=True)
                        layer_grads[i] = g[:, :, start:stop]
                    else:  # rows_only layer
                        (layer_grads[i],) = torch.autograd.grad(layer_lens[i].sum(), state.probs[i], retain_graph=True)

    rows = []
    for i in range(num_layers):
        rows.append(state.probs[i] if i in state.probs else state.full_probs[i][:, :, start:stop])
    attentions = torch.stack([p.detach() for p in rows], dim=1)
    grads = None
    if want_grads:
        if graph_from is None:
            found = [p.grad for p in rows]
        else:
            found = [layer_grads[i] for i in range(num_layers)]
        found = [g if g is not None else torch.zeros_like(p) for g, p in zip(found, rows, strict=True)]
        grads = torch.stack(found, dim=1).detach()
    full_attention = torch.stack([state.mean_probs[i] for i in range(num_layers)], 1) if full else None
    final_hidden = None
    if "hidden_states" in plain:
        final_hidden = adapter.final_norm(fwd.last.detach()).detach()
    columns = torch.arange(n, device=input_ids.device)
    row_pos = torch.arange(start, stop, device=input_ids.device)
    valid = batch.inputs["attention_mask"].bool() & ~image_mask  # (B, N)
    text_mask = valid[:, None, :] & (columns[None, None, :] <= row_pos[None, :, None])
    return Trace(
        batch=batch,
        attentions=attentions,
        grads=grads,
        logit_lens=torch.stack(layer_lens, dim=1).detach(),
        image_index=image_index,
        text_mask=text_mask,
        answer_mask=fwd.answer_mask,
        grid=batch.image_grid,
        adapter=adapter,
        full_attention=full_attention,
        final_grad_attention=final_grad_attention,
        grad_x_hidden={k: v.detach() for k, v in grad_x_hidden.items()},
        final_hidden=final_hidden,
    )


def _sample_inputs(batch: TeacherForcedBatch, index: int | None, pixel_values: torch.Tensor) -> TeacherForcedBatch:
    """The batch with other pixel values, or row ``index`` repeated once per image of ``pixel_values``."""
    if index is None:
        return dataclasses.replace(batch, inputs={**batch.inputs, "pixel_values": pixel_values})
    k = pixel_values.shape[0]
    inputs = {}
    for name, value in batch.inputs.items():
        inputs[name] = pixel_values if name == "pixel_values" else value[index : index + 1].expand(k, *value.shape[1:])
    answer_ids = batch.answer_ids[index : index + 1].expand(k, -1)
    return dataclasses.replace(batch, inputs=inputs, answer_ids=answer_ids)


def answer_log_probs(
    adapter: VLMAdapter, batch: TeacherForcedBatch, pixel_values: torch.Tensor, index: int | None = None
) -> torch.Tensor:
    """``log p(w_t | image, prompt, w_<t)`` of the answer tokens with other pixel values.

    A plain forward (the model's own attention); differentiable w.r.t. ``pixel_values`` when grad
    mode is on; parameters never receive gradients.

    Args:
        adapter: Adapter of the model.
        batch: The traced batch.
        pixel_values: ``(B, C, H, W)`` one image per sample, or with ``index`` ``(K, *view)`` pixel views
            all for sample ``index`` (:meth:`VLMAdapter.pixel_view`; ``(K, C, H, W)`` for LLaVA).
        index: Score only this sample (its padded row repeated ``K`` times).

    Returns:
        ``(B, T)`` or ``(K, T)`` log-probabilities, 0 on padding slots.

    """
    if getattr(adapter, "cross_attention", False):  # encoder-decoder: the decoder's rows
        from dexar import tracing_cross

        return tracing_cross.answer_log_probs(adapter, batch, pixel_values, index)
    if index is None:
        sub = _sample_inputs(batch, None, pixel_values)
    else:  # the adapter knows how one sample's pixels batch up (per-sample grids, tiles)
        sub = adapter.repeat_sample(batch, index, pixel_values)
    start, stop = _answer_span(sub)
    last: list[torch.Tensor | None] = [None]

    def keep_rows(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        last[0] = hidden[:, start:stop]

    handle = adapter.decoder_layers[-1].register_forward_hook(keep_rows)
    try:
        with _frozen(adapter.model):
            adapter.backbone_forward(_model_inputs(adapter, sub, None))
            answer_ids = sub.answer_ids.to(sub.input_ids.device)
            return _log_probs(adapter, last[0], answer_ids)
    finally:
        handle.remove()


def grad_weighted_attention(
    adapter: VLMAdapter,
    batch: TeacherForcedBatch,
    pixel_values: torch.Tensor | None = None,
    last_scales: Sequence[float] = (1.0,),
    per_token: bool = True,
    grad_chunk: int | None = None,
) -> torch.Tensor:
    """Chefer's ``Ā_t^l = mean_h ReLU(∂f_t/∂A^{l,h} ⊙ A^{l,h})`` with ``f_t = log p(w_t | ...)``.

    One forward with every attention row in the graph, then one batched backward per chunk of
    answer tokens (IIA's inner integrand), summed over ``last_scales`` ``(β_1, …)``: for each ``β`` the
    last decoder layer runs again with ``β·A^L`` (``A^L`` of this forward, detached) injected in place
    of ``softmax(QK^T)`` (a leaf: no gradient through that layer's queries and keys). The layers below
    do not depend on ``β``, so their forward and graph are shared by every ``β``: one forward,
    ``len(last_scales)`` last-layer re-runs and backwards.

    Args:
        adapter: Adapter of the model.
        batch: The traced batch.
        pixel_values: Replace the batch's pixel values.
        last_scales: Scales ``β`` of the injected last-layer attention.
        per_token: One target per answer token; else the answer's log-likelihood ``Σ_t f_t``.
        grad_chunk: Answer tokens per batched backward.

    Returns:
        ``(B, T, L, N, N)``, or ``(B, 1, L, N, N)`` when ``per_token`` is False.

    """
    layers = adapter.decoder_layers
    last = len(layers) - 1
    state = _CaptureState(*_answer_span(batch), False, graph_from=0)
    call: dict[str, Any] = {}

    def keep_call(module, args, kwargs):
        call["args"], call["kwargs"] = args, kwargs

    with _session(adapter, state):
        handle = layers[last].register_forward_pre_hook(keep_call, with_kwargs=True)
        try:
            fwd = _forward(adapter, batch, state, pixel_values=pixel_values)
        finally:
            handle.remove()
        lower = [state.full_probs[i] for i in range(last)]
        own = state.full_probs[last].detach()
        args, kwargs = call["args"], _without_cache(call["kwargs"])
        total = None
        for beta in last_scales:
            state.inject[last] = (own * beta).requires_grad_(True)
            out = layers[last](*args, **kwargs)
            rows = (out[0] if isinstance(out, tuple) else out)[:, state.start : state.stop]
            target = _log_probs(adapter, rows, fwd.answer_ids)
            cam = _grad_attention(target, [*lower, state.inject[last]], grad_chunk, per_token).detach()
            total = cam if total is None else total + cam
        return total
