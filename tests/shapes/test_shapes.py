"""The synthetic Shapes set: determinism, masks, labels, vocabulary, what the model's crop keeps."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from datamodules.shapes import ASPECTS, ShapesDataModule, ShapesStream, make_shapes_sample, view_box, view_mask
from dexar.shapes.tokenizer import build_shapes_processor
from dexar.shapes.vocabulary import COLORS, IMAGE_SIZE, SHAPES, WORDS


@pytest.fixture(scope="module")
def image_processor():
    return build_shapes_processor().image_processor


def test_same_index_same_sample_and_splits_differ():
    a, b = make_shapes_sample(7, "test"), make_shapes_sample(7, "test")
    assert a.answer == b.answer and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.masks, b.masks)
    other = make_shapes_sample(7, "train")
    assert not np.array_equal(np.asarray(a.image), np.asarray(other.image))


@pytest.mark.parametrize("index", range(40))
def test_caption_masks_and_labels_consistent(index):
    s = make_shapes_sample(index, "test")
    k = len(s.masks)
    assert 1 <= k <= 3 and s.masks.shape[1:] == s.image.size[::-1]
    assert not (s.masks.sum(0) > 1).any(), "objects overlap"
    words = s.answer.split()
    assert len(words) == len(s.word_is_content) == len(s.word_mask_index)
    named = [words[i] for i, c in enumerate(s.word_is_content) if c]
    assert named == [w for label in s.mask_labels for w in label.split()]
    centers = [np.nonzero(m)[1].mean() for m in s.masks]
    assert centers == sorted(centers), "objects are listed left to right"
    for w, m in zip(words, s.word_mask_index, strict=True):
        assert (m >= 0) == (w in COLORS or w in SHAPES)
    assert set(words) | set(s.prompt.replace("?", " ?").replace(".", " .").split()) <= set(WORDS)


def test_test_and_train_splits_mix_square_and_non_square_images():
    for split in ("test", "train"):
        sizes = [make_shapes_sample(i, split).image.size for i in range(80)]
        ratios = {round(w / h, 2) for w, h in sizes}
        assert (IMAGE_SIZE, IMAGE_SIZE) in sizes and {1.0, 1.33, 0.75} <= ratios, ratios
        assert {round(a / b, 2) for a, b in ASPECTS} | {1.0} >= ratios
        assert any(min(w, h) > IMAGE_SIZE for w, h in sizes), "some images are scaled down by the processor"


@pytest.mark.parametrize("size", [(64, 64), (85, 64), (64, 85), (114, 64), (96, 171), (128, 96), (97, 130)])
def test_view_box_is_the_processors_crop(image_processor, size):
    """Paint the box's complement black: the processor's pixels do not change (the box holds the view)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), mode="RGB")
    left, top, right, bottom = view_box(*size)
    assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]
    # the long side is resized to int(64 · long / short) pixels: the box is square to within one of them
    assert abs((right - left) - (bottom - top)) <= max(size) / int(IMAGE_SIZE * max(size) / min(size))
    outer = image.copy()
    draw = ImageDraw.Draw(outer)
    # beyond bicubic's reach (2 model pixels) the outside is never seen; within it, it is
    reach = 2.5 * min(size) / IMAGE_SIZE
    for box in ((0, 0, left - reach, size[1]), (right + reach, 0, size[0], size[1])):
        if box[2] > box[0]:
            draw.rectangle(box, fill=(0, 0, 0))
    for box in ((0, 0, size[0], top - reach), (0, bottom + reach, size[0], size[1])):
        if box[3] > box[1]:
            draw.rectangle(box, fill=(0, 0, 0))

    def pixels(img):
        return image_processor(img, return_tensors="np")["pixel_values"]

    assert np.array_equal(pixels(image), pixels(outer))
    # and the box is not too small: a one-pixel strip just inside each of its edges is seen
    strips = [
        (left, top, left + 1, bottom),
        (right - 1, top, right, bottom),
        (left, top, right, top + 1),
        (left, bottom - 1, right, bottom),
    ]
    for x0, y0, x1, y1 in strips:
        inner = image.copy()
        inner.paste((0, 0, 0), (int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1))))
        assert not np.array_equal(pixels(image), pixels(inner))


def test_objects_outside_the_view_are_never_seen_nor_named(image_processor):
    checked = 0
    for i in range(120):
        s = make_shapes_sample(i, "test")
        left, top, right, bottom = s.meta["view_box"]
        assert s.meta["num_objects"] == len(s.masks) == len(s.mask_labels)
        ys, xs = np.nonzero(s.masks.reshape(-1, *s.masks.shape[1:]).any(0))
        assert xs.min() >= left and xs.max() + 1 <= right and ys.min() >= top and ys.max() + 1 <= bottom
        outside = s.meta["outside_view"]
        assert len(outside) == len(s.meta["outside_view_boxes"])
        if s.image.size == (IMAGE_SIZE, IMAGE_SIZE):
            assert not outside and s.meta["view_box"] == [0, 0, IMAGE_SIZE, IMAGE_SIZE]
        if not outside:
            continue
        checked += 1
        named = [w for label in s.mask_labels for w in label.split()]
        assert [w for w in s.answer.split() if w in COLORS or w in SHAPES] == named
        erased = s.image.copy()
        draw = ImageDraw.Draw(erased)
        for x0, y0, x1, y1 in s.meta["outside_view_boxes"]:
            assert x1 <= left or x0 >= right or y1 <= top or y0 >= bottom, "outside objects lie outside the view"
            draw.rectangle((x0, y0, x1, y1), fill=(0, 0, 0))
        same = image_processor(s.image, return_tensors="np")["pixel_values"]
        assert np.array_equal(same, image_processor(erased, return_tensors="np")["pixel_values"])
        assert not np.array_equal(np.asarray(s.image), np.asarray(erased)), "the outside objects are in the image"
    assert checked >= 10


def test_view_mask_is_what_the_processor_keeps(image_processor):
    """A mask drawn as an image and run through the processor lands where ``view_mask`` puts it."""
    mean, std = np.array(image_processor.image_mean), np.array(image_processor.image_std)
    for i in range(16):
        s = make_shapes_sample(i, "test")
        union = s.union_mask
        drawn = Image.fromarray(np.repeat(union[..., None], 3, axis=2).astype(np.uint8) * 255, mode="RGB")
        pixels = image_processor(drawn, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0) * std + mean
        seen = pixels.mean(-1) > 0.5
        mine = view_mask(union)
        assert mine.shape == (IMAGE_SIZE, IMAGE_SIZE)
        if min(s.image.size) == IMAGE_SIZE:  # no resize: the view is an exact crop
            assert np.array_equal(mine, seen)
        else:  # bicubic (processor) vs bilinear (here) may disagree on boundary pixels only
            assert (mine != seen).mean() < 0.02 and mine.sum() == pytest.approx(seen.sum(), rel=0.1)


def test_questions_have_unique_answers():
    for i in range(60):
        s = make_shapes_sample(i, "test", task="question")
        target = s.word_mask_index[0]
        color, shape = s.mask_labels[target].split()
        assert s.answer in (color, shape)
        if s.prompt.startswith("what color"):
            assert [lab.split()[1] for lab in s.mask_labels].count(shape) == 1 and s.answer == color


def test_bad_split_or_task():
    with pytest.raises(ValueError, match="split"):
        make_shapes_sample(0, "holdout")
    with pytest.raises(ValueError, match="task"):
        make_shapes_sample(0, "test", task="count")


def test_datamodule_predict_loader():
    dm = ShapesDataModule(num_samples=10, batch_size=4)
    batches = list(dm.predict_dataloader())
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [s.id for b in batches for s in b] == [f"shapes-test-{i}" for i in range(10)]


@pytest.mark.parametrize("workers", [0, 2])
def test_training_stream_shards_across_processes_without_repeats(workers):
    """Under DDP each process draws its own samples: ranks × workers partition the stream's indices."""
    from itertools import islice

    from torch.utils.data import DataLoader

    def indices(rank: int, world: int) -> list[int]:
        stream = ShapesStream("train", task="caption", rank=rank, world_size=world)
        loader = DataLoader(stream, batch_size=None, num_workers=workers)
        return [s.meta["index"] for s in islice(loader, 12)]

    single = indices(0, 1)
    assert sorted(single) == list(range(12))
    first, second = indices(0, 2), indices(1, 2)
    assert not set(first) & set(second) and sorted(first + second) == list(range(24))
    with pytest.raises(ValueError, match="rank"):
        ShapesStream(rank=2, world_size=2)
