"""Synthetic Shapes: procedural images of coloured shapes with exact masks and captions.

A sample is a pure function of ``(seed, split, index)``, so a given index is always the same sample,
on any number of processes.

Half the images are square (64×64); the others are 4:3, 3:4, 16:9 or 9:16 with a short side of 64 or 96
pixels. The model's processor (``llava-hf``'s CLIP processing) resizes the short side to 64 and center
crops 64×64, so a non-square image has margins the model never sees. Every object is either wholly
inside that view (a *visible* object: in the caption, with a mask) or wholly outside it, at least a few
pixels away so resampling cannot carry it into the view (an *outside* object: possibly cut by the
image border, never in the caption or the masks, listed in ``meta["outside_view"]``). No object
straddles the view's edge, so every caption says exactly what the model saw. ``meta["view_box"]`` is
the view in image pixels.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from dexar.schema import Sample, collate_samples
from dexar.shapes.vocabulary import (
    CAPTION_PROMPT,
    COLOR_QUESTION,
    COLORS,
    IMAGE_SIZE,
    SHAPE_QUESTION,
    SHAPES,
    caption,
)

SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
TASKS = ("caption", "question", "mixed")
SQUARE_FRACTION = 0.5
"""Fraction of square images; the rest have one of :data:`ASPECTS`."""
ASPECTS = ((4, 3), (3, 4), (16, 9), (9, 16))
"""Width : height of the non-square images."""
SHORT_SIDES = (64, 96)
"""Short side in pixels of the non-square images (96: the processor scales the image down by 2/3)."""
RADIUS = (9.0, 14.0)
"""Range of object radii in the model's pixels (the 64×64 view)."""
OUTSIDE_RADIUS = (4.0, 14.0)
"""Range of outside objects' radii in the model's pixels (capped by the margin they sit in)."""
OUTSIDE_GAP = 3.0
"""Model pixels between an outside object and the view: more than bicubic resampling's reach (2)."""
MAX_OUTSIDE = 2
"""Most outside objects in a non-square image."""


def view_box(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[float, float, float, float]:
    """``(left, top, right, bottom)`` in image pixels of what the model sees of a ``width × height`` image.

    Mirrors ``CLIPImageProcessor`` with ``size={"shortest_edge": size}`` and a ``size × size`` center crop:
    the short side becomes ``size``, the long side ``int(size · long / short)``, and the crop starts
    ``(long' − size) // 2`` resized pixels from the edge.
    """
    short, long = min(width, height), max(width, height)
    resized = int(size * long / short)
    offset = (resized - size) // 2
    start, end = offset * long / resized, (offset + size) * long / resized
    if width >= height:
        return (start, 0.0, end, float(height))
    return (0.0, start, float(width), end)


def view_mask(mask: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """A ``(H, W)`` image-geometry mask as the model sees it: ``(size, size)`` boolean.

    The same geometry as :func:`view_box` (short side resized to ``size``, here bilinearly as a
    fraction of each pixel, then the ``size × size`` center crop), thresholded at one half. Square
    ``size × size`` masks come back unchanged.
    """
    height, width = mask.shape
    short, long = min(width, height), max(width, height)
    resized = int(size * long / short)
    new = (resized, size) if width >= height else (size, resized)
    fraction = Image.fromarray(mask.astype(np.float32), mode="F")
    if fraction.size != new:
        fraction = fraction.resize(new, Image.Resampling.BILINEAR)
    top, left = (new[1] - size) // 2, (new[0] - size) // 2
    return np.asarray(fraction)[top : top + size, left : left + size] > 0.5


def _shape_mask(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """Boolean ``(height, width)`` mask of one shape centred at ``(cx, cy)`` with radius ``r``."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
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


def _place_objects(
    rng: np.random.Generator, count: int, box: tuple[float, float, float, float], scale: float
) -> list[tuple[float, float, float]]:
    """Non-overlapping ``(cx, cy, r)`` wholly inside ``box``, sorted left to right with distinct x.

    ``scale`` is image pixels per model pixel; radii and gaps are drawn in model pixels. Rejection
    sampling; gives up one object at a time if ``count`` do not fit.
    """
    x0, y0, x1, y1 = box
    for _ in range(200):
        objs: list[tuple[float, float, float]] = []
        for _ in range(count):
            for _ in range(50):
                r = float(rng.uniform(*RADIUS)) * scale
                cx = float(rng.uniform(x0 + r + scale, x1 - r - scale))
                cy = float(rng.uniform(y0 + r + scale, y1 - r - scale))
                ok = all(
                    np.hypot(cx - ox, cy - oy) > r + orad + 2 * scale and abs(cx - ox) > 4 * scale
                    for ox, oy, orad in objs
                )
                if ok:
                    objs.append((cx, cy, r))
                    break
        if len(objs) == count:
            return sorted(objs)
    return _place_objects(rng, count - 1, box, scale)


def _place_outside(
    rng: np.random.Generator, count: int, size: tuple[int, int], box: tuple[float, float, float, float], scale: float
) -> list[tuple[float, float, float]]:
    """Up to ``count`` non-overlapping ``(cx, cy, r)`` centred in the margins, ≥ ``OUTSIDE_GAP`` from the view.

    The centre lies in the image; the shape may be cut by the image border.
    """
    width, height = size
    x0, y0, x1, y1 = box
    horizontal = width > height
    gap = OUTSIDE_GAP * scale
    objs: list[tuple[float, float, float]] = []
    for _ in range(count):
        for _ in range(50):
            first = rng.random() < 0.5  # left/top margin, else right/bottom
            margin = (x0 if first else width - x1) if horizontal else (y0 if first else height - y1)
            r_max = min(OUTSIDE_RADIUS[1] * scale, margin - gap)
            if r_max < OUTSIDE_RADIUS[0] * scale:
                break
            r = float(rng.uniform(OUTSIDE_RADIUS[0] * scale, r_max))
            across = float(rng.uniform(0.0, margin - gap - r))  # centre's distance from the outer edge
            along = float(rng.uniform(0.0, height if horizontal else width))
            if horizontal:
                cx, cy = (across if first else width - across), along
            else:
                cx, cy = along, (across if first else height - across)
            if all(np.hypot(cx - ox, cy - oy) > r + orad + 2 * scale for ox, oy, orad in objs):
                objs.append((cx, cy, r))
                break
    return objs


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """``(width, height)`` of the next image: square 64×64 or one of the non-square layouts."""
    if rng.random() < SQUARE_FRACTION:
        return IMAGE_SIZE, IMAGE_SIZE
    aw, ah = ASPECTS[int(rng.integers(len(ASPECTS)))]
    short = SHORT_SIDES[int(rng.integers(len(SHORT_SIDES)))]
    long = round(short * max(aw, ah) / min(aw, ah))
    return (long, short) if aw > ah else (short, long)


def make_shapes_sample(index: int, split: str = "test", seed: int = 0, task: str = "caption") -> Sample:
    """Render Shapes sample ``index`` of ``split`` deterministically.

    Args:
        index: Sample index (any non-negative integer).
        split: ``train``, ``val`` or ``test``; each draws from its own random stream.
        seed: Base seed shared by all splits.
        task: ``caption`` (describe the image), ``question`` (colour/shape questions) or ``mixed``
            (90% captions, 10% questions).

    Returns:
        The sample: masks (image geometry) and labels of the 1–3 visible objects, content-word labels,
        the word → mask mapping, and in ``meta`` the ``view_box`` and the ``outside_view`` objects.

    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"Shapes split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    if task not in TASKS:
        raise ValueError(f"Shapes task must be one of {TASKS}, got {task!r}")
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split], index])
    width, height = _image_size(rng)
    box = view_box(width, height)
    scale = min(width, height) / IMAGE_SIZE
    count = int(rng.integers(1, 4))
    placements = _place_objects(rng, count, box, scale)
    hidden = _place_outside(rng, int(rng.integers(0, MAX_OUTSIDE + 1)), (width, height), box, scale)
    if (width, height) == (IMAGE_SIZE, IMAGE_SIZE):
        hidden = []
    objects = placements + hidden
    colors = [str(rng.choice(list(COLORS))) for _ in objects]
    shapes = [str(rng.choice(SHAPES)) for _ in objects]

    background = rng.normal(128.0, 18.0, size=(height, width, 1)) + rng.normal(0.0, 6.0, size=(1, 1, 3))
    pixels = background.copy()
    masks = np.zeros((len(placements), height, width), dtype=bool)
    for k, ((cx, cy, r), color, shape) in enumerate(zip(objects, colors, shapes, strict=True)):
        mask = _shape_mask(shape, cx, cy, r, height, width)
        if k < len(placements):
            masks[k] = mask
        rgb = np.array(COLORS[color], dtype=np.float64) + rng.uniform(-20, 20, size=3)
        pixels[mask] = rgb + rng.normal(0.0, 6.0, size=(int(mask.sum()), 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    n = len(placements)
    labels = [f"{c} {s}" for c, s in zip(colors[:n], shapes[:n], strict=True)]
    outside = [f"{c} {s}" for c, s in zip(colors[n:], shapes[n:], strict=True)]

    use_question = task == "question" or (task == "mixed" and rng.random() < 0.1)
    if use_question:
        prompt, answer, target = _question(rng, colors[:n], shapes[:n])
        words = answer.split()
        is_content = [True] * len(words)
        word_mask = [target] * len(words)
    else:
        prompt = CAPTION_PROMPT
        answer = caption(list(zip(colors[:n], shapes[:n], strict=True)))
        words = answer.split()
        is_content = [w in COLORS or w in SHAPES for w in words]
        word_mask = [sum(v in SHAPES for v in words[:i]) if c else -1 for i, c in enumerate(is_content)]
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
            "num_objects": n,
            "task": "question" if use_question else "caption",
            "view_box": [round(v, 4) for v in box],
            "outside_view": outside,
            "outside_view_boxes": [[cx - r, cy - r, cx + r, cy + r] for cx, cy, r in hidden],
        },
    )


def _question(rng: np.random.Generator, colors: list[str], shapes: list[str]) -> tuple[str, str, int]:
    """A colour or shape question about an object that is unique by the asked attribute."""
    unique_shapes = [k for k, s in enumerate(shapes) if shapes.count(s) == 1]
    unique_colors = [k for k, c in enumerate(colors) if colors.count(c) == 1]
    if unique_shapes and (not unique_colors or rng.random() < 0.5):
        k = int(rng.choice(unique_shapes))
        return COLOR_QUESTION.format(shape=shapes[k]), colors[k], k
    k = int(rng.choice(unique_colors)) if unique_colors else 0
    return SHAPE_QUESTION.format(color=colors[k]), shapes[k], k


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

    Processes (``rank`` of ``world_size``, DDP) and their loader workers interleave indices, so every
    sample is drawn by exactly one of them and the stream's order does not depend on ``num_workers``
    beyond the order in which workers' batches arrive (Lightning fixes it for a given setting).
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        task: str = "mixed",
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"ShapesStream rank must be in [0, world_size={world_size}), got {rank}")
        self.split, self.seed, self.task, self.start = split, seed, task, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + self.rank * workers + worker
        while True:
            yield make_shapes_sample(index, self.split, self.seed, self.task)
            index += workers * self.world_size


class ShapesDataModule(L.LightningDataModule):
    """Shapes for training (endless stream) and for explanation (fixed held-out split).

    Args:
        num_samples: Size of the predict split.
        split: Split explained by ``predict`` (``test`` is held out from training).
        task: ``caption``, ``question`` or ``mixed`` for predict.
        train_task: Task mix of the training stream.
        val_samples: Size of the validation split used during ``fit``.
        batch_size: Batch size of every loader (per process under DDP: the global batch is ``batch_size × devices``).
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
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(
            ShapesStream("train", hp.seed, hp.train_task, rank=rank, world_size=world),
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
    """Mean fraction of the model's view covered by the object a content word names (EPG chance level)."""
    fracs = [float(view_mask(m).mean()) for s in samples if s.masks is not None for m in s.masks]
    return float(torch.tensor(fracs).mean()) if fracs else 0.0
