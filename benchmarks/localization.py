"""Localization of content-token maps on held-out Shapes images (EPG against the named object's mask).

For every content piece (each piece of a colour or shape word, labelled through
:func:`dexar.labels.sample_token_labels`) of the ground-truth caption, its token map is upsampled
(bilinear) to the 64×64 view the model saw and scored with the Energy Pointing Game against the mask of
the object its word names, taken through the processor's crop (:func:`datamodules.shapes.view_mask`).
Chance is the mean area fraction of those masks in the view.
Rows: DEX-AR (all layers and each layer alone) and raw attention
(Σ_l mean_h A[p_t, V], and each layer alone).

    python benchmarks/localization.py [--samples 500] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shapes_gates import content_pieces, up, view_masks  # noqa: E402
from datamodules.shapes import make_shapes_sample  # noqa: E402
from dexar import SHAPES_CHECKPOINT, load_model  # noqa: E402
from dexar.adapters import get_adapter  # noqa: E402
from dexar.methods import DexAR, RawAttention  # noqa: E402
from dexar.trace import run as run_trace
from metrics.functional import energy_pointing_game  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--checkpoint", default=SHAPES_CHECKPOINT)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, processor = load_model(args.checkpoint, dtype="float64")
    adapter = get_adapter(model, processor)
    n_layers = len(adapter.decoder_layers)
    variants = {"dexar (all layers)": (DexAR(), None), "attention (all layers)": (RawAttention(), None)}
    for layer in range(n_layers):
        variants[f"dexar (layer {layer})"] = (DexAR(), layer)
        variants[f"attention (layer {layer})"] = (RawAttention(), layer)
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in variants}
    areas: list[float] = []
    empty = {name: 0 for name in variants}
    for first in range(0, args.samples, args.batch_size):
        samples = [make_shapes_sample(i, "test") for i in range(first, min(args.samples, first + args.batch_size))]
        answers = [adapter.tokenize_answer(s.answer) for s in samples]
        prompt_ids, image_inputs = adapter.encode_prompts([s.image for s in samples], [s.prompt for s in samples])
        batch = adapter.build_batch(prompt_ids, answers, image_inputs)
        trace = run_trace(adapter, batch)
        t_max = batch.answer_ids.shape[1]
        slots, targets = [], []  # (sample, answer slot) of each content piece, its object's mask in the view
        for b, s in enumerate(samples):
            pieces, objects = content_pieces(adapter, s, answers[b], t_max)
            slots += [(b, t) for t in pieces]
            targets.append(view_masks(s)[objects])
        masks = torch.cat(targets)
        areas += masks.double().mean((1, 2)).tolist()
        for name, (method, layer) in variants.items():
            out = method(trace if layer is None else trace.select_layers(slice(layer, layer + 1)))
            epg = energy_pointing_game(up(torch.stack([out.token_maps[b, t] for b, t in slots])), masks)
            empty[name] += int(epg.isnan().sum())
            scores[name].append(epg[~epg.isnan()])
    chance = sum(areas) / len(areas)
    print(
        f"{args.samples} held-out Shapes images, {len(areas)} content pieces; "
        f"chance (mean object area in the view) {chance:.3f}"
    )
    print(f"{'map':<26}{'EPG':>8}{'× chance':>10}{'empty':>7}")
    for name, vals in scores.items():
        epg = float(torch.cat(vals).mean())
        print(f"{name:<26}{epg:>8.3f}{epg / chance:>10.2f}{empty[name]:>7}")


if __name__ == "__main__":
    main()
