"""The trace of an encoder-decoder VLM: its decoder's cross-attention over the encoder (paper appendix D).

The decoder-only argument (:mod:`dexar.trace.decoder`) carries over: the logit lens
``y_t^l = U[w_t] · norm(h^l_{p_t})`` of decoder layer ``l`` depends on that layer's cross-attention
``C^l`` (decoder rows × encoder columns) only through layer ``l`` itself, and only through row
``p_t``. So the decoder runs once with every layer's input detached, the answer rows of each ``C^l``
are captured as leaf tensors and the rows' output is recomputed from them; one backward of
``Σ_{l,t} y_t^l`` gives every ``g_t^l = ∂y_t^l/∂C^l[:, p_t, :]`` exactly. The encoder and the decoder's
self-attention run SDPA untouched; no parameter receives a gradient.

The batch is a right-padded :class:`~dexar.adapters.florence2.Seq2SeqBatch`: the answer rows are
captured left-aligned (decoder positions ``P-1 … P-2+T``) and moved to the right-aligned slots of the
:class:`~dexar.trace.record.Trace` afterwards (:class:`~dexar.trace.layout.CrossLayout`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dexar.trace import backward, instrument
from dexar.trace.attention import Session
from dexar.trace.layout import CrossLayout
from dexar.trace.lens import layer_lens
from dexar.trace.plan import make_plan
from dexar.trace.record import Trace

if TYPE_CHECKING:
    from dexar.adapters.base import TeacherForcedBatch, VLMAdapter

LAYOUT = CrossLayout()


def run(
    adapter: VLMAdapter, batch: TeacherForcedBatch, needs: frozenset[str] | set[str], grad_chunk: int | None = None
) -> Trace:
    """Trace one teacher-forced encoder-decoder batch: one forward, at most one backward.

    Args:
        adapter: A cross-attention adapter (``cross_attention_modules``: each decoder layer's).
        batch: Right-padded :class:`~dexar.adapters.florence2.Seq2SeqBatch`.
        needs: ``attention_rows``, ``layer_grads``, ``extra_forwards``; any other need raises
            :class:`~dexar.adapters.base.DexarInputError` naming it.
        grad_chunk: Unused (no batched backward here).

    Returns:
        A :class:`~dexar.trace.record.Trace` whose columns ``N`` are the encoder positions.

    """
    num_layers = len(adapter.decoder_layers)
    plan = make_plan(needs, "cross", num_layers)
    rows = LAYOUT.rows(batch)
    traced = {id(m): i for i, m in enumerate(adapter.cross_attention_modules)}
    session = Session(plan, rows, lambda module: traced.get(id(module)))
    record = session.record
    answer_ids = LAYOUT.row_answers(batch)
    grads = None
    with instrument.traced(adapter, session):
        kept = instrument.forward(adapter, batch, session)
        lens = layer_lens(adapter, kept.rows, answer_ids)  # left-aligned
        if plan.layer_grads:
            found = backward.layer_grads(lens, record, plan, rows)
            grads = LAYOUT.to_slots(torch.stack(found, dim=1).detach(), batch, 3)
    attentions = torch.stack([record.rows[i].detach() for i in range(num_layers)], dim=1)  # (B, L, H, T, N)
    input_ids = batch.inputs["input_ids"]
    grid_mask = adapter.image_token_mask(input_ids)
    counts = grid_mask.sum(1)
    h, w = batch.image_grid
    if (counts != h * w).any():
        raise ValueError(f"every sample needs {h * w} image-grid features in the encoder; got {counts.tolist()}")
    image_index = torch.nonzero(grid_mask)[:, 1].view(input_ids.shape[0], -1)
    text = batch.inputs["attention_mask"].bool() & (input_ids != adapter.image_token_id)  # (B, N)
    answer_mask = batch.answer_ids.to(text.device) >= 0
    return Trace(
        batch=batch,
        attentions=LAYOUT.to_slots(attentions, batch, 3),
        grads=grads,
        logit_lens=LAYOUT.to_slots(torch.stack(lens, dim=1).detach(), batch, 2),
        image_index=image_index,
        text_mask=text[:, None, :].expand(-1, answer_mask.shape[1], -1),
        answer_mask=answer_mask,
        grid=batch.image_grid,
        adapter=adapter,
    )
