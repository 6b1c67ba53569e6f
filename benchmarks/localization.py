"""Localization of content-token maps on held-out Shapes images (EPG against the named object's mask).

For every content token (colour or shape word) of the ground-truth caption, its token map is placed
on the image (``adapter.map_geometry``; on the square 64×64 images, the bilinear upsampling) and
scored with the Energy Pointing Game against the mask of the object it names. Chance is the mean area
fraction of those objects. Rows: DEX-AR (all layers and each layer alone) and raw attention
(Σ_l mean_h A[p_t, V], and each layer alone).

    python benchmarks/localization.py [--samples 500] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
        targets = []  # (sample, slot, mask, where the sample's maps lie on its image)
        for b, s in enumerate(samples):
            offset = t_max - len(answers[b])
            for w, k in enumerate(s.word_mask_index):
                if k >= 0:
                    targets.append((b, offset + w, torch.from_numpy(s.masks[k]), adapter.map_geometry(s.image)))
        areas += [float(m.double().mean()) for _, _, m, _ in targets]
        masks = torch.stack([m for _, _, m, _ in targets])
        for name, (method, layer) in variants.items():
            out = method(trace if layer is None else trace.select_layers(slice(layer, layer + 1)))
            up = torch.stack([g.place(out.token_maps[b, t], tuple(m.shape)) for b, t, m, g in targets])
            epg = energy_pointing_game(up.clamp(min=0), masks)
            empty[name] += int(epg.isnan().sum())
            scores[name].append(epg[~epg.isnan()])
    chance = sum(areas) / len(areas)
    print(f"{args.samples} held-out Shapes images, {len(areas)} content tokens; chance (mean object area) {chance:.3f}")
    print(f"{'map':<26}{'EPG':>8}{'× chance':>10}{'empty':>7}")
    for name, vals in scores.items():
        epg = float(torch.cat(vals).mean())
        print(f"{name:<26}{epg:>8.3f}{epg / chance:>10.2f}{empty[name]:>7}")


if __name__ == "__main__":
    main()
