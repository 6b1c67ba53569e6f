"""Completeness gap of Integrated Gradients on the bundled Shapes model (float64).

Prints, per ``spacing:steps``, the relative gap ``|Σ IG − (f(x) − f(x'))| / |f(x) − f(x')|`` of the
answer-level target over the first ``N`` test images (min, median, max), ``f`` the answer's log-likelihood
and ``x'`` the mean image. Usage: ``python benchmarks/ig_completeness.py 10 uniform:64 quadratic:256``.
"""

from __future__ import annotations

import sys

import torch

from datamodules.shapes import make_shapes_sample
from dexar import trace
from dexar.adapters import get_adapter
from dexar.loading import load_model
from dexar.methods import IntegratedGradients
from dexar.shapes_model import SHAPES_CHECKPOINT


def main(argv: list[str]) -> None:
    """Run the measurement for ``argv = [N, spacing:steps, ...]``."""
    model, processor = load_model(SHAPES_CHECKPOINT, dtype="float64")
    adapter = get_adapter(model, processor)
    n = int(argv[0])
    samples = [make_shapes_sample(i, "test") for i in range(n)]
    answers = [adapter.tokenize_answer(s.answer) for s in samples]
    prompt_ids, image_inputs = adapter.encode_prompts([s.image for s in samples], [s.prompt for s in samples])
    batch = adapter.build_batch(prompt_ids, answers, image_inputs)
    traced = trace.run(adapter, batch, IntegratedGradients.needs)
    t_max = batch.answer_ids.shape[1]
    delta = []
    with torch.no_grad():
        for b in range(n):
            x = adapter.pixel_view(batch, b).double()
            length = int(batch.answer_lengths[b])
            pair = torch.stack([x, torch.zeros_like(x)])  # the image and the mean-image baseline
            log_probs = trace.answer_log_probs(adapter, batch, pair, index=b)[:, t_max - length :]
            f = log_probs.sum(1)
            delta.append(float(f[0] - f[1]))
    delta_t = torch.tensor(delta, dtype=torch.float64)
    for spacing, steps in (a.split(":") for a in argv[1:]):
        ig = IntegratedGradients(steps=int(steps), spacing=spacing, batch_size=32)
        total = ig.attributions(traced)[:, -1].sum(-1)  # every slot holds the answer-level map
        gap = 100 * (total - delta_t).abs() / delta_t.abs()
        print(
            f"{spacing:9s} {int(steps):4d}: gap % min {gap.min():.2f} median {gap.median():.2f} max {gap.max():.2f}"
            f"  (|Δf| {delta_t.abs().min():.2f}..{delta_t.abs().max():.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["10", "uniform:64", "quadratic:64", "uniform:256", "quadratic:256"])
