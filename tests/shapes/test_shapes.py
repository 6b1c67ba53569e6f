"""The synthetic Shapes set: determinism, masks, labels, vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.shapes import ShapesDataModule, make_shapes_sample
from dexar.shapes.model import COLORS, SHAPES, WORDS


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
    assert 1 <= k <= 3 and s.masks.shape[1:] == (64, 64) and s.image.size == (64, 64)
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
