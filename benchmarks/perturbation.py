"""Batched perturbation scoring of one sample against the same images scored one at a time.

Positive + negative perturbation at the paper's 10 levels (19 distinct images: level 0 is shared) of
one Shapes sample, scored by ``perturbation_curves`` in one forward (``max_batch=None``) and with
``max_batch=1``. Prints median wall times over a few repeats and their ratio (no absolute targets).
Uses the bundled Shapes checkpoint when it exists, else a random model of the same architecture.

    python benchmarks/perturbation.py [--repeats 5] [--checkpoint PATH] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.shapes import make_shapes_sample  # noqa: E402
from dexar import SHAPES_CHECKPOINT, load_model  # noqa: E402
from dexar.adapters import get_adapter  # noqa: E402
from dexar.perturbation import perturbation_curves  # noqa: E402
from dexar.testing.llava import random_llava  # noqa: E402


def load(checkpoint: str, dtype: str):
    if (Path(checkpoint) / "config.json").exists():
        return load_model(checkpoint, dtype=dtype), f"checkpoint {checkpoint}"
    model = random_llava(hidden=128, layers=3, heads=4, grid=8, patch=8, vision_hidden=128, vision_layers=4)
    return (model[0].to(getattr(torch, dtype)), model[1]), "random model with the Shapes architecture"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint", default=SHAPES_CHECKPOINT)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (model, processor), source = load(args.checkpoint, args.dtype)
    adapter = get_adapter(model, processor)
    sample = make_shapes_sample(0, "test")
    prompt_ids, inputs = adapter.encode_prompts([sample.image], [sample.prompt])
    answer_ids = adapter.tokenize_answer(sample.answer)
    heatmap = torch.from_numpy(sample.union_mask).double()
    pv = inputs["pixel_values"][0]

    def run(max_batch):
        return lambda: perturbation_curves(
            adapter, pv, prompt_ids[0], answer_ids, heatmap, ("positive", "negative"), None, max_batch
        )

    batched, single = run(None)(), run(1)()
    diff = max(float((batched[m].ppl - single[m].ppl).abs().max()) for m in batched)
    t_batched, t_single = timed(run(None), args.repeats), timed(run(1), args.repeats)
    print(
        f"model: {source}, {args.dtype}, {args.threads} threads; sequence {len(prompt_ids[0]) + len(answer_ids)} tokens"
    )
    print("positive + negative, 10 levels each (19 distinct images)")
    print(f"{'scoring':<28}{'median s':>10}{'ratio':>8}")
    print(f"{'one image per forward':<28}{t_single:>10.3f}{1.0:>8.2f}")
    print(f"{'all images in one forward':<28}{t_batched:>10.3f}{t_single / t_batched:>8.2f}")
    print(f"max |ppl difference| between the two: {diff:.2e}")


if __name__ == "__main__":
    main()
