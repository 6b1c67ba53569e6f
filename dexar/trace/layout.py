"""Where the answer rows ``p_t`` sit in a teacher-forced batch of each architecture.

Every :class:`~dexar.trace.record.Trace` holds its ``T`` answer slots right-aligned (padding first). A
decoder-only batch is left-padded, so its predicting rows are the ``T`` rows before the last and already
in slot order. An encoder-decoder batch (:class:`~dexar.adapters.florence2.Seq2SeqBatch`) is
right-padded: its rows follow the decoder prefix, left-aligned, and move to the right-aligned slots
afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from dexar.adapters.base import TeacherForcedBatch, VLMAdapter


class AnswerLayout(Protocol):
    """Answer rows of one architecture's batches."""

    def rows(self, batch: TeacherForcedBatch) -> slice:
        """The sequence rows ``p_t`` (of ``batch.input_ids``) the traced answer slots are read at."""
        ...

    def row_answers(self, batch: TeacherForcedBatch) -> torch.Tensor:
        """``(B, T)`` the answer token ``w_t`` predicted at each row of :meth:`rows`; padding ``-1``."""
        ...

    def to_slots(self, values: torch.Tensor, batch: TeacherForcedBatch, dim: int) -> torch.Tensor:
        """Move per-row values (rows on ``dim``) to the right-aligned answer slots; padding slots 0."""
        ...


class DecoderLayout:
    """Left-padded prompt + answer: the ``T`` rows before the last predict the right-aligned answer slots."""

    def rows(self, batch: TeacherForcedBatch) -> slice:
        n = batch.input_ids.shape[1]
        t = batch.answer_ids.shape[1]
        if n - 1 - t < 0:
            raise ValueError("sequence too short for its answer")
        return slice(n - 1 - t, n - 1)

    def row_answers(self, batch: TeacherForcedBatch) -> torch.Tensor:
        return batch.answer_ids.to(batch.input_ids.device)

    def to_slots(self, values: torch.Tensor, batch: TeacherForcedBatch, dim: int) -> torch.Tensor:
        return values


class CrossLayout:
    """Right-padded decoder prefix + answer: rows ``P-1 … P-2+T`` predict the answer, left-aligned."""

    def rows(self, batch: TeacherForcedBatch) -> slice:
        prefix = getattr(batch, "prefix_length", None)
        if prefix is None or prefix < 1:
            raise ValueError("cross-attention tracing needs a Seq2SeqBatch with a decoder prefix")
        return slice(prefix - 1, prefix - 1 + batch.answer_ids.shape[1])

    def row_answers(self, batch: TeacherForcedBatch) -> torch.Tensor:
        t = batch.answer_ids.shape[1]
        out = torch.full_like(batch.answer_ids, -1)
        for b, length in enumerate(answer_lengths(batch).tolist()):
            if length:
                out[b, :length] = batch.answer_ids[b, t - length :]
        return out.to(batch.answer_ids.device)

    def to_slots(self, values: torch.Tensor, batch: TeacherForcedBatch, dim: int) -> torch.Tensor:
        return right_align(values, answer_lengths(batch), dim)


def answer_lengths(batch: TeacherForcedBatch) -> torch.Tensor:
    """``(B,)`` answer lengths from the right-aligned slots (also right for a repeated sample)."""
    return (batch.answer_ids >= 0).sum(1)


def right_align(values: torch.Tensor, lengths: torch.Tensor, dim: int) -> torch.Tensor:
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


LAYOUTS: dict[str, AnswerLayout] = {"decoder": DecoderLayout(), "cross": CrossLayout()}


def layout_of(adapter: VLMAdapter) -> AnswerLayout:
    """The answer layout of the adapter's declared :attr:`~dexar.adapters.base.VLMAdapter.architecture`."""
    architecture = adapter.architecture
    if architecture not in LAYOUTS:
        raise ValueError(f"{type(adapter).__name__}.architecture = {architecture!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[architecture]
