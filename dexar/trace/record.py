"""The record of one traced batch: what the methods read (:class:`Trace`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dexar.adapters.base import TeacherForcedBatch, VLMAdapter


@dataclass
class Trace:
    """Everything recorded for one batch. ``T`` answer slots are right-aligned (see ``answer_mask``).

    For a cross-attention trace (paper appendix D) the columns ``N`` are the encoder positions and
    the rows the decoder's; the needs such a trace cannot serve leave their fields empty.

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
        final_grad_rollout: ``(B, T, N)`` row ``p_t`` of ``(I + Ā_t^L) ⋯ (I + Ā_t^1)``, with
            ``Ā_t^l = mean_h ReLU(∂y_t^L/∂A^{l,h} ⊙ A^{l,h})`` and ``y_t^L`` the final-layer logit
            (``final_logit_grads``; Chefer's relevance, folded inside the backward:
            :func:`dexar.trace.backward.grad_rollout`). Over every layer: :meth:`select_layers` drops it.
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
    final_grad_rollout: torch.Tensor | None = None
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
        """The same trace restricted to some decoder layers (e.g. ``slice(-1, None)``: the last).

        ``final_grad_rollout`` is a product over every layer, so the restricted trace has none.
        """
        grads = self.grads[:, layers] if self.grads is not None else None
        full = self.full_attention[:, layers] if self.full_attention is not None else None
        return dataclasses.replace(
            self,
            attentions=self.attentions[:, layers],
            grads=grads,
            logit_lens=self.logit_lens[:, layers],
            full_attention=full,
            final_grad_rollout=None,
        )

    def image_columns(self, values: torch.Tensor) -> torch.Tensor:
        """Gather the image columns of a ``(B, ..., N)`` tensor: ``(B, ..., V)`` in grid order."""
        index = self.image_index.view(self.image_index.shape[0], *([1] * (values.dim() - 2)), -1)
        return torch.gather(values, -1, index.expand(*values.shape[:-1], index.shape[-1]))
