"""The extra forwards of the perturbation-style baselines (need ``extra_forwards``).

* :func:`answer_log_probs`: the answer's log-likelihood with other pixel values (Integrated Gradients'
  path points, RISE's masked images); differentiable w.r.t. the pixels.
* :func:`grad_weighted_attention`: Chefer's gradient-weighted attention of the answer's log-likelihood,
  with the last layer's attention scaled (IIA's inner integrand).

Parameters never receive gradients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from dexar.trace import backward, instrument
from dexar.trace.attention import Session, attend, layer_index
from dexar.trace.layout import DecoderLayout, layout_of
from dexar.trace.lens import log_probs
from dexar.trace.plan import graph_plan

if TYPE_CHECKING:
    from dexar.adapters.base import TeacherForcedBatch, VLMAdapter


def answer_log_probs(
    adapter: VLMAdapter, batch: TeacherForcedBatch, pixel_values: torch.Tensor, index: int | None = None
) -> torch.Tensor:
    """``log p(w_t | image, prompt, w_<t)`` of the answer tokens with other pixel values.

    A plain forward (the model's own attention); differentiable w.r.t. ``pixel_values`` when grad
    mode is on. Only the answer rows of the last decoder layer go through the final norm and the
    unembedding.

    Args:
        adapter: Adapter of the model.
        batch: The traced batch.
        pixel_values: ``(B, C, H, W)`` one image per sample, or with ``index`` ``(K, *view)`` pixel views
            all for sample ``index`` (:meth:`VLMAdapter.pixel_view`; ``(K, C, H, W)`` for LLaVA).
        index: Score only this sample (its padded row repeated ``K`` times).

    Returns:
        ``(B, T)`` or ``(K, T)`` right-aligned log-probabilities, 0 on padding slots.

    """
    layout = layout_of(adapter)
    if index is None:
        sub = dataclasses.replace(batch, inputs={**batch.inputs, "pixel_values": pixel_values})
    else:  # the adapter knows how one sample's pixels batch up (per-sample grids, tiles)
        sub = adapter.repeat_sample(batch, index, pixel_values)
    rows = layout.rows(sub)
    kept: list[torch.Tensor] = []

    def keep_rows(module, args, output):
        kept.append((output[0] if isinstance(output, tuple) else output)[:, rows])

    handle = adapter.decoder_layers[-1].register_forward_hook(keep_rows)
    try:
        with instrument.frozen(adapter.model):
            adapter.backbone_forward(instrument.model_inputs(adapter, sub))
            scores = log_probs(adapter, kept[-1], layout.row_answers(sub))
    finally:
        handle.remove()
    return layout.to_slots(scores, sub, 1)


def grad_weighted_attention(
    adapter: VLMAdapter,
    batch: TeacherForcedBatch,
    pixel_values: torch.Tensor | None = None,
    last_scales: Sequence[float] = (1.0,),
    per_token: bool = True,
) -> torch.Tensor:
    """Chefer's ``Ā_t^l = mean_h ReLU(∂f_t/∂A^{l,h} ⊙ A^{l,h})`` with ``f_t = log p(w_t | ...)``.

    One forward with every attention row in the graph, then one backward per answer token (or one
    for their sum), each layer's product reduced as its gradient arrives (IIA's inner integrand),
    summed over ``last_scales`` ``(β_1, …)``: for each ``β`` the
    last decoder layer runs again with ``β·A^L`` (``A^L`` of this forward, detached) given in place
    of ``softmax(QK^T)`` (a leaf: no gradient through that layer's queries and keys). The layers below
    do not depend on ``β``, so their forward and graph are shared by every ``β``: one forward,
    ``len(last_scales)`` last-layer re-runs and backwards. Decoder-only models (self-attention).

    Args:
        adapter: Adapter of the model.
        batch: The traced batch.
        pixel_values: Replace the batch's pixel values.
        last_scales: Scales ``β`` of the given last-layer attention.
        per_token: One target per answer token; else the answer's log-likelihood ``Σ_t f_t``.

    Returns:
        ``(B, T, L, N, N)``, or ``(B, 1, L, N, N)`` when ``per_token`` is False.

    """
    layers = adapter.decoder_layers
    last = len(layers) - 1
    layout = DecoderLayout()
    rows = layout.rows(batch)
    session = Session(graph_plan(len(layers)), rows, layer_index)
    call: dict[str, Any] = {}

    def keep_call(module, args, kwargs):
        call["args"], call["kwargs"] = args, kwargs

    with instrument.traced(adapter, session):
        handle = layers[last].register_forward_pre_hook(keep_call, with_kwargs=True)
        try:
            instrument.forward(adapter, batch, session, pixel_values)
        finally:
            handle.remove()
        lower = [session.record.probs[i] for i in range(last)]
        own = session.record.probs[last].detach()
        args, kwargs = call["args"], instrument.without_cache(call["kwargs"])
        answer_ids = layout.row_answers(batch)
        total = None
        for beta in last_scales:
            given = (own * beta).requires_grad_(True)
            with instrument.given_attention(
                adapter.text_config, lambda c, given=given: attend(c.module, given, c.value, c.query.dtype)
            ):
                out = layers[last](*args, **kwargs)
            target = log_probs(adapter, (out[0] if isinstance(out, tuple) else out)[:, rows], answer_ids)
            cam = backward.grad_attention(target, [*lower, given], per_token).detach()
            total = cam if total is None else total + cam
        return total
