"""A memory model of one decoder trace: its peak bytes above the weights, from the code's own tensor shapes.

Each term below names the tensor it counts (shape × element size) in :mod:`dexar.trace.decoder`,
:mod:`~dexar.trace.attention`, :mod:`~dexar.trace.instrument` and :mod:`~dexar.trace.backward`. ``w``
is the working precision of the attention probabilities and read-outs (float32, or the model's dtype if
wider: :func:`dexar.trace.precision.working_dtype`), ``s`` the model's element size. Three plans are modelled:

* ``default`` (the default needs, DEX-AR's: ``attention_rows``, ``layer_grads``, row-local layers): the forward
  runs without autograd; each layer's ``T``-row re-run and its backward run in its forward hook, so a
  finished layer keeps only its answer rows ``(B, H, T, N)·w`` (a leaf) and their gradient, stacked at the end.
* ``shared`` (every method's needs at once: ``final_logit_grads``, ``full_attention``, ``hidden_states``,
  ``hidden_grads:-1``, ``layer_grads``): every layer's every row is in the graph; CheferCAM's backward per
  answer token folds each layer's product into a row as its gradient arrives, so one layer's
  ``(B, H, N, N)`` gradient is in flight at a time.
* ``probe``: IIA's extra forward (every row in the graph, the last layer re-run on a given attention, one
  backward of the answer's log-likelihood), which runs after the shared trace while its records are kept
  (:func:`retained_bytes`).

The peak is the largest of a few phases (forward, backwards, stacking); :func:`trace_peak_bytes`
returns it, :func:`samples_per_trace` sizes a trace batch from the free memory with it.
``tests/trace/test_memory.py`` compares it with the peak measured on the CPU allocator
(:func:`measured_peak_bytes`) for tiny models in float32 and bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


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


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint's trace memory and weights depend on.

    Attributes:
        dims: Its text decoder's dims.
        image_tokens: Image tokens per sample (LLaVA-NeXT: a typical any-resolution count).
        parameters: Parameter count (the weights' bytes are this times the element size).
        architecture: ``decoder`` or ``cross`` (an encoder-decoder: the memory model covers decoders only).

    """

    dims: ModelDims
    image_tokens: int
    parameters: int
    architecture: str = "decoder"


CHECKPOINTS: dict[str, Checkpoint] = {
    "llava-hf/llava-1.5-7b-hf": Checkpoint(KNOWN_MODELS["llava-1.5-7b"], 576, 7_063_000_000),
    "llava-hf/bakLlava-v1-hf": Checkpoint(ModelDims(32, 4096, 32, 8, 128, 14336, 32002), 576, 7_566_000_000),
    "llava-hf/llava-v1.6-mistral-7b-hf": Checkpoint(KNOWN_MODELS["llava-next-mistral-7b"], 2352, 7_566_000_000),
    "google/paligemma-3b-pt-224": Checkpoint(KNOWN_MODELS["paligemma-3b"], 256, 2_923_000_000),
    "florence-community/Florence-2-base": Checkpoint(
        ModelDims(6, 768, 12, 12, 64, 3072, 51289), 577, 232_000_000, "cross"
    ),
}
"""The hub checkpoints the shipped configs name (``config.json``; parameters from the model cards)."""


PLANS = ("default", "shared", "probe")
"""``default``: DEX-AR's needs; ``shared``: every method's needs in one trace; ``probe``: IIA's extra forward
(:func:`dexar.trace.probes.grad_weighted_attention`)."""

HEADROOM = 0.9
"""Share of the free device memory :func:`samples_per_trace` fills (the allocator's fragmentation, the
vision tower, the perturbation forwards)."""


def _norms_mlp_bytes(dims: ModelDims, rows: int, size: int) -> int:
    """What one Llama-style decoder layer's graph saves outside attention over ``rows`` rows (per sample).

    Parameters are frozen, so a linear layer saves nothing (its input only serves the weight's gradient)
    and rotary saves its constant cos/sin. What remains: the two RMS norms' float32 inputs (``2·D·4``
    bytes: a norm computes in float32 whatever the model's dtype) and the MLP (the gate's input to SiLU,
    its output and the up projection: ``3·I`` in the model's ``size``).
    """
    return rows * (2 * dims.hidden * 4 + 3 * dims.intermediate * size)


def _mlp_forward_bytes(dims: ModelDims, tokens: int, size: int) -> int:
    """Transient of one layer's MLP without a graph over ``N`` rows (per sample).

    The residual, its normalised input (and the norm's float32 copy), SiLU(gate), up and their product.
    """
    return tokens * (2 * dims.hidden * size + dims.hidden * 4 + 3 * dims.intermediate * size)


def _attention_forward_bytes(dims: ModelDims, tokens: int, size: int) -> int:
    """Transient of one layer's attention without a graph over ``N`` rows (per sample).

    The residual, the normalised input, q and rotated q, k, v and rotated k, and SDPA's output.
    """
    kv = dims.kv_heads * dims.head_dim
    return tokens * (2 * dims.hidden + 3 * dims.heads * dims.head_dim + 3 * kv) * size


@dataclass(frozen=True)
class _Sizes:
    """Per-sample bytes of the tensors the plans hold, named after them."""

    s: int  # the model's element size
    w: int  # the working precision's
    layers: int
    answer: int
    rows: int  # one layer's answer rows (B, H, T, N)
    probs: int  # one layer's probabilities (B, H, N, N)
    mean: int  # mean_h A^l, or one layer's CheferCAM product (B, N, N)
    head_copy: int  # q, K or V over every head in w (saved by a matmul)
    hidden: int  # one (B, N, D) hidden state in the model's dtype
    graph_rest: int  # one graph layer's norms and MLP over every row
    rerun: int  # one layer's T-row float32 re-run graph and its logit lens

    @classmethod
    def of(cls, dims: ModelDims, tokens: int, answer: int, dtype: torch.dtype) -> _Sizes:
        s = torch.empty((), dtype=dtype).element_size()
        w = max(s, 4)
        n, t, h, d = tokens, answer, dims.heads, dims.head_dim
        return cls(
            s=s,
            w=w,
            layers=dims.layers,
            answer=t,
            rows=h * t * n * w,
            probs=h * n * n * w,
            mean=n * n * w,
            head_copy=h * n * d * w,
            hidden=n * dims.hidden * s,
            graph_rest=_norms_mlp_bytes(dims, n, s),
            rerun=_norms_mlp_bytes(dims, t, w) + 3 * t * dims.hidden * w,
        )


def _default_peak(x: _Sizes, dims: ModelDims, n: int) -> int:
    """DEX-AR's trace, per sample: a forward without a graph, each layer's re-run and backward in its hook.

    A layer's answer-rows re-run and its layer-local backward run in its forward hook
    (:func:`dexar.trace.instrument.forward`'s ``rows_done``), so its graph is freed before the next layer
    runs: a finished layer keeps its leaf and its gradient. In the model's own precision (float32) the
    re-run takes every linear's and the attention's output rows from the forward (:mod:`dexar.trace.given`):
    they wait for it.
    """
    earlier = (x.layers - 1) * 2 * x.rows  # the layers before the last: their leaves and gradients
    # the capture: K over every head (repeated, then in w), the answer rows' scores and softmax
    capture = x.head_copy * x.s // x.w + (x.head_copy if x.s < x.w else 0) + 2 * x.rows
    attention = earlier + _attention_forward_bytes(dims, n, x.s) + capture
    kv = dims.kv_heads * dims.head_dim
    linear_rows = x.answer * (2 * dims.heads * dims.head_dim + 2 * kv + 2 * dims.hidden + 2 * dims.intermediate) * x.s
    given = linear_rows if x.s == x.w else 0
    # the last layer's MLP: its captured rows and V in w wait for its re-run (in the layer's forward hook)
    mlp = earlier + x.rows + x.head_copy + given + _mlp_forward_bytes(dims, n, x.s)
    # its re-run: the graph (rows, V in w) and the leaf's gradient, beside the layer's output
    rerun = earlier + 2 * x.rows + x.rerun + x.head_copy + given + x.hidden
    # + the layer's input (held by the decoder's loop) and the input embeddings (held by the model's forward)
    forward = 2 * x.hidden + max(attention, mlp, rerun)
    stacking = 3 * x.layers * x.rows  # the leaves, the gradients (a list, then stacked), the stacked leaves
    return max(forward, stacking)


def _graph_bytes(x: _Sizes, mean: bool) -> int:
    """Every layer's every row in the graph, per sample.

    The probabilities (softmax's output, saved by ``probs @ V``), the scaled q, K and V in w (saved by
    the two matmuls), ``mean_h A^l`` if kept, the norms and the MLP.
    """
    return x.layers * (x.probs + 3 * x.head_copy + x.graph_rest + (x.mean if mean else 0))


def _shared_peak(x: _Sizes) -> int:
    """Every method's needs in one trace, per sample."""
    graph = _graph_bytes(x, mean=True) + 2 * x.hidden  # + the last layer's input and output (GradCAM, TAM)
    # CheferCAM: one backward per token; each layer's (B, H, N, N) gradient and its product with A^l (or
    # the softmax's input gradient) in flight, folded into a (B, N) row as it arrives
    chefer = 2 * x.probs
    # GradCAM at the last layer: a batched backward through its attention (gradients of A^L, of its
    # scores and their product)
    gradcam = 3 * x.probs
    # the end: DEX-AR's layer-local gradients (a list, then stacked), the stacked rows, the stacked means
    end = 3 * x.layers * x.rows + x.layers * x.mean
    return graph + max(chefer, gradcam, end)


def _probe_peak(x: _Sizes) -> int:
    """IIA's extra forward, per sample: the graph, the last layer re-run on a given ``β·A^L``, one backward."""
    rerun = x.probs + x.head_copy + x.graph_rest  # the given leaf, V in w, the norms and the MLP
    sums = 3 * x.layers * x.mean  # the (B, 1, L, N, N) products and their running sums over β and α
    return _graph_bytes(x, mean=False) + rerun + sums + 2 * x.probs


def trace_peak_bytes(
    dims: ModelDims,
    tokens: int,
    answer: int,
    batch: int = 1,
    plan: str = "default",
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Predicted peak bytes of one decoder trace above the model's weights.

    Args:
        dims: The decoder's dimensions.
        tokens: Sequence length ``N`` (image + text tokens, answer included).
        answer: Answer tokens ``T``.
        batch: Samples per trace ``B`` (the samples' tensors are independent: the peak is ``B`` times one's).
        plan: One of :data:`PLANS` (see the module docstring).
        dtype: The model's parameter dtype.

    Raises:
        ValueError: An unknown plan.

    """
    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r}; known: {PLANS}")
    x = _Sizes.of(dims, tokens, answer, dtype)
    if plan == "default":
        return batch * _default_peak(x, dims, tokens)
    return batch * (_shared_peak(x) if plan == "shared" else _probe_peak(x))


def retained_bytes(dims: ModelDims, tokens: int, answer: int, plan: str, dtype: torch.dtype) -> int:
    """Per-sample bytes a finished trace keeps for the methods (alive while IIA's probes run after it)."""
    x = _Sizes.of(dims, tokens, answer, dtype)
    kept = 2 * x.layers * x.rows  # the answer rows and their layer-local gradients
    if plan == "shared":
        kept += x.layers * x.mean + x.hidden * x.w // x.s  # full attention, the final hidden states in w
    return kept


def memory_plan(needs: frozenset[str] | set[str]) -> str:
    """The modelled plan covering ``needs``: ``shared`` when they keep a graph across layers, else ``default``."""
    graph = any(need == "final_logit_grads" or need.startswith("hidden_grads") for need in needs)
    return "shared" if graph or "full_attention" in needs else "default"


def samples_per_trace(
    dims: ModelDims, tokens: int, answer: int, plan: str, dtype: torch.dtype, free_bytes: int, probe: bool = False
) -> int:
    """How many samples one trace may hold in ``free_bytes`` (:data:`HEADROOM` of it); at least 1.

    With ``probe``, IIA's forwards run after the trace while its records are kept: their peak counts too.
    """
    one = trace_peak_bytes(dims, tokens, answer, 1, plan, dtype)
    if probe:
        after = retained_bytes(dims, tokens, answer, plan, dtype)
        one = max(one, after + trace_peak_bytes(dims, tokens, answer, 1, "probe", dtype))
    return max(1, int(free_bytes * HEADROOM) // max(one, 1))


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of an accelerator (its free bytes + the allocator's cached, unused ones); ``None`` on the CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


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
