"""ImageNet-C: released layout and on-the-fly corruption (corrupt-tta), meta, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.common import DatasetLayoutError
from datamodules.fixtures import drain, make_imagenet, make_imagenet_c, make_imagenet_hf
from datamodules.imagenet_c import PAPER_CORRUPTIONS, ImageNetCDataModule, corrupt_image, resize_center_crop


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return make_imagenet_c(tmp_path_factory.mktemp("imagenet-c"), corruptions=("fog", "pixelate"), severities=(3, 5))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("imagenet"), "flat", per_class=2, size=(50, 36), broken=(3,))


def _dm(root, **kw):
    kw.setdefault("num_workers", 0)
    return ImageNetCDataModule(str(root), **kw)


def test_released_layout_pairs_images_across_corruptions(released):
    dm = _dm(released.root, corruptions=["fog", "pixelate"], severities=[3, 5], num_samples=None)
    samples = drain(dm)
    pairs = {(c, s) for c in ("fog", "pixelate") for s in (3, 5)}
    assert {(x.meta["corruption"], x.meta["severity"]) for x in samples} == pairs
    good = [k for k in released.keys if k not in released.broken]
    for c, s in pairs:
        assert [x.meta["file"] for x in samples if (x.meta["corruption"], x.meta["severity"]) == (c, s)] == good
    assert len(dm.skipped) == len(pairs) * len(released.broken)
    x = samples[0]
    assert x.id == f"imagenetc-fog-3-{good[0]}" and x.meta["mode"] == "released" and x.image.mode == "RGB"
    assert x.answer == "I see a tench" and x.word_is_content == [False, False, False, True]
    assert x.meta["wnid"] == released.labels[x.meta["file"]]


def test_released_subset_is_seeded_and_shared(released):
    dm = _dm(released.root, corruptions=["fog", "pixelate"], severities=[5], num_samples=3, seed=2)
    dm.setup()
    files = [r[2] for r in dm.dataset.records]
    assert files[:3] == files[3:] and len(files) == 6
    again = _dm(released.root, corruptions=["fog", "pixelate"], severities=[5], num_samples=3, seed=2)
    again.setup()
    assert again.dataset.ids == dm.dataset.ids


def test_generate_all_paper_corruptions_at_severity_5(imagenet):
    dm = _dm(imagenet.root, num_samples=2, seed=0)
    assert dm.hparams.mode == "auto"
    samples = drain(dm)
    assert {s.meta["corruption"] for s in samples} == set(PAPER_CORRUPTIONS)
    assert all(s.meta["severity"] == 5 and s.meta["mode"] == "generated" for s in samples)
    for s in samples:
        pixels = np.asarray(s.image)
        assert s.image.mode == "RGB" and s.image.size == (224, 224) and pixels.dtype == np.uint8
    files = {s.meta["file"] for s in samples}
    clean = {s.meta["file"] for s in drain(_dm(imagenet.root, num_samples=2, corruptions=["fog"]))}
    assert files == clean


def test_generated_corruption_is_deterministic_and_seeded(imagenet):
    def pixels(seed, **kw):
        dm = _dm(imagenet.root, num_samples=None, seed=seed, corruptions=["gaussian_noise"], **kw)
        dm.setup()
        return np.asarray(dm.dataset[0].image)

    assert np.array_equal(pixels(0), pixels(0))
    assert pixels(0, resize_crop=False).shape == (36, 50, 3), "non-square, original size"
    dm = _dm(imagenet.root, num_samples=None, seed=0, corruptions=["gaussian_noise"], num_workers=2)
    assert np.array_equal(np.asarray(drain(dm)[0].image), pixels(0)), "same pixels in a worker process"
    assert not np.array_equal(pixels(0), pixels(1)), "the seed drives the noise"
    a = np.random.get_state()[1].copy()
    pixels(1)
    assert np.array_equal(a, np.random.get_state()[1]), "global NumPy random state is restored"


def test_corrupt_image_matches_library_and_handles_non_square():
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 52, 3), dtype=np.uint8))
    for name in PAPER_CORRUPTIONS:
        out = corrupt_image(image, name, 5, seed=7)
        assert out.size == (52, 30) and out.mode == "RGB"
        assert np.array_equal(np.asarray(out), np.asarray(corrupt_image(image, name, 5, seed=7)))
    assert resize_center_crop(image).size == (224, 224)


def test_generate_from_hugging_face_parquet(tmp_path):
    fx = make_imagenet_hf(tmp_path / "hf", "parquet", n=4)
    dm = _dm(fx.root, num_samples=None, corruptions=["brightness"], cache_dir=str(tmp_path / "cache"))
    samples = drain(dm)
    assert len(samples) + len(dm.skipped) == 4 and all(s.meta["corruption"] == "brightness" for s in samples)


def test_errors(released, imagenet, tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        _dm(tmp_path / "nowhere").setup()
    assert "<corruption>/<severity>/<wnid>" in str(err.value) and str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(DatasetLayoutError, match="brightness/5 not found"):
        _dm(released.root, corruptions=["fog", "brightness"]).setup()
    with pytest.raises(DatasetLayoutError, match="fog/1 not found"):
        _dm(released.root, corruptions=["fog"], severities=[1]).setup()
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetLayoutError, match="neither released ImageNet-C nor ImageNet"):
        _dm(tmp_path / "other").setup()
    with pytest.raises(ValueError, match="unknown ImageNet-C corruption"):
        _dm(imagenet.root, corruptions=["sparkles"]).setup()
    with pytest.raises(ValueError, match="severities are 1–5"):
        _dm(imagenet.root, severities=[6]).setup()
    with pytest.raises(ValueError, match="mode"):
        _dm(imagenet.root, mode="download")


def test_released_layout_ignores_hidden_folders_and_names_stray_ones(released, tmp_path):
    import shutil

    root = tmp_path / "released"
    shutil.copytree(released.root, root)
    (root / "fog" / "5" / ".ipynb_checkpoints").mkdir()
    dm = _dm(root, corruptions=["fog"], severities=[5], num_samples=None)
    dm.setup()
    assert len(dm.dataset) == len(released.keys)
    (root / "fog" / "5" / "misc").mkdir()
    with pytest.raises(DatasetLayoutError, match="not a wnid folder: misc"):
        _dm(root, corruptions=["fog"], severities=[5]).setup()
