"""Attention with capture: the one masking implementation and one capture function per :class:`Capture` mode.

Registered in transformers' ``AttentionInterface`` *and* ``AttentionMaskInterface`` under
:data:`CAPTURE_NAME` (with ``sdpa_mask``; a name missing from the mask interface silently gets no mask).
While a :class:`Session` is :func:`active`, each traced attention module (the session's
``layer_of``) runs the capture function its :class:`~dexar.trace.plan.LayerPlan` names; every other
attention module under the same config (an encoder, a decoder's self-attention next to a traced
cross-attention) runs SDPA untouched. Only the answer rows ``p_t`` are materialised unless the plan
asks for every row, so memory is ``O(L·H·T·N)``, not ``O(L·H·N²)``.

A layer re-run with given probabilities (the answer-rows re-run, IIA's injected last layer) uses
:data:`GIVEN_NAME`, whose output is the function set by :func:`given`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dexar.trace.given import AttentionRows
from dexar.trace.plan import Capture, LayerPlan, Plan

CAPTURE_NAME = "dexar_capture"
GIVEN_NAME = "dexar_given"


class _MaskedSoftmax(torch.autograd.Function):
    """``softmax(scores)`` with the rows where ``keep`` is False set to zero, holding one ``(B, H, R, N)`` tensor.

    Equals ``softmax(scores) * keep`` and its gradient, bit for bit (the same softmax backward on the
    same output; a zero row's gradient is zero either way), without that product's second full copy:
    autograd kept both the softmax output (for its backward) and the product (for ``probs @ V``).
    """

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1).masked_fill_(~keep, 0)
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (probs,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, probs, -1, probs.dtype), None


def _fill_masked(scores: torch.Tensor, masked: torch.Tensor) -> None:
    """Set ``scores`` to their dtype's lowest value where ``masked`` (broadcast over the heads) is True, in place.

    Added as a bias of ``masked``'s shape: ``s + low`` rounds to ``low`` for any finite score, so this equals
    ``masked_fill_``, which costs five times as much on the CPU when it broadcasts over the heads.
    """
    low = torch.finfo(scores.dtype).min
    scores.add_(torch.zeros(masked.shape, dtype=scores.dtype, device=scores.device).masked_fill_(masked, low))


def attention_probs(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
    rows: slice = slice(None),
) -> torch.Tensor:
    """``softmax(q Kᵀ · s + mask)`` of query rows ``rows``: ``(B, H, R, N)``, float32 or wider, differentiable.

    The mask is the one the model built for SDPA (boolean, True = attend, or additive); ``None`` is
    SDPA's causal fast path (``sdpa_mask`` returns ``None`` for a plain causal mask), where causality
    is applied here unless the module is not causal (a cross-attention). Masked scores are set to the
    most negative finite value rather than ``-inf``, so their probability is still exactly 0, and a
    fully masked (left-padding) row is all zeros, as SDPA returns it, instead of NaN: no NaN reaches
    real positions' gradients.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    key = repeat_kv(key, groups) if groups > 1 else key
    work = torch.promote_types(query.dtype, torch.float32)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # The scale goes on the (R, d) queries, the masks in place: each (B, H, R, N) pass costs memory traffic.
    scores = torch.matmul(query[:, :, rows].to(work) * scale, key.to(work).transpose(-1, -2))
    n = key.shape[2]
    low = torch.finfo(work).min
    if attention_mask is not None:
        mask = attention_mask[:, :, rows, :n]
        if mask.dtype == torch.bool:
            _fill_masked(scores, ~mask)
            return _MaskedSoftmax.apply(scores, mask.any(-1, keepdim=True))
        scores = scores.add_(mask.to(work)).clamp(min=low)
    elif is_causal if is_causal is not None else getattr(module, "is_causal", True):
        positions = torch.arange(query.shape[2], device=query.device)[rows]
        offset = n - query.shape[2]
        future = torch.arange(n, device=query.device)[None, :] > positions[:, None] + offset
        _fill_masked(scores, future)
    return torch.softmax(scores, dim=-1)


def attend(module: nn.Module, probs: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``probs @ V`` in ``probs``' precision, as the layer expects it: ``(B, R, H, D)`` in ``dtype``."""
    groups = getattr(module, "num_key_value_groups", 1)
    value = repeat_kv(value, groups) if groups > 1 else value
    return torch.matmul(probs, value.to(probs.dtype)).to(dtype).transpose(1, 2).contiguous()


def splice(out: torch.Tensor, rows_out: torch.Tensor, rows: slice) -> torch.Tensor:
    """The attention output ``(B, N, H, D)`` with the sequence rows ``rows`` replaced by ``rows_out``."""
    return torch.cat([out[:, : rows.start], rows_out, out[:, rows.stop :]], dim=1)


@dataclass
class AttentionCall:
    """The arguments of one call of an attention function (transformers' interface)."""

    module: nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float | None
    is_causal: bool | None
    sdpa_kwargs: dict[str, Any]

    def probs(self, rows: slice = slice(None)) -> torch.Tensor:
        """Attention probabilities of query rows ``rows`` (:func:`attention_probs`)."""
        return attention_probs(
            self.module, self.query, self.key, self.attention_mask, self.scaling, self.is_causal, rows
        )

    def sdpa(self, detach: bool = False) -> torch.Tensor:
        """The layer's own SDPA output ``(B, N, H, D)``, optionally without a graph."""
        q, k, v = (x.detach() if detach else x for x in (self.query, self.key, self.value))
        out, _ = sdpa_attention_forward(
            self.module,
            q,
            k,
            v,
            self.attention_mask,
            scaling=self.scaling,
            is_causal=self.is_causal,
            **self.sdpa_kwargs,
        )
        return out

    def attend(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs @ V`` with this call's values (:func:`attend`)."""
        return attend(self.module, probs, self.value, self.query.dtype)


@dataclass
class Recording:
    """What the capture functions record during one traced forward, by decoder layer.

    Attributes:
        rows: ``(B, H, T, N)`` ``A^l[:, p_t, :]``: a leaf (``LEAF_ROWS``, ``RERUN_ROWS``) or in the graph
            (``GRAPH_ROWS``).
        probs: ``(B, H, N, N)`` every row of ``A^l``, in the graph (``GRAPH``).
        mean: ``(B, N, N)`` ``mean_h A^l`` over every row (:attr:`LayerPlan.mean`).
        outputs: ``(B, N, H, D)`` attention output of the graph layers (``GRAPH``, ``GRAPH_ROWS``).
        keys: ``(B, H_kv, N, D)`` their keys.
        values: ``(B, H_kv, N, D)`` their values.
        reruns: What ``RERUN_ROWS`` layers' re-runs take from their attention (its values, its output rows).

    """

    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    probs: dict[int, torch.Tensor] = field(default_factory=dict)
    mean: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    reruns: dict[int, AttentionRows] = field(default_factory=dict)

    def answer_rows(self, layer: int, rows: slice) -> torch.Tensor:
        """``(B, H, T, N)`` layer ``layer``'s answer rows, whichever way they were captured."""
        return self.rows[layer] if layer in self.rows else self.probs[layer][:, :, rows]


def layer_index(module: nn.Module) -> int | None:
    """Decoder layer of a decoder's self-attention module (transformers' ``layer_idx``), ``None`` for others."""
    return getattr(module, "layer_idx", None)


@dataclass(frozen=True)
class Session:
    """One traced forward: the plan, the answer rows, which modules are traced, and the recording.

    Attributes:
        plan: What each decoder layer records.
        rows: Sequence rows ``p_t`` of the answer slots.
        layer_of: Decoder layer of a traced attention module, ``None`` for any other.
        record: What was captured.

    """

    plan: Plan
    rows: slice
    layer_of: Callable[[nn.Module], int | None]
    record: Recording = field(default_factory=Recording)


def _leaf_rows(call: AttentionCall, session: Session, layer: int, step: LayerPlan) -> torch.Tensor:
    """SDPA for every row; the answer rows from a leaf copy of their probabilities (layer-local gradients).

    ``RERUN_ROWS`` stores the values and the output's answer rows instead (:class:`AttentionRows`): the forward
    runs without autograd and the layer's answer-rows re-run (:func:`dexar.trace.instrument.rerun_answer_rows`)
    computes the rows' graph from the leaf.
    """
    record = session.record
    if step.mean:  # every row's probabilities are computed anyway: the output from them, not a second pass
        with torch.no_grad():
            every = call.probs()
            record.mean[layer] = every.mean(1)
            out = call.attend(every)
    else:
        out = call.sdpa()
    leaf = call.probs(session.rows).detach().requires_grad_(session.plan.layer_grads)
    record.rows[layer] = leaf
    if step.capture is Capture.RERUN_ROWS:
        record.reruns[layer] = AttentionRows(
            call.module, call.value.detach(), out[:, session.rows].clone(), out.data_ptr()
        )
        return out
    return splice(out, call.attend(leaf), session.rows)


def _graph_rows(call: AttentionCall, session: Session, layer: int, step: LayerPlan) -> torch.Tensor:
    """SDPA without a graph for every row; the answer rows recomputed in the graph from ``q``, ``K``, ``V``."""
    probs = call.probs(session.rows)
    session.record.rows[layer] = probs
    return _keep(call, session, layer, splice(call.sdpa(detach=True), call.attend(probs), session.rows))


def _graph(call: AttentionCall, session: Session, layer: int, step: LayerPlan) -> torch.Tensor:
    """Every row explicit and kept in the graph."""
    probs = call.probs()
    session.record.probs[layer] = probs
    if step.mean:
        session.record.mean[layer] = probs.detach().mean(1)
    return _keep(call, session, layer, call.attend(probs))


def _keep(call: AttentionCall, session: Session, layer: int, out: torch.Tensor) -> torch.Tensor:
    """Record a graph layer's output, keys and values if its gradient × activation reads them (``hidden_grads``).

    Only those layers: a recorded output or key would keep a tensor alive that the graph does not hold.
    """
    if layer in session.plan.hidden_grads:
        record = session.record
        record.outputs[layer], record.keys[layer], record.values[layer] = out, call.key, call.value
    return out


CAPTURES: dict[Capture, Callable[[AttentionCall, Session, int, LayerPlan], torch.Tensor]] = {
    Capture.LEAF_ROWS: _leaf_rows,
    Capture.RERUN_ROWS: _leaf_rows,
    Capture.GRAPH_ROWS: _graph_rows,
    Capture.GRAPH: _graph,
}

_SESSION: ContextVar[Session | None] = ContextVar("dexar_trace_session", default=None)
_GIVEN: ContextVar[Callable[[AttentionCall], torch.Tensor] | None] = ContextVar("dexar_given", default=None)


@contextlib.contextmanager
def active(session: Session) -> Iterator[None]:
    """Make ``session`` the active one: :data:`CAPTURE_NAME` attention captures into it."""
    token = _SESSION.set(session)
    try:
        yield
    finally:
        _SESSION.reset(token)


@contextlib.contextmanager
def given(function: Callable[[AttentionCall], torch.Tensor]) -> Iterator[None]:
    """Make ``function(call)`` the output of :data:`GIVEN_NAME` attention."""
    token = _GIVEN.set(function)
    try:
        yield
    finally:
        _GIVEN.reset(token)


def _capture(call: AttentionCall) -> torch.Tensor:
    """:data:`CAPTURE_NAME`: the plan's capture function for a traced module, SDPA for any other."""
    session = _SESSION.get()
    layer = session.layer_of(call.module) if session is not None else None
    if layer is None:
        return call.sdpa()
    step = session.plan.layers[layer]
    return CAPTURES[step.capture](call, session, layer, step)


def _given(call: AttentionCall) -> torch.Tensor:
    """:data:`GIVEN_NAME`: the output of the function set by :func:`given`."""
    function = _GIVEN.get()
    if function is None:
        raise RuntimeError(f"{GIVEN_NAME} attention runs only inside dexar.trace.instrument.given_attention")
    return function(call)


def attention_function(handler: Callable[[AttentionCall], torch.Tensor]) -> Callable[..., tuple[torch.Tensor, None]]:
    """An attention function of transformers' ``AttentionInterface`` that hands its call to ``handler``."""

    def attention_forward(
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
        extra = {"dropout": dropout, **kwargs}
        return handler(AttentionCall(module, query, key, value, attention_mask, scaling, is_causal, extra)), None

    return attention_forward


capture_attention_forward = attention_function(_capture)
given_attention_forward = attention_function(_given)

AttentionInterface.register(CAPTURE_NAME, capture_attention_forward)
AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
AttentionInterface.register(GIVEN_NAME, given_attention_forward)
AttentionMaskInterface.register(GIVEN_NAME, sdpa_mask)
