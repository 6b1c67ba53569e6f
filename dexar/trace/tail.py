"""A hand-written layer-local backward for pre-norm SwiGLU blocks: DEX-AR's gradient without a re-run.

The blocks of LLaMA, Mistral, Qwen2 and Idefics3's text model compute, at each answer row,

    h = x + o_proj(A V),   n = w ⊙ h · rsqrt(mean(h²) + ε),   out = h + down(silu(gate n) ⊙ up n),

and DEX-AR needs ``∂y/∂A[p_t]`` given ``δ = ∂y/∂out`` (the logit lens' gradient at the layer's output
rows). With the forward's rows of ``o_proj``, ``gate`` and ``up`` (:class:`~dexar.trace.given.RowCapture`),
the chain rule is a dozen ``T``-row operations:

    δ_a = δ W_down,   δ_g = δ_a ⊙ up ⊙ σ(g)(1 + g(1 − σ(g))),   δ_u = δ_a ⊙ silu(g),
    δ_n = δ_g W_gate + δ_u W_up,   δ_h = δ + r (v − ĥ mean(v ⊙ ĥ)),  v = w ⊙ δ_n, ĥ = h r, r = rsqrt(mean(h²) + ε),
    ∂y/∂A = (δ_h W_o per head) Vᵀ.

On the CPU the answer-rows re-run through the module code and autograd's nodes cost more than this
arithmetic (``benchmarks/one_pass.py``: explain 1.19× → 1.11× a forward, alternated in one process).
The block's structure is checked on the forward's own rows the first time a layer is traced (the
normalised state equals ``gate``'s input, ``silu(g) ⊙ up`` equals ``down``'s input, ``h + down``
equals the layer's output); a layer that does not match keeps the re-run
(:func:`dexar.trace.instrument.rerun_answer_rows`), as does any other family (Gemma's norm scales by
``1 + w`` and its MLP is GeGLU).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dexar.trace.given import attention_backward
from dexar.trace.rmsnorm import RMSNorm, tolerance

CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
"""Decoder layer → whether its rows matched the SwiGLU block's formula the first time it was traced."""


@dataclass(frozen=True)
class SwiGLUBlock:
    """The post-attention modules of a pre-norm SwiGLU decoder layer."""

    o_proj: nn.Linear
    norm: RMSNorm
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear

    @classmethod
    def of(cls, layer: nn.Module) -> SwiGLUBlock | None:
        """The block's modules by transformers' LLaMA-family names, or ``None`` if ``layer`` is not one."""
        attention = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        norm = RMSNorm.of(getattr(layer, "post_attention_layernorm", None))
        if attention is None or mlp is None or norm is None:
            return None
        linears = [
            getattr(attention, "o_proj", None),
            *(getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")),
        ]
        act = getattr(mlp, "act_fn", None)
        if any(type(m) is not nn.Linear for m in linears) or type(act).__name__ not in ("SiLUActivation", "SiLU"):
            return None
        return cls(*linears[:1], norm, *linears[1:])

    def matches(self, h: torch.Tensor, rows: dict, inputs: dict, out: torch.Tensor) -> bool:
        """Whether the forward's rows follow the block's formula (``rows``/``inputs``: a linear's output/input rows)."""
        if any(m not in inputs for m in (self.gate, self.down)):
            return False
        g, u, d = rows[self.gate], rows[self.up], rows[self.down]
        tol = tolerance(h.dtype)
        return (
            self.norm.matches(h, inputs[self.gate])
            and torch.allclose(torch.nn.functional.silu(g) * u, inputs[self.down], **tol)
            and torch.allclose(h + d, out, **tol)
        )

    def backward(
        self, delta: torch.Tensor, h: torch.Tensor, g: torch.Tensor, u: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """``∂y/∂A[p_t]`` ``(B, H, T, N)`` from ``δ = ∂y/∂out`` ``(B, T, D)`` (see the module docstring).

        Args:
            delta: The lens' gradient at the layer's output rows.
            h: ``x + o_proj(A V)`` at the rows.
            g: ``gate``'s output rows.
            u: ``up``'s output rows.
            values: ``(B, H, N, d)`` the values, repeated to the query heads.

        """
        sigma = torch.sigmoid(g)
        d_act = delta @ self.down.weight
        d_gate = d_act * u * (sigma * (1 + g * (1 - sigma)))
        d_up = d_act * (g * sigma)
        d_h = delta + self.norm.backward(h, d_gate @ self.gate.weight + d_up @ self.up.weight)
        return attention_backward(d_h, self.o_proj.weight, values)


def swiglu_backward(
    block: SwiGLUBlock,
    layer: nn.Module,
    rows: dict,
    inputs: dict,
    x: torch.Tensor,
    out: torch.Tensor,
    values: torch.Tensor,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``δ ↦ ∂y/∂A[p_t]`` for ``layer`` if its rows match its SwiGLU block's formula, else ``None``.

    Args:
        block: The layer's block (:meth:`SwiGLUBlock.of`).
        layer: The decoder layer.
        rows: Linear → its output rows in the layer's full forward.
        inputs: Linear → its input rows (kept the first time the layer is traced, for the check).
        x: ``(B, T, D)`` the layer's input rows.
        out: ``(B, T, D)`` the layer's output rows.
        values: ``(B, H, N, d)`` the values, repeated to the query heads.

    """
    if any(m not in rows for m in (block.o_proj, block.gate, block.up, block.down)):
        return None
    h = x + rows[block.o_proj]
    if layer not in CHECKED:
        CHECKED[layer] = block.matches(h, rows, inputs, out)
    if not CHECKED[layer]:
        return None
    g, u = rows[block.gate], rows[block.up]
    return lambda delta: block.backward(delta, h, g, u, values)
