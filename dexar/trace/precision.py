"""Read-outs in float32 on a bf16/fp16 model: the few rows whose small differences the methods compare.

A bf16 logit has about three significant digits: DEX-AR's ``λ_t = ReLU(max m_V − max m_T)`` and the
log-likelihood differences of RISE, IG and IIA are differences of nearly equal numbers, and bf16 maps
min-max normalised in bf16 take only 256 distinct values per octave (their ties bias the pixel order
of the perturbation metrics). The cheap fix is to run the *read-outs* in float32: the logit lens and
the log-likelihood (``T`` rows through the final norm and the unembedding) and the answer-rows re-run
(``T`` rows through one layer), while the full ``N``-row forward stays in the model's dtype.

:func:`working_dtype` is the precision of a read-out (float32, or the model's own if wider: float64
references stay float64). Inside :func:`upcast`, a linear, layer norm or embedding whose input is wider
than its parameters runs in the input's precision; the parameters are cast on the fly (a linear saves
its low-precision weight for the backward, not a float32 copy, so the graph costs no extra weight memory).

Where the device has a bf16 GEMM with float32 output (CUDA, PyTorch ≥ 2.9), a bf16 linear's float32 rows
go through one such GEMM of their three exact bf16 parts instead (:func:`wide_matmul`), which reads the
weight once in bf16. Modelled for LLaVA-1.5-7B (6.5 B parameters in the re-run's linears, 4.9 B of them
on the gradient's path): the casts move about 113 GB per trace (2 bytes read, 4 written, 4 read again per
parameter, forward and backward), the split GEMM about 23 GB, against a bf16 forward of a few hundred
milliseconds at batch 8. Not measured: this machine has no GPU; the CPU takes the casts, and the tests
check the split path's arithmetic with the GEMM emulated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or ``dtype`` if it is wider (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _narrowest_dtype(modules: tuple[Any, ...]) -> torch.dtype | None:
    """The narrowest floating parameter dtype of ``modules`` (objects without parameters are skipped)."""
    dtypes = [
        p.dtype for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters() if p.is_floating_point()
    ]
    return min(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else None


def computes_in_own_precision(*modules: Any) -> bool:
    """Whether ``modules`` have floating parameters and none is narrower than its working dtype (float32, float64)."""
    narrowest = _narrowest_dtype(modules)
    return narrowest is not None and working_dtype(narrowest) == narrowest


_FP32_OUT_GEMM: dict[torch.device, bool] = {}
"""Device → whether ``torch.mm(bf16, bf16, out_dtype=torch.float32)`` runs there (CUDA, PyTorch ≥ 2.9)."""


def fp32_out_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of two bf16 matrices, accumulated and returned in float32 (one GEMM reading ``b`` in bf16)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _has_fp32_out_gemm(device: torch.device) -> bool:
    """Whether :func:`fp32_out_gemm` runs on ``device`` and returns the float32 product (tried once per device)."""
    if device not in _FP32_OUT_GEMM:
        a = torch.tensor([[1.0, 2.0**-8]], dtype=torch.bfloat16, device=device)
        b = torch.tensor([[1.0], [1.0]], dtype=torch.bfloat16, device=device)
        try:  # 1 + 2⁻⁸ is float32, not bf16: a bf16 output would round it to 1
            _FP32_OUT_GEMM[device] = fp32_out_gemm(a, b).item() == 1.0 + 2.0**-8
        except (RuntimeError, NotImplementedError, TypeError):
            _FP32_OUT_GEMM[device] = False
    return _FP32_OUT_GEMM[device]


def split_bf16(x: torch.Tensor) -> torch.Tensor:
    """``(3, *x.shape)`` bf16 parts of a float32 ``x`` whose sum is ``x`` exactly.

    A float32 significand has 24 bits, a bf16 one 8, and both have the same exponent range: ``hi`` is
    ``x`` rounded to bf16, and each remainder (exact in float32) holds at most the 16, then 8, bits left.
    """
    hi = x.to(torch.bfloat16)
    rest = x - hi.float()
    mid = rest.to(torch.bfloat16)
    return torch.stack((hi, mid, (rest - mid.float()).to(torch.bfloat16)))


def _splits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`wide_matmul` takes the split GEMM for these operands."""
    return weight.dtype == torch.bfloat16 and x.dtype == torch.float32 and _has_fp32_out_gemm(x.device)


def wide_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight`` for float32 rows ``x (..., K)`` and a bf16 ``weight (K, N)``, in float32.

    Where the device has a bf16 GEMM with float32 output (:func:`fp32_out_gemm`), ``x`` is split into three
    bf16 parts (:func:`split_bf16`) stacked as ``3·M`` rows of one GEMM: each product of two bf16 numbers is
    exact in float32 and the sums accumulate in float32, so the result is a float32 product, and the weight
    is read once in bf16 (2 bytes per parameter) instead of cast to a float32 copy and read again (10).
    Elsewhere (the CPU), the weight is cast.
    """
    return _split_matmul(x, weight) if _splits(x, weight) else x @ weight.to(x.dtype)


def _split_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`wide_matmul`'s split GEMM (the caller checked :func:`_splits`)."""
    parts = split_bf16(x).reshape(-1, x.shape[-1])
    out = fp32_out_gemm(parts, weight).view(3, *x.shape[:-1], weight.shape[-1])
    return (out[0] + out[1]) + out[2]


class _WideLinear(torch.autograd.Function):
    """``x Wᵀ + b`` in ``x``'s precision; the backward (w.r.t. ``x`` only: parameters are frozen) reuses ``W``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        bias = None if bias is None else bias.to(x.dtype)
        if not _splits(x, weight):
            return F.linear(x, weight.to(x.dtype), bias)
        out = _split_matmul(x, weight.t())
        return out if bias is None else out + bias

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return wide_matmul(grad, weight), None, None


def _narrower(x: Any, *params: Any) -> bool:
    """Whether ``x`` is a floating tensor wider than some floating parameter."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return False
    return any(
        isinstance(p, torch.Tensor) and p.is_floating_point() and x.element_size() > p.element_size() for p in params
    )


class _Upcast(TorchFunctionMode):
    """Linear / layer norm of a wider input run in the input's precision (see :func:`upcast`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _narrower(x, weight):
                if weight.requires_grad or (bias is not None and bias.requires_grad):
                    raise RuntimeError("dexar.trace.precision.upcast: parameters must be frozen")
                return _WideLinear.apply(x, weight, bias)
        elif func is F.layer_norm:
            x = args[0]
            names = ("input", "normalized_shape", "weight", "bias", "eps")
            call = dict(zip(names, args, strict=False)) | kwargs
            if _narrower(x, call.get("weight"), call.get("bias")):
                for name in ("weight", "bias"):
                    if call.get(name) is not None:
                        call[name] = call[name].to(x.dtype)
                return func(**call)
        return func(*args, **kwargs)


@contextlib.contextmanager
def upcast(*modules: Any) -> Iterator[None]:
    """Linear layers and layer norms fed a wider input compute in its precision (parameters cast on the fly).

    RMS norms need nothing: they compute in float32 and multiply by their weight, which promotes.

    Args:
        *modules: The block's modules, if known: when their narrowest floating parameter is its own
            working dtype (a float32 or float64 model) nothing is narrower and the mode is not entered,
            which saves its Python dispatch on every op of the block (about 600 per trace of an
            8-layer model). Without modules (or parameters) the mode is always entered.
    """
    if computes_in_own_precision(*modules):
        yield
        return
    with _Upcast():
        yield
