"""Synthetic Shapes: procedural images of 1–3 coloured shapes with exact masks and captions.

A sample is a pure function of ``(seed, split, index)``, so a given index is always the same sample,
on any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from dexar.schema import Sample, collate_samples
from dexar.shapes.model import COLORS, IMAGE_SIZE, SHAPES

SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
CAPTION_PROMPT = "describe the image."
TASKS = ("caption", "question", "mixed")


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of one shape centred at ``(cx, cy)`` with radius ``r``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        half = 0.85 * r
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    # Upward triangle inscribed in the circle of radius r.
    top = (cx, cy - r)
    left = (cx - r * np.sqrt(3) / 2, cy + r / 2)
    right = (cx + r * np.sqrt(3) / 2, cy + r / 2)

    def side(a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
        return (b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0])

    s1, s2, s3 = side(top, right), side(right, left), side(left, top)
    return ((s1 >= 0) & (s2 >= 0) & (s3 >= 0)) | ((s1 <= 0) & (s2 <= 0) & (s3 <= 0))


def _place_objects(rng: np.random.Generator, count: int, size: int) -> list[tuple[float, float, float]]:
    """Non-overlapping ``(cx, cy, r)`` sorted left to right with distinct x (rejection sampling)."""
    for _ in range(200):
        objs: list[tuple[float, float, float]] = []
        for _ in range(count):
            for _ in range(50):
                r = float(rng.uniform(9.0, 14.0))
                cx = float(rng.uniform(r + 1, size - r - 1))
                cy = float(rng.uniform(r + 1, size - r - 1))
                ok = all(np.hypot(cx - ox, cy - oy) > r + orad + 2 and abs(cx - ox) > 4 for ox, oy, orad in objs)
                if ok:
                    objs.append((cx, cy, r))
                    break
        if len(objs) == count:
            return sorted(objs)
    return _place_objects(rng, count - 1, size)


def make_shapes_sample(index: int, split: str = "test", seed: int = 0, task: str = "caption") -> Sample:
    """Render Shapes sample ``index`` of ``split`` deterministically.

    Args:
        index: Sample index (any non-negative integer).
        split: ``train``, ``val`` or ``test``; each draws from its own random stream.
        seed: Base seed shared by all splits.
        task: ``caption`` (describe the image), ``question`` (colour/shape questions) or ``mixed``
            (90% captions, 10% questions).

    Returns:
        The sample, with per-object masks, content-word labels and the word → mask mapping.

    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"Shapes split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    if task not in TASKS:
        raise ValueError(f"Shapes task must be one of {TASKS}, got {task!r}")
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split], index])
    size = IMAGE_SIZE
    count = int(rng.integers(1, 4))
    placements = _place_objects(rng, count, size)
    colors = [str(rng.choice(list(COLORS))) for _ in placements]
    shapes = [str(rng.choice(SHAPES)) for _ in placements]

    background = rng.normal(128.0, 18.0, size=(size, size, 1)) + rng.normal(0.0, 6.0, size=(1, 1, 3))
    pixels = background.copy()
    masks = np.zeros((len(placements), size, size), dtype=bool)
    for k, ((cx, cy, r), color, shape) in enumerate(zip(placements, colors, shapes, strict=True)):
        mask = _shape_mask(shape, cx, cy, r, size)
        masks[k] = mask
        rgb = np.array(COLORS[color], dtype=np.float64) + rng.uniform(-20, 20, size=3)
        pixels[mask] = rgb + rng.normal(0.0, 6.0, size=(int(mask.sum()), 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    labels = [f"{c} {s}" for c, s in zip(colors, shapes, strict=True)]

    use_question = task == "question" or (task == "mixed" and rng.random() < 0.1)
    if use_question:
        prompt, answer, target = _question(rng, colors, shapes)
        words = answer.split()
        is_content = [True] * len(words)
        word_mask = [target] * len(words)
    else:
        prompt = CAPTION_PROMPT
        words, is_content, word_mask = ["i", "see"], [False, False], [-1, -1]
        for k, (c, s) in enumerate(zip(colors, shapes, strict=True)):
            if k:
                words.append("and")
                is_content.append(False)
                word_mask.append(-1)
            words += ["a", c, s]
            is_content += [False, True, True]
            word_mask += [-1, k, k]
        answer = " ".join(words)
    return Sample(
        id=f"shapes-{split}-{index}",
        image=image,
        prompt=prompt,
        answer=answer,
        masks=masks,
        mask_labels=labels,
        word_is_content=is_content,
        word_mask_index=word_mask,
        meta={
            "split": split,
            "index": index,
            "num_objects": len(placements),
            "task": "question" if use_question else "caption",
        },
    )


def _question(rng: np.random.Generator, colors: list[str], shapes: list[str]) -> tuple[str, str, int]:
    """A colour or shape question about an object that is unique by the asked attribute."""
    unique_shapes = [k for k, s in enumerate(shapes) if shapes.count(s) == 1]
    unique_colors = [k for k, c in enumerate(colors) if colors.count(c) == 1]
    if unique_shapes and (not unique_colors or rng.random() < 0.5):
        k = int(rng.choice(unique_shapes))
        return f"what color is the {shapes[k]}?", colors[k], k
    k = int(rng.choice(unique_colors)) if unique_colors else 0
    return f"what shape is the {colors[k]} object?", shapes[k], k


class ShapesDataset(Dataset[Sample]):
    """A fixed-length, indexable Shapes split."""

    def __init__(self, size: int, split: str = "test", seed: int = 0, task: str = "caption") -> None:
        self.size, self.split, self.seed, self.task = size, split, seed, task
        make_shapes_sample(0, split, seed, task)  # validates split/task early

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        return make_shapes_sample(index, self.split, self.seed, self.task)


class ShapesStream(IterableDataset[Sample]):
    """An endless stream of training samples; sample ``i`` of the stream is always the same.

    Workers interleave indices so that the stream's order does not depend on ``num_workers``
    beyond the order in which workers' batches arrive (Lightning fixes it for a given setting).
    """

    def __init__(self, split: str = "train", seed: int = 0, task: str = "mixed", start: int = 0) -> None:
        self.split, self.seed, self.task, self.start = split, seed, task, start

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + worker
        while True:
            yield make_shapes_sample(index, self.split, self.seed, self.task)
            index += workers


class ShapesDataModule(L.LightningDataModule):
    """Shapes for training (endless stream) and for explanation (fixed held-out split).

    Args:
        num_samples: Size of the predict split.
        split: Split explained by ``predict`` (``test`` is held out from training).
        task: ``caption``, ``question`` or ``mixed`` for predict.
        train_task: Task mix of the training stream.
        val_samples: Size of the validation split used during ``fit``.
        batch_size: Batch size of every loader.
        num_workers: DataLoader workers.
        seed: Base seed of all splits.

    """

    def __init__(
        self,
        num_samples: int = 64,
        split: str = "test",
        task: str = "caption",
        train_task: str = "mixed",
        val_samples: int = 200,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            ShapesStream("train", hp.seed, hp.train_task),
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            collate_fn=collate_samples,
            persistent_workers=hp.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            ShapesDataset(hp.val_samples, "val", hp.seed, "caption"),
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            collate_fn=collate_samples,
        )

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            ShapesDataset(hp.num_samples, hp.split, hp.seed, hp.task),
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            collate_fn=collate_samples,
        )


def shapes_area_fraction(samples: list[Sample]) -> float:
    """Mean fraction of the image covered by the object a content word names (EPG chance level)."""
    fracs = [float(m.mean()) for s in samples if s.masks is not None for m in s.masks]
    return float(torch.tensor(fracs).mean()) if fracs else 0.0
