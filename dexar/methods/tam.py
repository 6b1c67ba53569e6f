"""TAM baseline (Li et al., ICCV 2025, "Token Activation Map to Visually Explain Multimodal LLMs")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from dexar.methods.base import MethodOutput, finish, to_cells
from dexar.trace import Trace


def rank_gaussian_filter(maps: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """TAM's rank Gaussian filter on ``(..., h, w)`` maps.

    Each pixel becomes a Gaussian-weighted mean of its ``k×k`` window sorted by value, the weights
    centred on the median rank with ``σ`` the window's coefficient of variation (std / mean,
    population std): ``exp(−r²/2σ²)`` over ranks ``r = −⌊k²/2⌋..⌊k²/2⌋``, normalised. Reflect padding
    (edge not repeated); a window with mean ≤ 0 gives 0, a constant one its median (the ``σ → 0``
    limit, where the authors' code divides by zero).
    """
    h, w = maps.shape[-2:]
    pad = kernel // 2
    flat = maps.reshape(-1, 1, h, w)
    mode = "reflect" if h > pad and w > pad else "replicate"
    windows = F.unfold(F.pad(flat, (pad, pad, pad, pad), mode=mode), kernel)  # (M, k², h·w)
    ordered = windows.transpose(1, 2).sort(-1).values  # (M, h·w, k²)
    mean = ordered.mean(-1, keepdim=True)
    sigma = ordered.std(-1, correction=0, keepdim=True) / mean.clamp(min=torch.finfo(maps.dtype).tiny)
    ranks = torch.arange(kernel * kernel, dtype=maps.dtype, device=maps.device) - kernel * kernel // 2
    # σ below 1e-6 already makes every off-median weight underflow to 0; the clamp only avoids 0/0.
    weights = torch.exp(-(ranks**2) / (2 * sigma.clamp(min=1e-6) ** 2))
    weights = weights / weights.sum(-1, keepdim=True)
    value = torch.where(mean[..., 0] > 0, (ordered * weights).sum(-1), torch.zeros_like(mean[..., 0]))
    return value.reshape(maps.shape)


CONTEXT_WEIGHTS = ("own", "predicting")


@dataclass
class TAM:
    """Token activation maps: the final hidden states of the image tokens read through the LM head.

    For answer token ``w_t``, the class activation of position ``j`` is
    ``a_t(j) = ReLU(U[w_t] · norm(h^L_j) + b[w_t])`` (the logit the LM head would give ``w_t`` there).

    * Raw map: ``a_t`` over the image tokens.
    * Estimated causal inference (ECI): the context tokens ``c`` (text after the image block up to
      ``p_t``: the prompt and the earlier answer tokens, minus those equal to ``w_t``) each have their
      own image map ``a_c``; the interference is ``I_t = Σ_c π_c a_c`` with ``π_c ∝ a_t(q_c)``
      (normalised, +1e-8), the map ``ReLU(a_t − κ I_t)`` with ``κ = ⟨a_t, I_t⟩/⟨I_t, I_t⟩`` (the
      least-squares scale). ``q_c`` is ``pos_c`` (``context_weight="own"``, default) or, with
      ``context_weight="predicting"`` (the authors' code), ``pos_c − 1`` for an earlier *answer*
      token (the position that predicted it) and ``pos_c`` for a prompt token.
    * The image map is min-max normalised jointly with the text activations ``a_t(j)`` over the same
      text window (excluding ``p_t`` itself), then smoothed by :func:`rank_gaussian_filter`.

    Open choices (the authors' code differs in details that do not transfer): a context token's map
    uses its own id (their first prompt token uses the greedy prediction); the text window is
    everything after the image block (their template-specific prompt markers); the uint8
    quantisation of their visualisation is skipped. The position whose activation weighs an earlier
    answer token in the ECI: the paper's text pairs a token with its own activation (our default);
    the authors' code (``tam.py``, ``TAM()``) concatenates the prompt tokens' scores, the last input
    position's score and the generated positions' scores, so the answer token ``k`` of its text list
    gets the score of position ``pos_k − 1``, the position that predicted it
    (``context_weight="predicting"``). The set of positions in the joint text min-max is the same
    either way (the predicting positions of the earlier answer tokens are the earlier answer tokens'
    own positions shifted by one, plus the last input position).

    Args:
        eci: Apply the estimated causal inference.
        smooth: Apply the rank Gaussian filter.
        kernel: Filter size.
        context_weight: ``own`` (default) or ``predicting`` (the authors' indexing): the position whose
            activation weighs an earlier answer token in the ECI.

    """

    eci: bool = True
    smooth: bool = True
    kernel: int = 3
    context_weight: str = "own"

    def __post_init__(self) -> None:
        if self.context_weight not in CONTEXT_WEIGHTS:
            raise ValueError(f"context_weight must be one of {CONTEXT_WEIGHTS}, got {self.context_weight!r}")

    name: ClassVar[str] = "tam"
    needs: ClassVar[frozenset[str]] = frozenset({"hidden_states"})

    def __call__(self, trace: Trace) -> MethodOutput:
        if trace.final_hidden is None or trace.adapter is None:
            raise ValueError("tam needs a trace with hidden_states")
        raw = self.activation_maps(trace)
        return finish(trace, raw, torch.ones_like(raw[..., 0]), on_cells=True)

    def activation_maps(self, trace: Trace) -> torch.Tensor:
        """``(B, T, h·w)`` TAM maps on the full-image cells before the final min-max (0 on padding slots)."""
        hidden = trace.final_hidden  # (B, N, D)
        head = trace.adapter.unembedding
        bias = getattr(head, "bias", None)
        ids = trace.batch.input_ids  # (B, N)
        answer = trace.batch.answer_ids.to(ids.device).clamp(min=0)  # (B, T)

        def activation(classes: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            """``ReLU(U[c] · s + b[c])``: ``(B, K)`` classes × ``(B, M, D)`` states → ``(B, K, M)``."""
            logits = head.weight.detach()[classes].to(states.dtype) @ states.transpose(1, 2)
            if bias is not None:
                logits = logits + bias.detach()[classes][..., None].to(states.dtype)
            return logits.clamp(min=0)

        image_states = torch.gather(hidden, 1, trace.image_index[..., None].expand(-1, -1, hidden.shape[-1]))
        own = activation(answer, image_states)  # (B, T, V)
        at_tokens = activation(answer, hidden)  # (B, T, N): class w_t at every position
        n = ids.shape[1]
        positions = torch.arange(n, device=ids.device)
        rows = torch.arange(trace.rows.start, trace.rows.stop, device=ids.device)  # p_t
        after_image = positions[None, None, :] > trace.image_index.amax(1)[:, None, None]
        real = trace.batch.inputs["attention_mask"].bool()[:, None, :]
        window = after_image & real & (positions[None, None, :] <= rows[None, :, None])  # (B, T, N)
        if self.eci:
            context = window & (ids[:, None, :] != answer[:, :, None])
            context_maps = activation(ids, image_states)  # (B, N, V): each position's own token
            weights = at_tokens
            if self.context_weight == "predicting":  # an answer token at j is weighed by a_t(j − 1)
                lengths = trace.batch.answer_lengths.to(ids.device)
                is_answer = positions[None, :] >= n - lengths[:, None]  # (B, N)
                earlier = torch.cat([torch.zeros_like(at_tokens[..., :1]), at_tokens[..., :-1]], -1)
                weights = torch.where(is_answer[:, None, :], earlier, at_tokens)
            weights = weights * context
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-8)
            interference = weights @ context_maps  # (B, T, V)
            energy = (interference * interference).sum(-1, keepdim=True)
            scale = (own * interference).sum(-1, keepdim=True) / energy.clamp(min=torch.finfo(energy.dtype).tiny)
            own = (own - torch.where(energy > 0, scale, torch.zeros_like(scale)) * interference).clamp(min=0)
        text = window & (positions[None, None, :] < rows[None, :, None])  # the text scores, self excluded
        inf = torch.tensor(float("inf"), dtype=own.dtype, device=own.device)
        lo = torch.minimum(own.amin(-1), torch.where(text, at_tokens, inf).amin(-1))[..., None]
        hi = torch.maximum(own.amax(-1), torch.where(text, at_tokens, -inf).amax(-1))[..., None]
        span = hi - lo
        maps = torch.where(span > 0, (own - lo) / span.clamp(min=torch.finfo(own.dtype).tiny), torch.zeros_like(own))
        maps = to_cells(trace, maps)  # tiled images: smooth the merged full-image map
        if self.smooth:
            h, w = trace.grid
            maps = rank_gaussian_filter(maps.view(*maps.shape[:-1], h, w), self.kernel).flatten(-2)
        return maps * trace.answer_mask[..., None]
