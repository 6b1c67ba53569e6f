"""One instrumented teacher-forced forward (+ the fewest backwards) recording what the methods need.

:func:`run` traces a batch for the union of the methods' needs (:data:`NEEDS`, ``hidden_grads:<layer>``)
and returns a :class:`Trace`; it dispatches on the adapter's declared
:attr:`~dexar.adapters.base.VLMAdapter.architecture`. The modules, one job each (imports point down
this list only; the two runners never import each other):

* :mod:`~dexar.trace.record`: :class:`Trace`, what the methods read.
* :mod:`~dexar.trace.plan`: needs → a plan holding one mode per decoder layer, computed once.
* :mod:`~dexar.trace.given`: the re-run's products valued at the full forward's answer rows, exact backward.
* :mod:`~dexar.trace.tail`: the hand-written layer-local backward of SwiGLU blocks (no re-run).
* :mod:`~dexar.trace.attention`: the one masking implementation and the capture functions.
* :mod:`~dexar.trace.instrument`: frozen parameters, layer hooks, the answer-rows re-run.
* :mod:`~dexar.trace.layout`: where the answer rows sit in each architecture's batch.
* :mod:`~dexar.trace.lens`: logit lens and log-likelihood read-outs.
* :mod:`~dexar.trace.backward`: layer-local gradients and batched final-logit backwards.
* :mod:`~dexar.trace.decoder`, :mod:`~dexar.trace.cross`: the runners (decoder self-attention,
  encoder-decoder cross-attention).
* :mod:`~dexar.trace.probes`: the extra forwards of Integrated Gradients, RISE and IIA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from dexar.trace import cross, decoder
from dexar.trace.backward import batched_grads
from dexar.trace.plan import ARCHITECTURES, DEFAULT_NEEDS, HIDDEN_GRADS, NEEDS, hidden_grads_need
from dexar.trace.probes import answer_log_probs, grad_weighted_attention
from dexar.trace.record import Trace

if TYPE_CHECKING:
    from dexar.adapters.base import TeacherForcedBatch, VLMAdapter

RUNNERS: dict[str, Callable[..., Trace]] = {"decoder": decoder.run, "cross": cross.run}


def run(
    adapter: VLMAdapter,
    batch: TeacherForcedBatch,
    needs: frozenset[str] | set[str] = DEFAULT_NEEDS,
    grad_chunk: int | None = None,
) -> Trace:
    """Trace one teacher-forced batch: one forward and the fewest backwards the needs allow.

    Passes: the default DEX-AR needs (``attention_rows``, ``layer_grads``) take one forward with
    detached layer inputs and one backward; ``full_attention`` and ``hidden_states`` add nothing but
    memory. ``final_logit_grads`` / ``hidden_grads:<k>`` keep the graph from layer 0 / ``k`` on and
    add backwards over the answer tokens (``final_logit_grads``: one per token, each layer's product
    reduced as its gradient arrives; ``hidden_grads``: one batched backward per chunk of tokens,
    :func:`batched_grads`); with them,
    ``layer_grads`` costs one layer-local ``autograd.grad`` per graph layer instead of a second forward.

    Args:
        adapter: Adapter of the model (its parameters are frozen for the call).
        batch: Teacher-forced batch from :meth:`VLMAdapter.build_batch`.
        needs: Subset of :data:`NEEDS` plus any ``hidden_grads:<layer>``.
        grad_chunk: Answer tokens per batched backward of ``hidden_grads`` (default: as many as fit the
            memory budget).

    Returns:
        The :class:`Trace`; tensors stay on the model's device.

    Raises:
        ValueError: Unknown needs, or an adapter declaring an unknown architecture.
        DexarInputError: Needs the adapter's architecture cannot serve.

    """
    architecture = adapter.architecture
    if architecture not in RUNNERS:
        raise ValueError(f"{type(adapter).__name__}.architecture = {architecture!r}; known: {list(ARCHITECTURES)}")
    return RUNNERS[architecture](adapter, batch, needs, grad_chunk)


__all__ = [
    "ARCHITECTURES",
    "DEFAULT_NEEDS",
    "HIDDEN_GRADS",
    "NEEDS",
    "RUNNERS",
    "Trace",
    "answer_log_probs",
    "batched_grads",
    "grad_weighted_attention",
    "hidden_grads_need",
    "run",
]
