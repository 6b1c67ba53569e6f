"""The backwards of a trace: layer-local gradients, and the final logit's gradients batched over tokens.

* :func:`layer_grads`: DEX-AR's ``g_t^l = ∂y_t^l/∂A^l[:, p_t, :]`` for every layer from one backward of
  ``Σ_{l,t} y_t^l`` (or, when the graph is kept, one layer-local ``autograd.grad`` per graph layer).
* :func:`batched_grads`: the gradients of every answer token's target at once, one ``is_grads_batched``
  backward per chunk of tokens (chunks sized by :data:`GRAD_CHUNK_BYTES` / :data:`CPU_GRAD_CHUNK_BYTES`).
* :func:`grad_attention`: Chefer's ``mean_h ReLU(∂f_t/∂A^{l,h} ⊙ A^{l,h})`` in the form the methods
  consume, reduced inside one backward per token as each layer's gradient arrives (per-head raw
  gradients would cost ``H×`` more, every layer's at once ``L×``).
* :func:`grad_x_hidden`: GradCAM's ``Σ_d ∂y_t^L/∂h_{j,d} · h_{j,d}`` at the image positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from dexar.trace.attention import Recording
from dexar.trace.plan import Capture, Plan

GRAD_CHUNK_BYTES = 1 << 30
"""Memory budget of one batched backward's gradients on an accelerator; the answer tokens are chunked to fit it."""
CPU_GRAD_CHUNK_BYTES = 64 << 20
"""The same budget on the CPU, where a batched backward is bound by memory traffic: with CheferCAM's
``(c, B, H, N, N)`` gradients several tokens per backward were slower than one at a time."""


def chunk_size(inputs: list[torch.Tensor], requested: int | None) -> int:
    """Answer tokens per batched backward: ``requested``, or as many as fit the memory budget."""
    if requested is not None:
        return max(1, int(requested))
    per_token = sum(x.numel() * x.element_size() for x in inputs) * 2  # gradients + products
    budget = CPU_GRAD_CHUNK_BYTES if inputs[0].device.type == "cpu" else GRAD_CHUNK_BYTES
    return max(1, budget // max(per_token, 1))


def batched_grads(
    target: torch.Tensor, inputs: list[torch.Tensor], chunk: int | None
) -> Iterator[tuple[int, int, tuple[torch.Tensor | None, ...]]]:
    """Gradients of every ``target[:, t]`` (summed over the batch) w.r.t. ``inputs``, chunked over ``t``.

    Yields ``(t0, c, grads)`` with each gradient ``(c, *input.shape)``: one ``is_grads_batched``
    backward per chunk of ``c`` answer slots. Samples do not interact, so slice ``b`` of a gradient
    is sample ``b``'s own.
    """
    b, t = target.shape
    size = chunk_size(inputs, chunk)
    for t0 in range(0, t, size):
        c = min(size, t - t0)
        go = torch.zeros(c, b, t, dtype=target.dtype, device=target.device)
        index = torch.arange(c, device=target.device)
        go[index, :, t0 + index] = 1
        if c == 1:  # a plain backward: vmap's batching machinery costs more than it saves for a batch of one
            grads = torch.autograd.grad(
                target, inputs, go[0], retain_graph=True, allow_unused=True, materialize_grads=True
            )
            grads = tuple(g[None] for g in grads)
        else:
            grads = torch.autograd.grad(
                target, inputs, go, retain_graph=True, is_grads_batched=True, allow_unused=True, materialize_grads=True
            )
        yield t0, c, grads
        del grads  # not alive while the next chunk's backward runs (the caller drops its reference too)


def grad_attention(target: torch.Tensor, probs: list[torch.Tensor], per_token: bool = True) -> torch.Tensor:
    """``mean_h ReLU(∂target_t/∂A^l ⊙ A^l)`` for every slot ``t`` and layer: ``(B, T, L, N, N)``.

    With ``per_token=False`` the target is ``Σ_t target_t`` and the result ``(B, 1, L, N, N)``.

    Each layer's product is reduced inside the backward (:func:`reduced_backward`), as its gradient
    arrives: one ``(B, H, N, N)`` gradient is alive at a time, not every layer's at once. So the
    tokens are backpropagated one at a time (a hook cannot take a vmapped gradient out of a batched
    backward).
    """
    b, t = target.shape
    n = probs[0].shape[-1]
    slots = t if per_token else 1
    # zeros: a layer the target does not reach gets no gradient (its product is 0, as materialize_grads gave)
    out = torch.zeros(b, slots, len(probs), n, n, dtype=probs[0].dtype, device=probs[0].device)
    for step in range(slots):
        seed = None
        if per_token:
            seed = torch.zeros_like(target)
            seed[:, step] = 1

        def write(layer: int, product: torch.Tensor, step: int = step) -> None:
            out[:, step, layer] = product

        reduced_backward(target if per_token else target.sum(), seed, probs, write)
    return out


def grad_rollout(target: torch.Tensor, probs: list[torch.Tensor], rows: slice) -> torch.Tensor:
    """Row ``p_t`` of ``(I + Ā_t^L) ⋯ (I + Ā_t^1)``, ``Ā_t^l = mean_h ReLU(∂target_t/∂A^l ⊙ A^l)``: ``(B, T, N)``.

    Chefer's relevance ``R ← R + Ā_t^l · R`` (``l = 1..L``) read at the predicting row ``p_t``, as the
    row-vector recursion ``r ← r + r Ā_t^l`` from the top layer down. The backward of ``target_t``
    delivers the layers' gradients in that order (a layer's gradient needs every later layer's), so
    each ``Ā_t^l`` is folded into ``r`` as it arrives and dropped: per token one ``(B, H, N, N)``
    gradient and one ``(B, N)`` row are alive, not ``L`` products ``(B, N, N)`` (``T·L·N²`` per sample
    over the answer). ``probs`` are in layer order; a layer the target does not reach adds nothing.

    Raises:
        RuntimeError: A layer's gradient arrived before a later layer's (a graph that is not a stack of layers).

    """
    b, t = target.shape
    n = probs[0].shape[-1]
    out = torch.zeros(b, t, n, dtype=probs[0].dtype, device=probs[0].device)
    for step in range(t):
        seed = torch.zeros_like(target)
        seed[:, step] = 1
        row = torch.zeros(b, n, dtype=probs[0].dtype, device=probs[0].device)
        row[:, rows.start + step] = 1
        state = {"row": row, "next": len(probs) - 1}

        def fold(layer: int, product: torch.Tensor, state: dict = state) -> None:
            if layer > state["next"]:
                raise RuntimeError(f"layer {layer}'s attention gradient arrived after a lower layer's")
            state["row"] = state["row"] + (state["row"][:, None, :] @ product)[:, 0, :]
            state["next"] = layer - 1

        reduced_backward(target, seed, probs, fold)
        out[:, step] = state["row"]
    return out


def reduced_backward(
    target: torch.Tensor,
    seed: torch.Tensor | None,
    probs: list[torch.Tensor],
    consume: Callable[[int, torch.Tensor], None],
) -> None:
    """One backward of ``target`` (weighted by ``seed``); ``consume(l, mean_h ReLU(∂/∂A^l ⊙ A^l))`` per layer.

    A hook on every ``A^l`` in the graph hands its ``(B, N, N)`` product to ``consume`` the moment the
    engine has its ``(B, H, N, N)`` gradient; the gradient flows on unchanged and is freed after the
    softmax backward reads it. Only the first layer's and the leaves' gradients (a leaf's hook would
    not fire: nothing below it is asked for) are returned by ``torch.autograd.grad`` and consumed
    last; asked for every ``A^l``, it would hold all ``L`` gradients until the end.
    """

    def reduce(layer: int, g: torch.Tensor) -> None:
        consume(layer, (g * probs[layer].detach()).clamp_(min=0).mean(1))

    asked = [i for i, p in enumerate(probs) if i == 0 or p.grad_fn is None]
    hooked = [i for i in range(len(probs)) if i not in asked]
    handles = [probs[i].register_hook(lambda g, i=i: reduce(i, g)) for i in hooked]
    try:
        grads = torch.autograd.grad(
            target, [probs[i] for i in asked], seed, retain_graph=True, allow_unused=True, materialize_grads=True
        )
    finally:
        for handle in handles:
            handle.remove()
    for i, g in sorted(zip(asked, grads, strict=True), reverse=True):
        reduce(i, g)


def layer_grads(
    lens: list[torch.Tensor],
    record: Recording,
    plan: Plan,
    rows: slice,
    done: dict[int, torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """``g_t^l = ∂y_t^l/∂A^l[:, p_t, :]`` of every layer: ``(B, H, T, N)`` each (zeros where unused).

    Leaf layers (``LEAF_ROWS``, ``RERUN_ROWS``) share one backward of ``Σ_{l,t} y_t^l``: ``y_t^l`` reaches
    only layer ``l``'s leaf, the inputs being detached. Graph layers get one ``autograd.grad`` each of
    ``Σ_t y_t^l`` w.r.t. their own ``A^l``, which only visits layer ``l``. Layers in ``done`` already have
    theirs (a re-run layer's, taken during the forward: :func:`dexar.trace.instrument.forward`'s ``rows_done``).
    """
    keep = plan.graph_from is not None  # the final-logit backwards share the graph
    found: dict[int, torch.Tensor | None] = dict(done or {})
    local = [
        i
        for i, layer in enumerate(plan.layers)
        if layer.capture in (Capture.LEAF_ROWS, Capture.RERUN_ROWS) and i not in found
    ]
    if local:
        target = sum(lens[i].sum() for i in local)
        leaves = [record.rows[i] for i in local]
        found.update(zip(local, torch.autograd.grad(target, leaves, retain_graph=keep, allow_unused=True), strict=True))
    for i, layer in enumerate(plan.layers):
        if layer.capture is Capture.GRAPH:
            (g,) = torch.autograd.grad(lens[i].sum(), record.probs[i], retain_graph=True)
            found[i] = g[:, :, rows].clone()  # a view would keep the whole (B, H, N, N) gradient alive
            del g
        elif layer.capture is Capture.GRAPH_ROWS:
            (found[i],) = torch.autograd.grad(lens[i].sum(), record.rows[i], retain_graph=True)
    out = []
    for i in range(len(plan.layers)):
        g = found[i]
        out.append(g if g is not None else torch.zeros_like(record.answer_rows(i, rows)))
    return out


def image_dot(grads: torch.Tensor, states: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """``Σ_d grads[c, b, j, d] · states[b, j, d]`` at the image positions ``j``: ``(B, c, V)``, float32 or wider.

    Gathered before the product (``V`` rows, not ``N``) and summed in float32 on a bf16 model: a bf16 sum
    over ``D`` rounds the map to 8 bits, whose ties bias GradCAM's pixel order.
    """
    work = torch.promote_types(grads.dtype, torch.float32)
    c, b, _, d = grads.shape
    index = image_index[None, :, :, None].expand(c, -1, -1, d)  # (c, B, V, D)
    picked = torch.gather(grads, 2, index).to(work)
    states = torch.gather(states, 1, image_index[..., None].expand(-1, -1, d)).to(work)  # (B, V, D)
    return (picked * states).sum(-1).transpose(0, 1)


def grad_x_hidden(
    final: torch.Tensor,
    inputs: dict[int, torch.Tensor],
    record: Recording,
    layers: tuple[int, ...],
    image_index: torch.Tensor,
    num_layers: int,
    rows: slice,
    chunk: int | None,
) -> dict[int, torch.Tensor]:
    """Gradient × activation of the image hidden states, summed over the hidden dimension.

    Layers ``k`` below the last: ``Σ_d ∂y_t^L/∂h^k_{j,d} · h^k_{j,d}`` of the residual stream entering
    layer ``k``, from one batched backward per chunk of tokens.

    The last layer reads the image states only through its input norm (the residual and query of an
    image row never reach ``p_t``), and RMSNorm is scale-invariant, so the same product on its
    residual input is ≈ 0 by construction. It is taken on the normalised states ``x̂_j`` that its
    attention reads (the standard GradCAM target of a transformer block, its pre-attention norm).
    With bias-free key/value projections (the Llama family; rotary is linear too) ``K_j``, ``V_j``
    are linear in ``x̂_j``, so ``Σ_d ∂y_t/∂x̂_{j,d} x̂_{j,d} = ⟨∂y_t/∂K_j, K_j⟩ + ⟨∂y_t/∂V_j, V_j⟩``
    exactly. The per-token ``∂y_t/∂(K, V)`` come from ``δ_t = ∂y_t/∂out[p_t]`` (one plain backward:
    row ``p_t`` of the attention output feeds only ``y_t``) by a batched backward through the
    attention alone, not the projections and MLP of every row.

    Args:
        final: ``(B, T)`` the final-layer logits ``y_t^L``.
        inputs: Layer → ``(B, N, D)`` its input hidden states (in the graph).
        record: The recording (the last layer's attention output, keys and values).
        layers: The layers ``k``.
        image_index: ``(B, V)`` image positions.
        num_layers: ``L``.
        rows: The answer rows ``p_t``.
        chunk: Answer tokens per batched backward.

    Returns:
        Layer → ``(B, T, V)``.

    """
    parts: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    last = num_layers - 1
    direct = [k for k in layers if k != last]
    if direct:
        for _, _, grads in batched_grads(final, [inputs[k] for k in direct], chunk):
            for k, g in zip(direct, grads, strict=True):  # g: (c, B, N, D)
                parts[k].append(image_dot(g, inputs[k].detach(), image_index))
    if last in layers:
        out, key, value = record.outputs[last], record.keys[last], record.values[last]
        (delta,) = torch.autograd.grad(final.sum(), out, retain_graph=True)  # (B, N, H, D)
        t = final.shape[1]
        size = chunk_size([key, value], chunk)
        for t0 in range(0, t, size):
            c = min(size, t - t0)
            seed = torch.zeros(c, *out.shape, dtype=out.dtype, device=out.device)
            steps = torch.arange(c, device=out.device)
            at = rows.start + t0 + steps
            seed[steps, :, at] = delta[:, at].transpose(0, 1)
            g_key, g_value = torch.autograd.grad(
                out, [key, value], seed, retain_graph=True, is_grads_batched=True, materialize_grads=True
            )  # (c, B, H_kv, N, D)
            g_key, g_value = (g.transpose(2, 3).flatten(3) for g in (g_key, g_value))  # (c, B, N, H_kv·D)
            key_rows, value_rows = (x.detach().transpose(1, 2).flatten(2) for x in (key, value))
            parts[last].append(image_dot(g_key, key_rows, image_index) + image_dot(g_value, value_rows, image_index))
    return {k: torch.cat(parts[k], dim=1) for k in layers}
