"""Instrumenting one forward: frozen parameters, the capture attention, layer hooks, the answer-rows re-run.

The hooks apply each layer's :class:`~dexar.trace.plan.LayerPlan` to its input hidden states (detach
them, start the graph there, or keep it; record them for ``hidden_grads``) and keep the output rows
``p_t``: the states the logit lens reads. A ``RERUN_ROWS`` layer's output rows come from its answer-rows
re-run (:func:`rerun_answer_rows`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dexar.trace import tail
from dexar.trace.attention import (
    CAPTURE_NAME,
    GIVEN_NAME,
    AttentionCall,
    Session,
    active,
    attend,
    given,
)
from dexar.trace.given import RowCapture, exact_rerun, repeat_values
from dexar.trace.plan import Capture, Input
from dexar.trace.precision import upcast, working_dtype

if TYPE_CHECKING:
    from dexar.adapters.base import TeacherForcedBatch, VLMAdapter


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
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
def attn_implementation(config: Any, name: str) -> Iterator[None]:
    """Temporarily switch a (text) config's attention implementation."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def traced(adapter: VLMAdapter, session: Session) -> Iterator[None]:
    """The session active, the capture attention, frozen parameters and grad mode on (:func:`forward` sets its own)."""
    with active(session), frozen(adapter.model), attn_implementation(adapter.text_config, CAPTURE_NAME):
        with torch.enable_grad():
            yield


@contextlib.contextmanager
def given_attention(config: Any, function: Callable[[AttentionCall], torch.Tensor]) -> Iterator[None]:
    """Every attention under ``config`` returns ``function(call)`` (a layer re-run with given probabilities)."""
    with given(function), attn_implementation(config, GIVEN_NAME):
        yield


def model_inputs(
    adapter: VLMAdapter, batch: TeacherForcedBatch, pixel_values: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The batch's model inputs in the model's dtype, optionally with other pixel values."""
    dtype = next(adapter.model.parameters()).dtype
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.inputs.items()}
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values.to(dtype)
    return inputs


@dataclass
class Forward:
    """What the layer hooks kept during one instrumented forward (tensors may carry graph).

    Attributes:
        rows: Per layer, ``(B, T, D)`` its output at the answer rows ``p_t``.
        inputs: Layer → ``(B, N, D)`` its input hidden states (``LayerPlan.keep_input``).
        last: ``(B, N, D)`` the last layer's output (``Plan.final_hidden``).

    """

    rows: list[torch.Tensor | None]
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    last: torch.Tensor | None = None


def forward(
    adapter: VLMAdapter,
    batch: TeacherForcedBatch,
    session: Session,
    pixel_values: torch.Tensor | None = None,
    rows_done: Callable[[int, torch.Tensor, Callable | None], None] | None = None,
) -> Forward:
    """Run the model once inside :func:`traced`, the layer hooks of ``session``'s plan installed.

    Autograd records the forward only if the plan needs it (:attr:`~dexar.trace.plan.Plan.forward_grad`).

    Args:
        adapter: The model's adapter.
        batch: The teacher-forced batch.
        session: The active session (plan, answer rows, recording).
        pixel_values: Other pixel values than the batch's (the probes' forwards).
        rows_done: Called with ``(layer, rows, backward)`` right after a ``RERUN_ROWS`` layer's forward, while
            its weights are still in cache: ``rows`` its ``(B, T, D)`` output rows and ``backward`` ``None``, the
            rows in its re-run's graph (under grad mode); or, for a SwiGLU block (:mod:`dexar.trace.tail`),
            ``rows`` without a graph and ``backward(δ) = ∂y/∂A[p_t]`` for ``δ = ∂y/∂rows``. ``Forward.rows``
            keeps them detached when it is given.

    """
    layers = adapter.decoder_layers
    kept = Forward(rows=[None] * len(layers))
    handles = layer_hooks(layers, session, adapter.text_config, kept, rows_done)
    try:
        with torch.set_grad_enabled(session.plan.forward_grad):
            adapter.backbone_forward(model_inputs(adapter, batch, pixel_values))
    finally:
        for handle in handles:
            handle.remove()
    return kept


def layer_hooks(
    layers: nn.ModuleList,
    session: Session,
    config: Any,
    kept: Forward,
    rows_done: Callable[[int, torch.Tensor, Callable | None], None] | None = None,
) -> list:
    """Hooks applying the plan to each layer's input and keeping its output rows in ``kept``.

    A ``RERUN_ROWS`` layer computing in its own precision also gets a :class:`~dexar.trace.given.RowCapture`
    (its linears' output rows, which its re-run takes instead of recomputing them).
    """
    plan, rows = session.plan, session.rows
    last = len(layers) - 1
    captures = {
        i: RowCapture(
            layer,
            rows,
            [m for m in layer.modules() if session.layer_of(m) == i],
            lambda i=i: i in session.record.reruns,
        )
        for i, layer in enumerate(layers)
        if plan.layers[i].capture is Capture.RERUN_ROWS and exact_rerun(layer)
    }

    def make_pre(index: int):
        step = plan.layers[index]
        capture = captures.get(index)

        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if capture is not None:
                capture.arm(hidden.shape[1], keep_inputs=rows_done is not None and module not in tail.CHECKED)
            if step.input is Input.DETACH:
                hidden = hidden.detach()
            elif step.input is Input.LEAF:
                hidden = hidden.detach().requires_grad_(True)
            if step.keep_input:
                kept.inputs[index] = hidden
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return pre_hook

    def make_post(index: int):
        step = plan.layers[index]
        capture = captures.get(index)

        def post_hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if index == last and plan.final_hidden:
                kept.last = hidden
            if step.capture is Capture.RERUN_ROWS:
                fast = (
                    None
                    if capture is None or rows_done is None
                    else _block_backward(module, index, args, kwargs, hidden, session, capture)
                )
                if fast is not None:  # a SwiGLU block: its backward by hand, no re-run
                    out = hidden[:, rows].clone()
                    rows_done(index, out, fast)
                else:
                    with torch.enable_grad():
                        out = rerun_answer_rows(module, index, args, kwargs, hidden.shape[1], session, config, capture)
                        if rows_done is not None:
                            rows_done(index, out, None)
                            out = out.detach()
                kept.rows[index] = out
            else:
                kept.rows[index] = hidden[:, rows].clone()  # a view would keep the whole (B, N, D) output alive

        return post_hook

    handles: list = [capture for capture in captures.values()]
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(make_pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(make_post(i), with_kwargs=True))
    return handles


def _block_backward(
    layer: nn.Module, index: int, args: tuple, kwargs: dict, hidden: torch.Tensor, session: Session, capture: RowCapture
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The hand-written backward of a SwiGLU block (:mod:`dexar.trace.tail`) whose attention returns ``o_proj(A V)``.

    ``None`` (the layer is re-run) unless both were checked on the forward's rows. On success the layer's
    recorded attention and rows are consumed.
    """
    rows = session.rows
    attention = session.record.reruns[index]
    projection = capture.projection(attention)
    block = tail.SwiGLUBlock.of(layer)
    if projection is None or block is None or projection is not block.o_proj:
        return None
    x = (args[0] if args else kwargs["hidden_states"])[:, rows]
    values = repeat_values(attention.module, attention.values)
    backward = tail.swiglu_backward(block, layer, capture.output_rows(), capture.inputs, x, hidden[:, rows], values)
    if backward is not None:
        session.record.reruns.pop(index)
        capture.clear()
    return backward


def without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A decoder layer's keyword arguments for a re-run that reads and writes no KV cache."""
    out = {**kwargs, "use_cache": False}
    for name in ("cache", "past_key_values"):  # transformers 5 renames past_key_values: clear the one passed
        if name in out:
            out[name] = None
    return out


def _slice_sequence(value: Any, n: int, rows: slice, dim: int) -> Any:
    """``value[..., rows, ...]`` along ``dim`` for tensors (or tuples of them) of length ``n`` there."""
    if isinstance(value, tuple):
        return tuple(_slice_sequence(v, n, rows, dim) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() >= -dim and value.shape[dim] == n:
        return value.narrow(dim % value.dim(), rows.start, rows.stop - rows.start)
    return value


def rerun_answer_rows(
    layer: nn.Module,
    index: int,
    args: tuple,
    kwargs: dict,
    n: int,
    session: Session,
    config: Any,
    capture: RowCapture | None = None,
) -> torch.Tensor:
    """Decoder layer ``index`` on its answer rows only, with grad; its attention rows come from the leaf.

    The forward ran without autograd; right after a ``RERUN_ROWS`` layer's full forward, the layer runs
    again on its (detached) answer rows: its attention returns ``leaf @ V`` (the captured probabilities
    times the full pass's values), and everything after attention (output projection, residuals,
    norms, MLP) is row-local, so the rows equal the full pass's rows while the graph holds ``T`` rows
    instead of ``N``. Memory: ``L·T·(D + MLP width)`` instead of ``L·N·(…)``. The layer's ``forward`` is
    called directly, so its hooks do not run again.

    With a ``capture`` (a float32/float64 model), the linears and ``leaf @ V`` (or the whole attention
    module) return the full forward's rows and keep only their backward (:mod:`dexar.trace.given`): the
    rows are the full pass's own.
    On a bf16/fp16 model the re-run computes in float32 (:mod:`dexar.trace.precision`; ``T`` rows,
    cheap): the logit lens then reads float32 rows.
    """
    rows = session.rows
    hidden = (args[0] if args else kwargs["hidden_states"]).detach()[:, rows]
    hidden = hidden.to(working_dtype(hidden.dtype))
    rows_kwargs = without_cache({k: v for k, v in kwargs.items() if k != "hidden_states"})
    if "position_embeddings" in rows_kwargs:  # (cos, sin): sequence on dim -2 (also M-RoPE's (3, B, N, d))
        rows_kwargs["position_embeddings"] = _slice_sequence(rows_kwargs["position_embeddings"], n, rows, -2)
    for key in ("position_ids", "cache_position"):
        if key in rows_kwargs:
            rows_kwargs[key] = _slice_sequence(rows_kwargs[key], n, rows, -1)
    leaf = session.record.rows[index]
    attention = session.record.reruns.pop(index)
    if capture is None:
        function = lambda call: attend(call.module, leaf, attention.values, call.query.dtype)  # noqa: E731
        with given_attention(config, function), torch.enable_grad(), upcast(layer):
            out = layer.forward(hidden, *args[1:], **rows_kwargs)
    else:
        with capture.given(leaf, attention) as function, given_attention(config, function), torch.enable_grad():
            out = layer.forward(hidden, *args[1:], **rows_kwargs)
    return out[0] if isinstance(out, tuple) else out
