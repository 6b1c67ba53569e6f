"""PascalVOC and PascalVOC-QA: palette masks, 255 boundaries, union mask, QA answers, errors, subsets."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from datamodules.common import DatasetLayoutError
from datamodules.fixtures import drain, make_voc, voc_palette
from datamodules.voc import VOC_CLASSES, PascalVOCDataModule, PascalVOCQADataModule, qa_answer


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"))


def _base(fx):
    return fx.root / "VOCdevkit" / "VOC2012"


def test_fixture_masks_are_voc_palette_pngs_with_255_boundaries(voc):
    png = Image.open(_base(voc) / "SegmentationClass" / f"{voc.keys[0]}.png")
    assert png.mode == "P" and png.getpalette()[: 3 * 256] == voc_palette()
    values = set(np.unique(np.asarray(png)).tolist())
    assert values == {0, 255} | {VOC_CLASSES.index(c) + 1 for c in ("bus", "car", "person")}


def test_samples_have_per_class_masks_union_and_ignore(voc):
    dm = PascalVOCDataModule(str(voc.root), num_workers=0)
    samples = drain(dm)
    assert [s.id for s in samples] == [f"voc-val-{k}" for k in voc.keys if k not in voc.broken]
    assert [i for i, _ in dm.skipped] == [f"voc-val-{k}" for k in voc.broken]
    for s in samples:
        name = s.meta["image_name"]
        labels = np.asarray(Image.open(_base(voc) / "SegmentationClass" / f"{name}.png"))
        present = sorted({VOC_CLASSES.index(c) + 1 for c in voc.labels[name]})
        assert s.prompt == "Classify the image." and s.answer is None and s.image.mode == "RGB"
        assert s.masks.dtype == bool and s.masks.shape == (len(present), *labels.shape)
        assert s.image.size == labels.shape[::-1]
        assert s.mask_labels == [
            VOC_CLASSES[v - 1]
            .replace("pottedplant", "potted plant")
            .replace("diningtable", "dining table")
            .replace("tvmonitor", "tv monitor")
            for v in present
        ]
        for k, v in enumerate(present):
            assert np.array_equal(s.masks[k], labels == v)
        assert np.array_equal(s.ignore_mask, labels == 255) and s.ignore_mask.any()
        assert np.array_equal(s.union_mask, (labels > 0) & (labels != 255))
        assert not (s.union_mask & s.ignore_mask).any(), "boundary is neither object ..."
        background = ~s.union_mask & ~s.ignore_mask
        assert np.array_equal(background, labels == 0), "... nor background"
        assert [o["name"] for o in s.meta["objects"]] == list(voc.labels[name])
        assert s.meta["num_instances"] == len(voc.labels[name])
        assert s.meta["classes"] == [VOC_CLASSES[v - 1] for v in present]
    assert {voc.kinds[s.meta["image_name"]] for s in samples} == {"rgb", "gray", "cmyk"}


def test_qa_answers_and_word_labels(voc):
    samples = {s.meta["image_name"]: s for s in drain(PascalVOCQADataModule(str(voc.root), num_workers=0))}
    first = samples[voc.keys[0]]
    assert first.prompt == "What do you see in the image?"
    assert first.answer == "I see a bus as well as a car as well as a person"
    words = first.answer.split()
    assert [w for w, c in zip(words, first.word_is_content, strict=True) if c] == ["bus", "car", "person"]
    assert [first.mask_labels[k] for k in first.word_mask_index if k >= 0] == ["bus", "car", "person"]
    plants = samples[voc.keys[1]]
    assert plants.answer == "I see a dining table as well as a potted plant"
    assert plants.word_is_content == [False] * 3 + [True, True] + [False] * 4 + [True, True]
    assert plants.word_mask_index == [-1] * 3 + [0, 0] + [-1] * 4 + [1, 1]
    assert samples[voc.keys[2]].answer == "I see a person" and samples[voc.keys[2]].meta["num_instances"] == 2
    assert samples[voc.keys[3]].answer == "I see an aeroplane"
    for s in samples.values():
        assert len(s.answer.split()) == len(s.word_is_content) == len(s.word_mask_index)
        assert s.masks is not None and s.ignore_mask is not None


def test_qa_answer_phrases_are_configurable():
    text, content, index = qa_answer(["cat", "dog"], start="There is", connector="and")
    assert text == "There is a cat and a dog"
    assert content == [False, False, False, True, False, False, True] and index == [-1, -1, -1, 0, -1, -1, 1]


@pytest.mark.parametrize("sub", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_root_may_be_parent_devkit_or_year_folder(voc, sub):
    dm = PascalVOCDataModule(str(voc.root / sub) if sub else str(voc.root), num_workers=0)
    dm.setup()
    assert len(dm.dataset) == len(voc.keys)


def test_layout_errors(voc, tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        PascalVOCDataModule(str(tmp_path / "nowhere")).setup()
    assert str(tmp_path / "nowhere") in str(err.value) and "SegmentationClass" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="ImageSets/Segmentation not found"):
        PascalVOCDataModule(str(tmp_path / "empty")).setup()
    with pytest.raises(DatasetLayoutError, match="test.txt not found"):
        PascalVOCDataModule(str(voc.root), split="test").setup()
    copy = tmp_path / "copy"
    shutil.copytree(voc.root, copy)
    shutil.rmtree(copy / "VOCdevkit" / "VOC2012" / "SegmentationClass")
    with pytest.raises(DatasetLayoutError, match="SegmentationClass not found"):
        PascalVOCQADataModule(str(copy)).setup()


def test_rgb_mask_or_size_mismatch_is_skipped(voc, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(voc.root, copy)
    seg = copy / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    Image.open(seg / f"{voc.keys[0]}.png").convert("RGB").save(seg / f"{voc.keys[0]}.png")
    Image.new("P", (5, 5)).save(seg / f"{voc.keys[1]}.png")
    dm = PascalVOCDataModule(str(copy), num_workers=0)
    samples = drain(dm)
    reasons = dict(dm.skipped)
    assert "expected a palette PNG" in reasons[f"voc-val-{voc.keys[0]}"]
    assert "sizes differ" in reasons[f"voc-val-{voc.keys[1]}"]
    assert len(samples) == len(voc.keys) - 2 - len(voc.broken)


def test_subset_seeded(voc):
    def ids(seed):
        dm = PascalVOCQADataModule(str(voc.root), num_samples=3, seed=seed, num_workers=0)
        dm.setup()
        return dm.dataset.ids

    assert ids(1) == ids(1) and len(ids(1)) == 3
    assert {ids(s)[0] for s in range(6)} != {ids(1)[0]}
