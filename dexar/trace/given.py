"""The answer-rows re-run without its forward matmuls: each product's value is the full forward's row.

A ``RERUN_ROWS`` layer is re-run on its ``T`` answer rows only to build their gradient graph
(:func:`dexar.trace.instrument.rerun_answer_rows`). Its products are linear in what the graph
differentiates: ``x Wᵀ + b`` (every ``nn.Linear``: projections, MLP) and ``A[p_t] V`` (the attention
rows times the values). The full forward has already computed their values at the answer rows, so
the re-run takes those (:class:`RowCapture` records them) and keeps only the products' backward,
``∂/∂x = δ W`` and ``∂/∂A = δ Vᵀ``, which is exact whatever the forward value. What the re-run still
computes are the element-wise parts (norms, activations, residuals): their gradient depends on the
point, which is then the full forward's own.

When the full forward shows that the attention module returns ``o_proj(A V)`` and nothing else (the
output projection reads the attention output itself, by address and value, and the module returns
the projection's output), the re-run skips the whole module: one function gives its output rows
and the backward ``δ ↦ (δ W_o) Vᵀ`` per head. These checks run the first time a module is traced
(the value comparison reads a device value); later traces check that one linear reads the attention
output's address.

On this CPU the ``T``-row matmuls run at a third of the full forward's FLOP rate: they were a third of
DEX-AR's cost over a plain forward (``benchmarks/one_pass.py``). Used only where the re-run computes
in the model's own precision (float32, float64): a bf16/fp16 model's re-run computes in float32
(:mod:`dexar.trace.precision`), whose values the bf16 forward does not have.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv

from dexar.trace.precision import computes_in_own_precision

_AMBIGUOUS = object()
"""Marks a linear called more than once in one layer forward: its rows are not one product's."""
_BYPASS: weakref.WeakKeyDictionary[nn.Module, int | None] = weakref.WeakKeyDictionary()
"""Attention module → the length of its output tuple (0: a tensor) if it was seen to return ``o_proj(A V)``
and nothing else, ``None`` if not (its re-run then runs the module)."""


class _GivenLinear(torch.autograd.Function):
    """``x Wᵀ + b`` whose value is given; the backward (w.r.t. ``x``: parameters are frozen) is ``δ W``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return value.clone()  # returned as-is, it would be a view that forbids in-place ops downstream

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return grad @ weight, None, None


class _GivenProduct(torch.autograd.Function):
    """``A V`` whose value is given; the backward (w.r.t. ``A``: ``V`` is detached) is ``δ Vᵀ``."""

    @staticmethod
    def forward(ctx: Any, probs: torch.Tensor, value: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(value)
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (value,) = ctx.saved_tensors
        return grad @ value.transpose(-1, -2), None, None


class _GivenAttention(torch.autograd.Function):
    """``o_proj(A V)`` whose value is given; the backward (w.r.t. ``A``) is ``(δ W_o)`` per head times ``Vᵀ``."""

    @staticmethod
    def forward(
        ctx: Any, probs: torch.Tensor, value: torch.Tensor, weight: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(value, weight)
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        value, weight = ctx.saved_tensors
        return attention_backward(grad, weight, value), None, None, None


def attention_backward(grad: torch.Tensor, weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``∂/∂A`` ``(B, H, T, N)`` of ``o_proj(A V)`` given its output gradient: ``(δ W_o)`` per head times ``Vᵀ``.

    Args:
        grad: The gradient at the output projection's output rows.
        weight: The output projection's weight.
        values: ``(B, H, N, d)`` the values, repeated to the query heads.

    """
    b, t, _ = grad.shape
    per_head = (grad @ weight).view(b, t, values.shape[1], -1).transpose(1, 2)  # (B, H, T, d)
    return per_head @ values.transpose(-1, -2)


def repeat_values(module: nn.Module, value: torch.Tensor) -> torch.Tensor:
    """The values repeated to the query heads (grouped-query attention)."""
    groups = getattr(module, "num_key_value_groups", 1)
    return repeat_kv(value, groups) if groups > 1 else value


def given_attend(module: nn.Module, probs: torch.Tensor, value: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """:func:`dexar.trace.attention.attend` (``probs @ V`` as ``(B, T, H, D)``) whose value is ``output``.

    Args:
        module: The attention module (its key/value groups).
        probs: ``(B, H, T, N)`` the answer rows' probabilities (the leaf).
        value: ``(B, H_kv, N, D)`` the values.
        output: ``(B, T, H, D)`` the full forward's attention output at the answer rows.

    """
    value = repeat_values(module, value)
    return _GivenProduct.apply(probs, value, output.transpose(1, 2)).transpose(1, 2).contiguous()


def exact_rerun(layer: nn.Module) -> bool:
    """Whether ``layer``'s re-run computes in its parameters' own precision (no parameter narrower than float32)."""
    return computes_in_own_precision(layer)


@dataclass
class AttentionRows:
    """What a ``RERUN_ROWS`` layer's capture attention hands its re-run.

    Attributes:
        module: The attention module.
        values: ``(B, H_kv, N, D)`` its detached values.
        output: ``(B, T, H, D)`` its attention output (before the output projection) at the answer rows.
        address: ``data_ptr`` of the full ``(B, N, H, D)`` attention output (which linear reads it).

    """

    module: nn.Module
    values: torch.Tensor
    output: torch.Tensor
    address: int


@dataclass
class _Linear:
    """One linear's call in the full forward: its output rows, its input's and output's addresses, and order."""

    rows: Any
    input_address: int
    output_address: int
    after_attention: bool  # the layer's attention had run before it


class RowCapture:
    """The answer rows of every linear's output in one decoder layer's full forward, for its re-run.

    :meth:`arm` before the layer's full forward, :meth:`disarm` after it; :meth:`given` around the re-run.

    Args:
        layer: The decoder layer.
        rows: Sequence rows ``p_t`` (dim 1 of a ``(B, N, ·)`` linear output).
        attention_modules: The layer's traced attention module(s).
        attention_done: Whether the layer's capture attention has run (its :class:`AttentionRows` exist).

    """

    def __init__(
        self,
        layer: nn.Module,
        rows: slice,
        attention_modules: list[nn.Module],
        attention_done: Callable[[], bool] = lambda: False,
    ) -> None:
        self.rows = rows
        self.attention_done = attention_done
        self.linears = [m for m in layer.modules() if type(m) is nn.Linear and m.weight.device.type != "meta"]
        self.attention_modules = attention_modules
        self.sequence = -1
        self.keep_inputs = False
        self.calls: dict[nn.Module, Any] = {}
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.module_outputs: dict[nn.Module, tuple[int, int, bool]] = {}
        self._handles: list = []

    def arm(self, sequence: int, keep_inputs: bool = False) -> None:
        """Hook the linears (and an attention module not yet checked) for a full forward over ``sequence`` rows.

        With ``keep_inputs`` (or an attention module not yet checked) the linears' input rows are kept too.
        """
        self.disarm()
        self.sequence = sequence
        self.keep_inputs = keep_inputs or any(m not in _BYPASS for m in self.attention_modules)
        self.calls.clear()
        self.inputs.clear()
        self.module_outputs.clear()
        self._handles = [m.register_forward_hook(self._keep) for m in self.linears]
        self._handles += [
            m.register_forward_hook(self._keep_module) for m in self.attention_modules if m not in _BYPASS
        ]

    def disarm(self) -> None:
        """Remove the hooks (the re-run calls the linears again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def remove(self) -> None:
        """Remove the hooks (a hook handle's interface)."""
        self.disarm()

    def _keep(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if module in self.calls:
            self.calls[module] = _AMBIGUOUS
            return
        if output.dim() != 3 or output.shape[1] != self.sequence:
            return
        x = args[0]
        rows = output[:, self.rows].clone()
        self.calls[module] = _Linear(rows, x.data_ptr(), output.data_ptr(), self.attention_done())
        if self.keep_inputs:  # a structure is being checked
            self.inputs[module] = x[:, self.rows].clone()

    def _keep_module(self, module: nn.Module, args: tuple, output: Any) -> None:
        first, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, ())
        size = len(output) if isinstance(output, tuple) else 0
        self.module_outputs[module] = (first.data_ptr(), size, all(r is None for r in rest))

    def output_rows(self) -> dict[nn.Module, torch.Tensor]:
        """Linear → its output rows in the full forward (linears called once)."""
        return {m: c.rows for m, c in self.calls.items() if c is not _AMBIGUOUS}

    def projection(self, attention: AttentionRows) -> nn.Linear | None:
        """The attention module's output projection if the module returns ``o_proj(A V)`` unchanged (checked)."""
        found = self._projection(attention)
        return None if found is None else found[0]

    def clear(self) -> None:
        """Drop the rows (the layer is done)."""
        self.disarm()
        self.calls.clear()
        self.inputs.clear()

    def _projection(self, attention: AttentionRows) -> tuple[nn.Linear, int] | None:
        """The output projection the attention module returns unchanged, and its output tuple's length.

        The projection is the first linear after the attention that reads the attention output's address (a
        later one may read a new tensor that reuses the address once the output is freed). The first time a
        module is seen, the projection's input must also equal the attention output (value) and the module
        must return the projection's output (address) with nothing else.
        """
        readers = (
            m
            for m, c in self.calls.items()
            if c is not _AMBIGUOUS and c.after_attention and c.input_address == attention.address
        )
        projection = next(readers, None)
        if projection is None:
            return None
        module = attention.module
        if module not in _BYPASS:
            seen = self.module_outputs.get(module)
            x = self.inputs.get(projection)
            same = (
                seen is not None
                and x is not None
                and seen[0] == self.calls[projection].output_address
                and seen[2]
                and torch.equal(x, attention.output.flatten(-2))
            )
            _BYPASS[module] = seen[1] if same and seen is not None else None
        size = _BYPASS[module]
        return None if size is None else (projection, size)

    @contextlib.contextmanager
    def given(self, leaf: torch.Tensor, attention: AttentionRows) -> Iterator[Callable[..., torch.Tensor]]:
        """The captured linears (and, if checked, the attention module) return their rows instead of computing them.

        Yields the function for the re-run's attention interface (used if the attention module still runs).
        """
        self.disarm()
        patched: list[tuple[nn.Module, Any]] = []
        try:
            for module, call in self.calls.items():
                if call is not _AMBIGUOUS:
                    patched.append((module, module.__dict__.get("forward")))
                    module.forward = _given_linear(module, call.rows)
            found = self._projection(attention)
            if found is not None:
                projection, size = found
                module = attention.module
                patched.append((module, module.__dict__.get("forward")))
                values = repeat_values(module, attention.values)
                module.forward = _given_module(leaf, values, projection.weight, self.calls[projection].rows, size)
            yield lambda call: given_attend(call.module, leaf, attention.values, attention.output)
        finally:
            for module, previous in reversed(patched):
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
            self.calls.clear()
            self.inputs.clear()


def _given_linear(module: nn.Linear, value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s forward returning ``value`` for an input of its rows' shape (else computing it)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1] != value.shape[:-1] or x.dtype != value.dtype:
            return F.linear(x, module.weight, module.bias)
        return _GivenLinear.apply(x, module.weight, value)

    return forward


def _given_module(
    leaf: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, size: int
) -> Callable[..., Any]:
    """An attention module's forward returning its output rows (``size``: the length of its output tuple)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = _GivenAttention.apply(leaf, values, weight, rows)
        return (out, *([None] * (size - 1))) if size else out

    return forward
