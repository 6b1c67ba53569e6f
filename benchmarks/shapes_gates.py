"""The Shapes model's gates on held-out test images: exact match, DEX-AR localization, checkpoint size.

* Greedy exact match of the generated caption against the ground truth (500 images by default, square
  and non-square, reported for both).
* Energy Pointing Game of DEX-AR on the ground-truth captions, on the pixels the model saw: every mask
  is taken through the processor's geometry (resize of the short side to 64, 64×64 center crop; the
  objects outside that view have no mask by construction) and compared with the 8×8 map upsampled
  (bilinear) to 64×64. Two readings: each content *piece*'s map (every piece of a colour or shape word,
  labelled through :func:`dexar.labels.sample_token_labels`) against the mask of the object its word
  names, chance = mean area of those masks in the view; and the sequence map against the union of
  the masks, chance = mean union area.
* Size of the checkpoint directory.

    python benchmarks/shapes_gates.py [--samples 500] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.shapes import make_shapes_sample, view_mask  # noqa: E402
from dexar import SHAPES_CHECKPOINT, load_model  # noqa: E402
from dexar.adapters import get_adapter  # noqa: E402
from dexar.generation import generate_answers  # noqa: E402
from dexar.labels import sample_token_labels  # noqa: E402
from dexar.methods import DexAR  # noqa: E402
from dexar.schema import Sample  # noqa: E402
from dexar.shapes.vocabulary import IMAGE_SIZE  # noqa: E402
from dexar.trace import run as run_trace  # noqa: E402
from metrics.functional import energy_pointing_game  # noqa: E402


def up(maps: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``(N, h, w)`` maps → ``(N, size, size)`` bilinear, clamped at 0."""
    return F.interpolate(maps[:, None].double(), size=(size, size), mode="bilinear", align_corners=False)[:, 0].clamp(
        min=0
    )


def view_masks(sample: Sample) -> torch.Tensor:
    """``(K, 64, 64)``: the sample's object masks as the model sees them (:func:`view_mask`)."""
    return torch.from_numpy(np.stack([view_mask(m) for m in sample.masks]))


def content_pieces(adapter, sample: Sample, answer: list[int], t_max: int) -> tuple[list[int], list[int]]:
    """The answer slots of the content pieces of ``sample``'s teacher-forced ``answer`` and their objects.

    Every piece of a colour or shape word is labelled through :func:`dexar.labels.sample_token_labels`;
    slots count in a batch of answers left-padded to ``t_max``.

    Raises:
        RuntimeError: The labels' pieces are not ``answer``'s tokens.
    """
    labels = sample_token_labels(sample, adapter.tokenizer, context=adapter.format_prompt(sample.prompt))
    if labels.ids != answer:
        raise RuntimeError(f"{sample.id}: word → piece labels do not follow the answer's tokens")
    picks = [t for t, k in enumerate(labels.mask_index) if k >= 0]
    return [t_max - len(answer) + t for t in picks], [labels.mask_index[t] for t in picks]


def exact_match(adapter, samples: list[Sample], batch_size: int) -> list[bool]:
    hits = []
    for first in range(0, len(samples), batch_size):
        chunk = samples[first : first + batch_size]
        answers = generate_answers(adapter, chunk, max_new_tokens=32)
        hits += [a.text == s.answer for a, s in zip(answers, chunk, strict=True)]
    return hits


def localization(adapter, samples: list[Sample], batch_size: int) -> dict[str, list[float]]:
    """Per content piece and per sample: EPG and the area (chance) of the target mask in the model's view."""
    out: dict[str, list[float]] = {k: [] for k in ("token_epg", "token_area", "seq_epg", "seq_area")}
    method = DexAR()
    for first in range(0, len(samples), batch_size):
        chunk = samples[first : first + batch_size]
        answers = [adapter.tokenize_answer(s.answer) for s in chunk]
        prompt_ids, image_inputs = adapter.encode_prompts([s.image for s in chunk], [s.prompt for s in chunk])
        batch = adapter.build_batch(prompt_ids, answers, image_inputs)
        result = method(run_trace(adapter, batch, method.needs))
        t_max = batch.answer_ids.shape[1]
        for b, sample in enumerate(chunk):
            views = view_masks(sample)
            slots, objects = content_pieces(adapter, sample, answers[b], t_max)
            targets = views[objects]
            out["token_epg"] += energy_pointing_game(up(result.token_maps[b, slots]), targets).tolist()
            out["token_area"] += targets.double().mean((1, 2)).tolist()
            union = views.any(0, keepdim=True)
            out["seq_epg"] += energy_pointing_game(up(result.sequence_map[b][None]), union).tolist()
            out["seq_area"] += union.double().mean((1, 2)).tolist()
    return out


def _mean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if len(arr) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--checkpoint", default=SHAPES_CHECKPOINT)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    files = {p.name: p.stat().st_size for p in Path(args.checkpoint).iterdir()}
    print(f"checkpoint {args.checkpoint}: {sum(files.values()) / 2**20:.2f} MiB ({', '.join(sorted(files))})")
    model, processor = load_model(args.checkpoint)
    adapter = get_adapter(model, processor)
    samples = [make_shapes_sample(i, "test") for i in range(args.samples)]
    square = [s.image.size == (IMAGE_SIZE, IMAGE_SIZE) for s in samples]
    hits = exact_match(adapter, samples, args.batch_size)
    for name, keep in (("all", [True] * len(samples)), ("square", square), ("non-square", [not q for q in square])):
        n = sum(keep)
        k = sum(h for h, q in zip(hits, keep, strict=True) if q)
        print(f"exact match {name:<11} {k}/{n} = {k / max(n, 1):.1%}")
    outside = sum(len(s.meta["outside_view"]) for s in samples)
    print(f"{sum(not q for q in square)} non-square images, {outside} objects outside the view")
    loc = localization(adapter, samples, args.batch_size)
    for kind, label in (("token", "content pieces vs their objects"), ("seq", "sequence map vs union")):
        epg, chance = _mean(loc[f"{kind}_epg"]), _mean(loc[f"{kind}_area"])
        empty = int(np.isnan(np.asarray(loc[f"{kind}_epg"])).sum())
        print(
            f"DEX-AR EPG, {label}: {epg:.3f}, chance {chance:.3f}, {epg / chance:.2f}x chance "
            f"({len(loc[f'{kind}_epg'])} maps, {empty} empty)"
        )


if __name__ == "__main__":
    main()
