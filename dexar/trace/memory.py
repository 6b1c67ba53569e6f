"""A memory model of one decoder trace: its peak bytes above the weights, from the code's own tensor shapes.

Each term below names the tensor it counts (shape × element size) in :mod:`dexar.trace.decoder`,
:mod:`~dexar.trace.attention`, :mod:`~dexar.trace.instrument` and :mod:`~dexar.trace.backward`. ``w``
is the working precision of the attention probabilities and read-outs (float32, or the model's dtype if
wider: :func:`dexar.trace.precision.working_dtype`), ``s`` the model's element size. Two plans are modelled:

* ``default`` (the default needs, DEX-AR's: ``attention_rows``, ``layer_grads``, row-local layers): the forward runs
  without autograd, each layer keeps its answer rows ``(B, H, T, N)·w`` (a leaf) and the graph of its
  ``T``-row float32 re-run; one backward gives ``(B, H, T, N)`` gradients per layer, stacked.
* ``shared`` (every method's needs at once: ``final_logit_grads``, ``full_attention``, ``hidden_states``,
  ``hidden_grads:-1``, ``layer_grads``): every layer's every row is in the graph, the final-logit
  gradients of all layers come back together per chunk of answer tokens, and CheferCAM's
  ``(B, T, L, N, N)`` products accumulate.

The peak is the largest of a few phases (forward, backward, stacking); :func:`trace_peak_bytes`
returns it. ``tests/trace/test_memory.py`` compares it with the peak measured on the CPU allocator
(:func:`measured_peak_bytes`) for tiny models in float32 and bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PLANS = ("default", "shared")


@dataclass(frozen=True)
class ModelDims:
    """The decoder dimensions the trace's memory depends on.

    Attributes:
        layers: Decoder layers ``L``.
        hidden: Hidden size ``D``.
        heads: Attention heads ``H``.
        kv_heads: Key/value heads.
        head_dim: Per-head size ``d``.
        intermediate: MLP width ``I``.
        vocab: Vocabulary size.

    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, text_config) -> ModelDims:
        """The dims of a transformers text config (Llama, Mistral, Qwen2, Gemma families)."""
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(
            layers=text_config.num_hidden_layers,
            hidden=text_config.hidden_size,
            heads=heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=text_config.intermediate_size,
            vocab=text_config.vocab_size,
        )


KNOWN_MODELS: dict[str, ModelDims] = {
    "llava-1.5-7b": ModelDims(32, 4096, 32, 32, 128, 11008, 32064),
    "llava-next-mistral-7b": ModelDims(32, 4096, 32, 8, 128, 14336, 32064),
    "qwen2-vl-7b": ModelDims(28, 3584, 28, 4, 128, 18944, 152064),
    "paligemma-3b": ModelDims(18, 2048, 8, 1, 256, 16384, 257216),
    "smolvlm-2.2b": ModelDims(24, 2048, 32, 32, 64, 8192, 49280),
    "florence-2-large": ModelDims(12, 1024, 16, 16, 64, 4096, 51289),
}
"""Text-decoder dims of known checkpoints (their ``config.json``)."""


def _layer_rows_bytes(dims: ModelDims, rows: int, size: int) -> int:
    """Saved activations of one Llama-style decoder layer's graph over ``rows`` rows (per sample).

    Parameters are frozen, so a linear layer saves nothing (its input only serves the weight's
    gradient); rotary saves its constant cos/sin. What remains: the two RMS norms (their float32 input
    and normalised output, ``2·D`` each) and the MLP (the gate's input to SiLU, its output and the up
    projection: ``3·I``).
    """
    return rows * (4 * dims.hidden + 3 * dims.intermediate) * size


def _layer_forward_bytes(dims: ModelDims, tokens: int, size: int) -> int:
    """Transient of one layer's forward without a graph over ``N`` rows (per sample).

    In the MLP: the residual, its normalised input, SiLU(gate), up and their product (``2·D + 3·I``).
    """
    return tokens * (2 * dims.hidden + 3 * dims.intermediate) * size


def _attention_forward_bytes(dims: ModelDims, tokens: int, size: int) -> int:
    """Transient of one layer's attention without a graph over ``N`` rows (per sample).

    The residual, q, k, v, rotated q and k, and SDPA's output (``7·D``; the normalised input is freed after
    the projections).
    """
    return tokens * 7 * dims.hidden * size


def trace_peak_bytes(
    dims: ModelDims,
    tokens: int,
    answer: int,
    batch: int = 1,
    plan: str = "default",
    dtype: torch.dtype = torch.bfloat16,
    grad_chunk: int = 1,
) -> int:
    """Predicted peak bytes of one decoder trace above the model's weights.

    Args:
        dims: The decoder's dimensions.
        tokens: Sequence length ``N`` (image + text tokens, answer included).
        answer: Answer tokens ``T``.
        batch: Samples per trace ``B``.
        plan: ``"default"`` (DEX-AR's needs) or ``"shared"`` (every method's needs; see the module docstring).
        dtype: The model's parameter dtype.
        grad_chunk: Answer tokens per batched final-logit backward (``shared``).

    Raises:
        ValueError: An unknown plan.

    """
    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r}; known: {PLANS}")
    s = torch.empty((), dtype=dtype).element_size()
    w = max(s, 4)
    n, t, b, big_l = tokens, answer, batch, dims.layers
    h, d = dims.heads, dims.head_dim
    rows = h * t * n * w  # one layer's answer rows (B, H, T, N), per sample
    value_copy = h * n * d * w  # V in w (after repeat_kv) saved by probs @ V
    key_copy = h * n * d * w  # K in w, a transient of attention_probs
    if plan == "default":
        rerun = _layer_rows_bytes(dims, t, w) + value_copy  # T-row float32 re-run, graph kept
        kept = big_l * (rows + rerun)
        # + the capture's K in w, its scores and softmax (and the masked copy when the batch is padded)
        attention = _attention_forward_bytes(dims, n, s) + key_copy + (3 if b > 1 else 2) * rows
        forward = kept + max(_layer_forward_bytes(dims, n, s), attention)
        # backward: every leaf's gradient (a list), then torch.stack copies it; then the leaves are stacked too
        stacking = big_l * rows * 3
        return b * max(forward, stacking + big_l * rerun)
    probs = h * n * n * w  # (B, H, N, N) one layer's probabilities
    masked = probs if b > 1 else 0  # `softmax * mask.any(...)`: a second copy when the batch is padded
    mean = n * n * w  # mean_h A^l, kept
    # softmax's output (saved by softmax and by probs @ V; the masked product when padded), V and the
    # scaled q and K in w (saved by the matmuls), mean_h A^l, the rest of the layer
    graph_layer = probs + masked + value_copy + 2 * h * n * d * w + mean + _layer_rows_bytes(dims, n, s)
    graph = big_l * graph_layer
    chefer = big_l * n * n * w  # one token's mean_h ReLU(g ⊙ A) of every layer
    # one chunk's backward: every layer's (c, H, N, N) gradient returned together, and a product in flight;
    # CheferCAM's (B, T, L, N, N) products are written in place into one preallocated tensor
    backward = graph + grad_chunk * big_l * probs + grad_chunk * probs + t * chefer
    # DEX-AR's layer-local gradients of graph layers: one full (H, N, N) gradient at a time, its answer rows
    # cloned (a list), then stacked
    local = graph + t * chefer + probs + 2 * big_l * rows
    return b * max(backward, local)


def measured_peak_bytes(function: Callable[[], object]) -> int:
    """Peak bytes allocated by ``function`` above what was live when it started, measured on the CPU allocator.

    Uses the PyTorch profiler's memory events (``profile_memory=True``: every allocation and free of
    torch's CPU allocator, with its size and time); the peak is the largest running sum of them.
    ``tracemalloc`` does not see torch's allocations.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    total = peak = 0
    for event in events:
        total += event.nbytes()
        peak = max(peak, total)
    return peak
