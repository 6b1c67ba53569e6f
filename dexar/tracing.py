"""One instrumented teacher-forced forward (+ one backward) recording what the methods need.

The exact one-pass computation of DEX-AR's gradients (ARCHITECTURE.md):

* ``y_t^l = U[w_t] · norm(h^l_{p_t})`` (logit lens) depends on layer ``l``'s attention ``A^l`` only
  through layer ``l`` itself, and position ``p_t``'s output only through row ``p_t`` of ``A^l``.
* So the sequence runs once with every decoder layer's *input* detached; the answer rows of each
  ``A^l`` are captured as leaf tensors and the rows' output is computed from them; one backward of
  ``Σ_{l,t} y_t^l`` gives every ``g_t^l = ∂y_t^l/∂A^l[:, p_t, :]`` exactly.

Only the answer rows are materialised (memory ``O(L·H·T·N)``): the capture function is registered
in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` under :data:`CAPTURE_NAME`;
every other row is computed by SDPA. Parameters never receive gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dexar.adapters.base import TeacherForcedBatch, VLMAdapter

CAPTURE_NAME = "dexar_capture"
NEEDS = frozenset({"attention_rows", "layer_grads"})


@dataclass
class _CaptureState:
    """What the capture function records during one traced forward."""

    start: int
    stop: int
    requires_grad: bool
    probs: dict[int, torch.Tensor] = field(default_factory=dict)


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
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )
    state = _STATE.get()
    layer = getattr(module, "layer_idx", None)
    if state is None or layer is None:
        return out, None
    probs = _answer_row_probs(module, query, key, attention_mask, scaling, is_causal, state.start, state.stop)
    leaf = probs.detach().requires_grad_(state.requires_grad)
    state.probs[layer] = leaf
    groups = getattr(module, "num_key_value_groups", 1)
    value = repeat_kv(value, groups) if groups > 1 else value
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

    """

    batch: TeacherForcedBatch
    attentions: torch.Tensor
    grads: torch.Tensor | None
    logit_lens: torch.Tensor
    image_index: torch.Tensor
    text_mask: torch.Tensor
    answer_mask: torch.Tensor
    grid: tuple[int, int]

    def select_layers(self, layers: slice) -> Trace:
        """The same trace restricted to some decoder layers (e.g. ``slice(-1, None)``: the last)."""
        grads = self.grads[:, layers] if self.grads is not None else None
        return dataclasses.replace(
            self, attentions=self.attentions[:, layers], grads=grads, logit_lens=self.logit_lens[:, layers]
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


def run(adapter: VLMAdapter, batch: TeacherForcedBatch, needs: frozenset[str] | set[str] = NEEDS) -> Trace:
    """Trace one teacher-forced batch: one forward and, if ``layer_grads`` is needed, one backward.

    Args:
        adapter: Adapter of the model (its parameters are frozen for the call).
        batch: Left-padded prompt + answer batch from :meth:`VLMAdapter.build_batch`.
        needs: Subset of :data:`NEEDS`.

    Returns:
        The :class:`Trace`; tensors stay on the model's device.

    """
    unknown = set(needs) - NEEDS
    if unknown:
        raise ValueError(f"unknown trace needs {sorted(unknown)}; known: {sorted(NEEDS)}")
    model = adapter.model
    want_grads = "layer_grads" in needs
    input_ids = batch.input_ids
    n = input_ids.shape[1]
    t_max = batch.answer_ids.shape[1]
    start, stop = n - 1 - t_max, n - 1  # predicting rows p_t of the right-aligned answer slots
    if start < 0:
        raise ValueError("sequence too short for its answer")
    layers = adapter.decoder_layers
    hidden_rows: list[torch.Tensor | None] = [None] * len(layers)
    state = _CaptureState(start, stop, want_grads)
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.inputs.items()}

    token = _STATE.set(state)
    handles = _detach_layer_inputs(layers, hidden_rows, start, stop)
    try:
        with _frozen(model), _attn_implementation(adapter.text_config, CAPTURE_NAME), torch.enable_grad():
            adapter.backbone_forward(inputs)
            answer_ids = batch.answer_ids.to(input_ids.device)
            answer_mask = answer_ids >= 0
            rows = adapter.unembedding.weight[answer_ids.clamp(min=0)]  # (B, T, D)
            hidden = torch.stack(hidden_rows, dim=1)  # (B, L, T, D)
            lens = (adapter.final_norm(hidden) * rows[:, None].to(hidden.dtype)).sum(-1)  # (B, L, T)
            bias = getattr(adapter.unembedding, "bias", None)
            if bias is not None:
                lens = lens + bias[answer_ids.clamp(min=0)][:, None]
            lens = lens * answer_mask[:, None]
            if want_grads:
                lens.sum().backward()
    finally:
        for h in handles:
            h.remove()
        _STATE.reset(token)

    probs = [state.probs[i] for i in range(len(layers))]
    attentions = torch.stack([p.detach() for p in probs], dim=1)
    grads = None
    if want_grads:
        grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in probs], dim=1)
    image_mask = adapter.image_token_mask(input_ids)
    counts = image_mask.sum(1)
    if counts.min() != counts.max() or int(counts[0]) == 0:
        raise ValueError(f"every sample needs the same, non-zero number of image tokens; got {counts.tolist()}")
    image_index = torch.nonzero(image_mask)[:, 1].view(input_ids.shape[0], -1)
    columns = torch.arange(n, device=input_ids.device)
    row_pos = torch.arange(start, stop, device=input_ids.device)
    valid = batch.inputs["attention_mask"].bool() & ~image_mask  # (B, N)
    text_mask = valid[:, None, :] & (columns[None, None, :] <= row_pos[None, :, None])
    return Trace(
        batch=batch,
        attentions=attentions,
        grads=grads,
        logit_lens=lens.detach(),
        image_index=image_index,
        text_mask=text_mask,
        answer_mask=answer_mask,
        grid=batch.image_grid,
    )
