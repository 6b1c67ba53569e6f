"""Synthetic payloads: a Shapes-like image whose content words point at known objects (demos and tests).

Each content word's map is a Gaussian blob centred on the object it names, so a reader (or a test)
can tell which word's map is on screen; filler words get faint noise and small weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from dexar.explorer.payload import ExplanationPayload, MethodView, PieceView, WordView
from dexar.explorer.run import MetricSpec, RunPayload, RunSample

COLOURS = {"red": (220, 50, 47), "blue": (38, 98, 217), "green": (46, 160, 67), "yellow": (236, 196, 30)}
SPLITS = {"triangle": ["▁tri", "angle"], "yellow": ["▁yel", "low"], "circle": ["▁cir", "cle"], "square": ["▁square"]}


@dataclass(frozen=True)
class SyntheticObject:
    """A drawn object: colour, shape, centre ``(x, y)`` and radius in image pixels."""

    colour: str
    shape: str
    center: tuple[float, float]
    radius: float


def scene(width: int, height: int, objects: list[SyntheticObject], seed: int = 0) -> Image.Image:
    """A Shapes-like picture: a light, slightly noisy background with the objects drawn on it."""
    rng = np.random.default_rng(seed)
    background = 232 + rng.integers(-8, 8, (height, width, 1))
    image = Image.fromarray(np.repeat(background, 3, axis=2).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        (x, y), r, fill = obj.center, obj.radius, COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:
            draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill)
    return image


def blob(grid: tuple[int, int], center: tuple[float, float], sigma: float) -> np.ndarray:
    """An ``(h, w)`` Gaussian bump with its maximum 1 at ``center = (x, y)`` in grid-cell units."""
    ys, xs = np.mgrid[0 : grid[0], 0 : grid[1]] + 0.5
    bump = np.exp(-((xs - center[0]) ** 2 + (ys - center[1]) ** 2) / (2 * sigma**2))
    return bump / bump.max()


def synthetic_payload(
    seed: int = 0,
    methods: tuple[str, ...] = ("dexar", "attention", "chefercam"),
    size: tuple[int, int] = (320, 240),
    grid: tuple[int, int] = (24, 24),
    crop: bool = True,
) -> ExplanationPayload:
    """Two or three objects, the answer "I see a <colour> <shape> and a <colour> <shape> ...".

    With ``crop`` the maps cover the centred square of the image (a center crop, like LLaVA's
    processor); objects lie inside it. Method ``k`` blurs the blobs more and adds more noise, so the
    methods differ visibly. Multi-piece words (``tri`` + ``angle``) get one blob per piece, slightly
    shifted, and the word map is their λ-weighted mean.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    side = min(width, height) if crop else None
    box = (
        ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        if side
        else (0, 0, width, height)
    )
    count = 2 + seed % 2
    colours = rng.permutation(list(COLOURS))[:count]
    shapes = rng.choice(["circle", "square", "triangle"], count)
    # object centres spread over the box, one per horizontal third
    spots = rng.permutation(3)[:count]
    objects = []
    for k in range(count):
        fx, fy = (spots[k] + 0.5) / 3, rng.uniform(0.25, 0.75)
        cx, cy = box[0] + fx * (box[2] - box[0]), box[1] + fy * (box[3] - box[1])
        objects.append(
            SyntheticObject(str(colours[k]), str(shapes[k]), (cx, cy), (box[2] - box[0]) * rng.uniform(0.09, 0.13))
        )
    image = scene(width, height, objects, seed)
    words: list[tuple[list[str], int | None]] = [(["▁I"], None), (["▁see"], None)]
    for k, obj in enumerate(objects):
        words.append((["▁a"], None))
        words.append((SPLITS.get(obj.colour, [f"▁{obj.colour}"]), k))
        words.append((SPLITS.get(obj.shape, [f"▁{obj.shape}"]), k))
        if k < count - 1:
            words.append((["▁and"], None))
    gh, gw = grid

    def grid_xy(obj: SyntheticObject) -> tuple[float, float]:
        return ((obj.center[0] - box[0]) / (box[2] - box[0]) * gw, (obj.center[1] - box[1]) / (box[3] - box[1]) * gh)

    views = []
    for m, name in enumerate(methods):
        noise_level, sigma = 0.08 + 0.07 * m, 1.6 + 0.9 * m
        method_rng = np.random.default_rng(seed * 97 + m)
        word_views = []
        for pieces, target in words:
            piece_views = []
            for j, text in enumerate(pieces):
                noise = method_rng.random(grid) * noise_level
                if target is None:
                    values, weight = method_rng.random(grid) * 0.5, float(method_rng.uniform(0.0, 0.4))
                else:
                    x, y = grid_xy(objects[target])
                    values = np.clip(blob(grid, (x + 0.6 * j, y), sigma) + noise, 0, None)
                    weight = float(method_rng.uniform(1.2, 3.0))
                values = values / values.max()
                piece_views.append(PieceView(text=text, weight=weight, map=values))
            weights = np.array([p.weight for p in piece_views])
            merged = np.tensordot(weights, np.stack([p.map for p in piece_views]), axes=1)
            word_views.append(
                WordView(
                    pieces=piece_views,
                    weight=float(weights.max()),
                    map=merged / merged.max(),
                    filler=target is None,
                )
            )
        seq = sum(w.weight * np.asarray(w.map) for w in word_views)
        views.append(
            MethodView(
                name=name,
                label={"dexar": "DEX-AR", "attention": "Attention", "chefercam": "CheferCAM"}.get(name, name),
                words=word_views,
                sequence_map=seq / seq.max(),
                options={"head_filter": "max", "relu": True} if name == "dexar" else {},
            )
        )
    answer = " ".join("".join(p).replace("▁", "") for p, _ in words)
    return ExplanationPayload(
        image=image,
        methods=views,
        answer=answer,
        prompt="Describe the image.",
        sample_id=f"synthetic-{seed:03d}",
        grid_box=box if crop else None,
    )


def synthetic_run(samples: int = 12, methods: tuple[str, ...] = ("dexar", "attention", "chefercam")) -> RunPayload:
    """A run of ``samples`` synthetic payloads with per-sample metric values and mean curves."""
    rng = np.random.default_rng(1234)
    specs = [
        MetricSpec("epg", True, "EPG"),
        MetricSpec("soft_iou", True, "soft-IoU"),
        MetricSpec("pos_auc", True, "Pos. AUC"),
        MetricSpec("neg_auc", False, "Neg. AUC"),
    ]
    levels = [round(0.1 * k, 1) for k in range(10)]
    run_samples = []
    for i in range(samples):
        payload = synthetic_payload(seed=i, methods=methods)
        metrics = {
            m: {
                "epg": float(rng.uniform(0.2, 0.9) - 0.1 * k),
                "soft_iou": float(rng.uniform(0.1, 0.6) - 0.05 * k),
                "pos_auc": float(rng.uniform(1.5, 4.0) - 0.3 * k),
                "neg_auc": float(rng.uniform(0.9, 1.6) + 0.1 * k),
            }
            for k, m in enumerate(methods)
        }
        run_samples.append(RunSample(payload, metrics))
    curves = {
        m: {
            "pos_auc": {"levels": levels, "y": [1 + (3.5 - 0.4 * k) * x**1.5 for x in levels]},
            "neg_auc": {"levels": levels, "y": [1 + (0.2 + 0.2 * k) * x**2 for x in levels]},
        }
        for k, m in enumerate(methods)
    }
    means = {m: {s.name: float(np.mean([r.metrics[m][s.name] for r in run_samples])) for s in specs} for m in methods}
    return RunPayload(
        samples=run_samples,
        metrics=specs,
        curves=curves,
        means=means,
        title="synthetic run",
        details={"dataset": "Shapes-like (synthetic)", "model": "none"},
    )
