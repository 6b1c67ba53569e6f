"""The trace of a decoder-only VLM: its decoder's self-attention over image and text tokens.

The exact one-pass computation of DEX-AR's gradients (ARCHITECTURE.md):

* ``y_t^l = U[w_t] · norm(h^l_{p_t})`` (logit lens, eq. 3) depends on layer ``l``'s attention ``A^l``
  only through layer ``l`` itself, and position ``p_t``'s output only through row ``p_t`` of ``A^l``.
* So the sequence runs once with every decoder layer's *input* detached; the answer rows of each
  ``A^l`` are captured as leaf tensors and the rows' output is computed from them; one backward of
  ``Σ_{l,t} y_t^l`` gives every ``g_t^l = ∂y_t^l/∂A^l[:, p_t, :]`` exactly.

The baselines' needs are served by the same forward (:mod:`dexar.trace.plan`); the final logit's
gradients add one backward per answer token (:mod:`dexar.trace.backward`).
Parameters never receive gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dexar.trace import backward, instrument
from dexar.trace.attention import Session, layer_index
from dexar.trace.layout import DecoderLayout
from dexar.trace.lens import LogitLens
from dexar.trace.plan import Capture, make_plan
from dexar.trace.precision import upcast, working_dtype
from dexar.trace.record import Trace

if TYPE_CHECKING:
    from dexar.adapters.base import TeacherForcedBatch, VLMAdapter

LAYOUT = DecoderLayout()


def image_positions(adapter: VLMAdapter, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, N)`` image-token mask and ``(B, V)`` image positions (the same count in every sample)."""
    image_mask = adapter.image_token_mask(input_ids)
    counts = image_mask.sum(1)
    if counts.min() != counts.max() or int(counts[0]) == 0:
        raise ValueError(f"every sample needs the same, non-zero number of image tokens; got {counts.tolist()}")
    return image_mask, torch.nonzero(image_mask)[:, 1].view(input_ids.shape[0], -1)


def run(
    adapter: VLMAdapter, batch: TeacherForcedBatch, needs: frozenset[str] | set[str], grad_chunk: int | None = None
) -> Trace:
    """Trace one left-padded teacher-forced batch: one forward and the fewest backwards the needs allow.

    See :func:`dexar.trace.run` for the arguments.
    """
    num_layers = len(adapter.decoder_layers)
    plan = make_plan(needs, "decoder", num_layers, adapter.row_local_layers)
    input_ids = batch.input_ids
    rows = LAYOUT.rows(batch)
    image_mask, image_index = image_positions(adapter, input_ids)
    answer_ids = LAYOUT.row_answers(batch)
    session = Session(plan, rows, layer_index)
    record = session.record
    grads = final_grad_rollout = None
    grad_x_hidden: dict[int, torch.Tensor] = {}
    local: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def rows_done(index: int, rows_out: torch.Tensor, block_backward) -> None:
        """A re-run layer's ``y_t^l`` and ``g_t^l`` now, while its weights are in cache."""
        if block_backward is None:  # rows_out is in the re-run's graph
            lens_l = lens_of(rows_out)
            (grad,) = torch.autograd.grad(lens_l.sum(), record.rows[index], allow_unused=True)
        else:  # the lens' gradient at the rows, then the block's hand-written backward
            lens_l, delta = lens_of.value_and_grad(rows_out)
            grad = block_backward(delta)
        local[index] = (lens_l.detach(), grad)

    with instrument.traced(adapter, session):
        lens_of = LogitLens(adapter, answer_ids)  # parameters frozen here: no graph to the unembedding
        kept = instrument.forward(adapter, batch, session, rows_done=rows_done if plan.layer_grads else None)
        lens = [local[i][0] if i in local else lens_of(kept.rows[i]) for i in range(num_layers)]
        if plan.graph_from is not None:
            final = lens[-1]  # y_t^L: the model's own logit of w_t
            if plan.final_logit_grads:
                graph = [record.probs[i] for i, layer in enumerate(plan.layers) if layer.capture is Capture.GRAPH]
                final_grad_rollout = backward.grad_rollout(final, graph, rows)
            if plan.hidden_grads:
                grad_x_hidden = backward.grad_x_hidden(
                    final, kept.inputs, record, plan.hidden_grads, image_index, num_layers, rows, grad_chunk
                )
        if plan.layer_grads:
            done = {i: grad for i, (_, grad) in local.items()}
            grads = torch.stack(backward.layer_grads(lens, record, plan, rows, done), dim=1).detach()

    attentions = torch.stack([record.answer_rows(i, rows).detach() for i in range(num_layers)], dim=1)
    full_attention = torch.stack([record.mean[i] for i in range(num_layers)], 1) if plan.full_attention else None
    final_hidden = None
    if plan.final_hidden:  # float32 on a bf16 model: TAM min-maxes logits read from it
        with torch.no_grad(), upcast(adapter.final_norm):
            final_hidden = adapter.final_norm(kept.last.detach().to(working_dtype(kept.last.dtype)))
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    row_pos = columns[rows]
    valid = batch.inputs["attention_mask"].bool() & ~image_mask  # (B, N)
    text_mask = valid[:, None, :] & (columns[None, None, :] <= row_pos[None, :, None])
    return Trace(
        batch=batch,
        attentions=attentions,
        grads=grads,
        logit_lens=torch.stack(lens, dim=1).detach(),
        image_index=image_index,
        text_mask=text_mask,
        answer_mask=answer_ids >= 0,
        grid=batch.image_grid,
        adapter=adapter,
        full_attention=full_attention,
        final_grad_rollout=final_grad_rollout,
        grad_x_hidden={k: v.detach() for k, v in grad_x_hidden.items()},
        final_hidden=final_hidden,
    )
