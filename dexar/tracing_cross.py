"""One-pass DEX-AR trace over an encoder-decoder's cross-attention (paper appendix D).

The decoder-only argument of :mod:`dexar.tracing` carries over: the logit lens
``y_t^l = U[w_t] · norm(h^l_{p_t})`` of decoder layer ``l`` depends on that layer's cross-attention
``C^l`` (decoder rows × encoder columns) only through layer ``l`` itself, and only through row
``p_t``. So the decoder runs once with every layer's input detached, the answer rows of each ``C^l``
are captured as leaf tensors (through transformers' ``AttentionInterface``, under
:data:`CROSS_CAPTURE_NAME`) and the rows' output is recomputed from them; one backward of
``Σ_{l,t} y_t^l`` gives every ``g_t^l = ∂y_t^l/∂C^l[:, p_t, :]`` exactly. The encoder and the decoder's
self-attention run SDPA untouched; no parameter receives a gradient.

The batch is a right-padded :class:`dexar.adapters.florence2.Seq2SeqBatch`: the answer rows are
captured left-aligned (decoder positions ``P-1 … P-1+T``) and moved to the right-aligned slots of
:class:`dexar.tracing.Trace` afterwards.
"""

from __future__ import annotations

import dataclasses
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dexar import tracing
from dexar.adapters.base import DexarInputError, TeacherForcedBatch, VLMAdapter

CROSS_CAPTURE_NAME = "dexar_cross_capture"
SUPPORTED_NEEDS = frozenset({"attention_rows", "layer_grads", "extra_forwards"})
_NEED_USERS = {
    "full_attention": "rollout",
    "final_logit_grads": "chefercam",
    "hidden_states": "tam",
    tracing.HIDDEN_GRADS: "gradcam",
}


@dataclass
class _CrossState:
    """Which modules to capture (``id`` → decoder layer), the answer rows, and what was captured."""

    layers: dict[int, int]
    start: int
    stop: int
    requires_grad: bool
    probs: dict[int, torch.Tensor] = field(default_factory=dict)


_STATE: ContextVar[_CrossState | None] = ContextVar("dexar_cross_state", default=None)


def cross_capture_forward(
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
    """SDPA everywhere; a traced cross-attention's answer rows recomputed from a captured leaf."""
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )
    state = _STATE.get()
    layer = state.layers.get(id(module)) if state is not None else None
    if layer is None:
        return out, None
    probs = tracing._answer_row_probs(module, query, key, attention_mask, scaling, False, state.start, state.stop)
    leaf = probs.detach().requires_grad_(state.requires_grad)
    state.probs[layer] = leaf
    rows = torch.matmul(leaf, value.to(leaf.dtype)).to(out.dtype).transpose(1, 2)  # (B, T, H, D)
    out = torch.cat([out[:, : state.start], rows, out[:, state.stop :]], dim=1)
    return out, None


AttentionInterface.register(CROSS_CAPTURE_NAME, cross_capture_forward)
AttentionMaskInterface.register(CROSS_CAPTURE_NAME, sdpa_mask)


def _detach_layer_inputs(layers: nn.ModuleList, outputs: list[torch.Tensor | None], start: int, stop: int) -> list:
    """Hooks: detach each decoder layer's input hidden states; keep its output rows ``start:stop``."""

    def pre_hook(module, args, kwargs):
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"].detach()
        return args, kwargs

    def make_post(index: int):
        def post_hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[index] = hidden[:, start:stop]

        return post_hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(layer.register_forward_hook(make_post(i)))
    return handles


def _check_needs(adapter: VLMAdapter, needs: frozenset[str] | set[str]) -> set[str]:
    plain = set()
    refused = []
    for need in needs:
        name = need.partition(":")[0]
        if need in SUPPORTED_NEEDS:
            plain.add(need)
        elif name in _NEED_USERS:
            refused.append(_NEED_USERS[name])
        else:
            raise ValueError(f"unknown trace needs [{need!r}]; known here: {sorted(SUPPORTED_NEEDS)}")
    if refused:
        check = getattr(adapter, "check_method", None)
        for method in sorted(refused):
            if check is not None:
                check(method)
        raise DexarInputError(f"{', '.join(sorted(refused))}: not supported for an encoder-decoder's cross-attention")
    return plain


def _right_align(values: torch.Tensor, lengths: torch.Tensor, dim: int) -> torch.Tensor:
    """Move left-aligned answer slots (dim ``dim``) of each sample to the right; padding slots become 0."""
    t = values.shape[dim]
    slots = torch.arange(t, device=values.device)
    shift = (t - lengths.to(values.device))[:, None]  # (B, 1)
    source = (slots[None, :] - shift).clamp(min=0)  # (B, T)
    real = slots[None, :] >= shift
    shape = [values.shape[0]] + [1] * (values.dim() - 1)
    shape[dim] = t
    index = source.view(shape).expand_as(values)
    moved = torch.gather(values, dim, index)
    return moved * real.view(shape).to(moved.dtype)


def _left_answers(batch: TeacherForcedBatch) -> torch.Tensor:
    """``(B, T)`` answer ids left-aligned (the decoder order); padding ``-1``."""
    t = batch.answer_ids.shape[1]
    out = torch.full_like(batch.answer_ids, -1)
    for b, length in enumerate(_lengths(batch).tolist()):
        if length:
            out[b, :length] = batch.answer_ids[b, t - length :]
    return out


def _lengths(batch: TeacherForcedBatch) -> torch.Tensor:
    """``(B,)`` answer lengths from the right-aligned slots (also right for a repeated sample)."""
    return (batch.answer_ids >= 0).sum(1)


def _answer_rows(batch: TeacherForcedBatch) -> tuple[int, int]:
    prefix = getattr(batch, "prefix_length", None)
    if prefix is None or prefix < 1:
        raise ValueError("cross-attention tracing needs a Seq2SeqBatch with a decoder prefix")
    return prefix - 1, prefix - 1 + batch.answer_ids.shape[1]


def run(
    adapter: VLMAdapter,
    batch: TeacherForcedBatch,
    needs: frozenset[str] | set[str] = tracing.DEFAULT_NEEDS,
    grad_chunk: int | None = None,
) -> tracing.Trace:
    """Trace one teacher-forced encoder-decoder batch: one forward, at most one backward.

    Args:
        adapter: A cross-attention adapter (``cross_attention_modules``).
        batch: Right-padded :class:`~dexar.adapters.florence2.Seq2SeqBatch`.
        needs: ``attention_rows``, ``layer_grads``, ``extra_forwards``; needs of self-attention-only
            methods raise :class:`DexarInputError` naming the method.
        grad_chunk: Unused (kept for the signature of :func:`dexar.tracing.run`).

    Returns:
        A :class:`~dexar.tracing.Trace` whose columns ``N`` are the encoder positions.

    """
    plain = _check_needs(adapter, needs)
    want_grads = "layer_grads" in plain
    start, stop = _answer_rows(batch)
    modules = adapter.cross_attention_modules
    state = _CrossState({id(m): i for i, m in enumerate(modules)}, start, stop, want_grads)
    layers = adapter.decoder_layers
    rows: list[torch.Tensor | None] = [None] * len(layers)
    answer_ids = _left_answers(batch).to(batch.answer_ids.device)
    token = _STATE.set(state)
    try:
        with tracing._frozen(adapter.model), tracing._attn_implementation(adapter.text_config, CROSS_CAPTURE_NAME):
            with torch.set_grad_enabled(want_grads):
                handles = _detach_layer_inputs(layers, rows, start, stop)
                try:
                    adapter.backbone_forward(tracing._model_inputs(adapter, batch, None))
                finally:
                    for h in handles:
                        h.remove()
                lens = _lens(adapter, torch.stack(rows, dim=1), answer_ids)  # (B, L, T) left-aligned
                if want_grads:
                    lens.sum().backward()
    finally:
        _STATE.reset(token)
    probs = [state.probs[i] for i in range(len(layers))]
    lengths = _lengths(batch)
    attentions = _right_align(torch.stack([p.detach() for p in probs], dim=1), lengths, 3)  # (B, L, H, T, N)
    grads = None
    if want_grads:
        found = [p.grad if p.grad is not None else torch.zeros_like(p) for p in probs]
        grads = _right_align(torch.stack(found, dim=1).detach(), lengths, 3)
    input_ids = batch.inputs["input_ids"]
    grid_mask = adapter.image_token_mask(input_ids)
    counts = grid_mask.sum(1)
    h, w = batch.image_grid
    if (counts != h * w).any():
        raise ValueError(f"every sample needs {h * w} image-grid features in the encoder; got {counts.tolist()}")
    image_index = torch.nonzero(grid_mask)[:, 1].view(input_ids.shape[0], -1)
    text = batch.inputs["attention_mask"].bool() & (input_ids != adapter.image_token_id)  # (B, N)
    right_mask = batch.answer_ids.to(text.device) >= 0
    return tracing.Trace(
        batch=batch,
        attentions=attentions,
        grads=grads,
        logit_lens=_right_align(lens.detach(), lengths, 2),
        image_index=image_index,
        text_mask=text[:, None, :].expand(-1, right_mask.shape[1], -1),
        answer_mask=right_mask,
        grid=batch.image_grid,
        adapter=adapter,
    )


def _lens(adapter: VLMAdapter, hidden: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """``(B, L, T)`` ``U[w_t] · norm(h^l_{p_t}) (+ b[w_t])`` of decoder rows ``(B, L, T, D)``; 0 on padding."""
    ids = answer_ids.clamp(min=0)
    unembed = adapter.unembedding.weight[ids]  # (B, T, D)
    lens = (adapter.final_norm(hidden) * unembed[:, None].to(hidden.dtype)).sum(-1)
    bias = getattr(adapter.unembedding, "bias", None)
    if bias is not None:
        lens = lens + bias[ids][:, None]
    return lens * (answer_ids >= 0)[:, None]


def answer_log_probs(
    adapter: VLMAdapter, batch: TeacherForcedBatch, pixel_values: torch.Tensor, index: int | None = None
) -> torch.Tensor:
    """``log p(w_t | image, prompt, w_<t)`` of the answer tokens with other pixel values.

    The encoder-decoder form of :func:`dexar.tracing.answer_log_probs` (same arguments).

    Returns:
        ``(B, T)`` or ``(K, T)`` right-aligned log-probabilities, 0 on padding slots.

    """
    if index is None:
        sub = dataclasses.replace(batch, inputs={**batch.inputs, "pixel_values": pixel_values})
    else:
        sub = adapter.repeat_sample(batch, index, pixel_values)
    start, stop = _answer_rows(sub)
    with tracing._frozen(adapter.model):
        out = adapter.backbone_forward(tracing._model_inputs(adapter, sub, None))
    hidden = out.last_hidden_state[:, start:stop]
    answer_ids = _left_answers(sub).to(hidden.device)
    left = tracing._log_probs(adapter, hidden, answer_ids)
    return _right_align(left, _lengths(sub), 1)
