"""Trace needs → a plan: what each decoder layer records, decided once per trace.

Methods declare *needs* (:data:`NEEDS`, plus ``hidden_grads:<layer>``); the tracer never sees method
names. :func:`make_plan` turns the union of the needs into one :class:`LayerPlan` per decoder layer:
how its attention is captured (:class:`Capture`) and what happens to its input hidden states
(:class:`Input`). The capture functions (:mod:`dexar.trace.attention`) and the layer hooks
(:mod:`dexar.trace.instrument`) only read the plan.

What each need costs:

* ``attention_rows``, ``layer_grads``: the DEX-AR trace (the default): every layer's input detached,
  the answer rows of ``A^l`` captured as leaves (:attr:`Capture.LEAF_ROWS`); for row-local layers
  (:attr:`~dexar.adapters.base.VLMAdapter.row_local_layers`) the rows' graph is built by re-running the
  layer on its answer rows (:attr:`Capture.RERUN_ROWS`). One forward, one backward.
* ``full_attention``: every row of every ``A^l``, averaged over heads (``(B, L, N, N)``), computed
  without gradients beside the layer output.
* ``hidden_states``: the last layer's output at every position after the final norm (``(B, N, D)``).
* ``final_logit_grads``: gradients of the *final-layer* logit ``y_t^L`` w.r.t. every ``A^l``; they flow
  through every later layer, so the graph is kept from the first layer on and every row is explicit
  (:attr:`Capture.GRAPH`).
* ``hidden_grads:<k>``: GradCAM's gradient × activation at decoder layer ``k``'s input; the graph is kept
  from layer ``k`` on; when nothing needs the other rows, the last layer keeps only its answer rows in
  the graph (:attr:`Capture.GRAPH_ROWS`).
* ``extra_forwards``: the method runs its own forwards (:mod:`dexar.trace.probes`); nothing is recorded.

When the graph is kept, DEX-AR's layer-local gradients come from the same forward: ``Σ_t y_t^l``
reaches ``A^l`` through layer ``l`` only (autograd prunes every other path), so the values equal the
detached trace.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dexar.adapters.errors import DexarInputError

NEEDS = frozenset(
    {"attention_rows", "layer_grads", "full_attention", "final_logit_grads", "hidden_states", "extra_forwards"}
)
HIDDEN_GRADS = "hidden_grads"
"""Prefix of the parameterised need ``hidden_grads:<layer>`` (see :func:`hidden_grads_need`)."""
DEFAULT_NEEDS = frozenset({"attention_rows", "layer_grads"})
"""What DEX-AR needs: the answer rows of every ``A^l`` and their layer-local gradients."""
ARCHITECTURES = ("decoder", "cross")
"""Values of :attr:`~dexar.adapters.base.VLMAdapter.architecture`: a decoder's self-attention over image and
text tokens, or an encoder-decoder's cross-attention over the encoder sequence (paper appendix D)."""
CROSS_NEEDS = frozenset({"attention_rows", "layer_grads", "extra_forwards"})
"""The needs a cross-attention trace serves: the others are defined on self-attention over image and
text tokens or on image hidden states in the decoder, which holds none."""


def hidden_grads_need(layer: int) -> str:
    """The need for final-logit gradients w.r.t. decoder layer ``layer``'s input hidden states."""
    return f"{HIDDEN_GRADS}:{int(layer)}"


class Capture(enum.Enum):
    """How one layer's attention is computed and recorded (:mod:`dexar.trace.attention`)."""

    LEAF_ROWS = "leaf_rows"
    """SDPA for every row; the answer rows recomputed from a leaf copy of ``A^l[:, p_t, :]``."""
    RERUN_ROWS = "rerun_rows"
    """As ``LEAF_ROWS`` without autograd; the layer is re-run on its answer rows to build their graph (a
    float32/float64 SwiGLU block instead gets its backward by hand from the forward's rows: :mod:`dexar.trace.tail`)."""
    GRAPH_ROWS = "graph_rows"
    """SDPA without a graph for every row; the answer rows in the graph, computed from ``q``, ``K``, ``V``."""
    GRAPH = "graph"
    """Every row explicit and in the graph."""


class Input(enum.Enum):
    """What happens to a decoder layer's input hidden states."""

    DETACH = "detach"
    """Cut from the graph (values unchanged)."""
    LEAF = "leaf"
    """Cut, then a leaf that requires grad: the kept graph starts here."""
    GRAPH = "graph"
    """Kept in the graph."""


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer does during the traced forward.

    Attributes:
        capture: How its attention is captured.
        input: What happens to its input hidden states.
        mean: Also record ``mean_h A^l`` over every row (``full_attention``).
        keep_input: Record its input hidden states (``hidden_grads:<layer>``).

    """

    capture: Capture
    input: Input = Input.DETACH
    mean: bool = False
    keep_input: bool = False


@dataclass(frozen=True)
class Plan:
    """One :class:`LayerPlan` per decoder layer and what the backward computes.

    Attributes:
        layers: The per-layer plans, in layer order.
        layer_grads: ``g_t^l = ∂y_t^l/∂A^l[:, p_t, :]`` (the captured leaves require grad).
        final_logit_grads: Chefer's relevance row ``p_t`` of ``∏_l (I + mean_h ReLU(∂y_t^L/∂A^{l,h} ⊙ A^{l,h}))``.
        hidden_grads: Layers ``k`` (non-negative, sorted) of GradCAM's gradient × activation.
        final_hidden: The last layer's output after the final norm.

    """

    layers: tuple[LayerPlan, ...]
    layer_grads: bool = False
    final_logit_grads: bool = False
    hidden_grads: tuple[int, ...] = ()
    final_hidden: bool = False

    @property
    def graph_from(self) -> int | None:
        """First layer whose input starts the kept graph (``None``: every layer is layer-local)."""
        return next((i for i, layer in enumerate(self.layers) if layer.input is Input.LEAF), None)

    @property
    def full_attention(self) -> bool:
        """Whether every layer records ``mean_h A^l`` over every row."""
        return all(layer.mean for layer in self.layers)

    @property
    def forward_grad(self) -> bool:
        """Whether autograd records the forward (not with answer-row re-runs: they build the graph)."""
        rerun = any(layer.capture is Capture.RERUN_ROWS for layer in self.layers)
        return (self.layer_grads and not rerun) or self.graph_from is not None


def parse_needs(needs: frozenset[str] | set[str], num_layers: int) -> tuple[set[str], list[int]]:
    """Split needs into plain needs and the sorted, non-negative layers of ``hidden_grads:<layer>``.

    Raises:
        ValueError: An unknown need (the message lists the known ones) or a layer out of range.

    """
    plain: set[str] = set()
    layers: set[int] = set()
    unknown = []
    for need in needs:
        name, sep, arg = need.partition(":")
        if need in NEEDS:
            plain.add(need)
        elif name == HIDDEN_GRADS and sep:
            try:
                k = int(arg)
            except ValueError:
                unknown.append(need)
                continue
            if not -num_layers <= k < num_layers:
                raise ValueError(f"{need}: the model has {num_layers} decoder layers")
            layers.add(k % num_layers)
        else:
            unknown.append(need)
    if unknown:
        known = sorted(NEEDS) + [f"{HIDDEN_GRADS}:<layer>"]
        raise ValueError(f"unknown trace needs {sorted(unknown)}; known: {known}")
    return plain, sorted(layers)


def make_plan(needs: frozenset[str] | set[str], architecture: str, num_layers: int, row_local: bool = False) -> Plan:
    """The plan serving ``needs`` with one forward and the fewest backwards.

    Args:
        needs: Subset of :data:`NEEDS` plus any ``hidden_grads:<layer>``.
        architecture: ``"decoder"`` or ``"cross"`` (:data:`ARCHITECTURES`).
        num_layers: Number of decoder layers ``L``.
        row_local: The decoder layers are row-local outside attention (answer-row re-runs are exact).

    Raises:
        ValueError: Unknown needs or architecture.
        DexarInputError: Needs the architecture cannot serve (named in one line).

    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {list(ARCHITECTURES)}")
    plain, hidden = parse_needs(needs, num_layers)
    if architecture == "cross":
        refused = sorted(need for need in needs if need not in CROSS_NEEDS)
        if refused:
            raise DexarInputError(
                f"trace needs {refused} are not supported for an encoder-decoder's cross-attention "
                f"(supported: {sorted(CROSS_NEEDS)})"
            )
        row_local = False  # the decoder's self-attention reads every row: its layers are not row-local
    layer_grads = "layer_grads" in plain
    final = "final_logit_grads" in plain
    mean = final or "full_attention" in plain
    graph_from = 0 if final else (hidden[0] if hidden else None)
    last = num_layers - 1
    layers = []
    for i in range(num_layers):
        if graph_from is None or i < graph_from:
            capture = Capture.RERUN_ROWS if layer_grads and graph_from is None and row_local else Capture.LEAF_ROWS
            source = Input.DETACH
        else:  # y^L needs only the last layer's answer rows unless every row is recorded anyway
            capture = Capture.GRAPH_ROWS if i == last and not mean else Capture.GRAPH
            source = Input.LEAF if i == graph_from else Input.GRAPH
        layers.append(LayerPlan(capture, source, mean=mean, keep_input=i in hidden))
    return Plan(tuple(layers), layer_grads, final, tuple(hidden), "hidden_states" in plain)


def graph_plan(num_layers: int) -> Plan:
    """Every layer's every row in the graph from the first layer on, nothing else (the probes' forward)."""
    layers = [LayerPlan(Capture.GRAPH, Input.LEAF if i == 0 else Input.GRAPH) for i in range(num_layers)]
    return Plan(tuple(layers))
