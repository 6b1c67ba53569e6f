"""Shared datamodule machinery: RGB decoding, seeded subsets, templates, skip counting across workers."""

from __future__ import annotations

import io
import pickle

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from PIL import Image

from datamodules.common import (
    SampleBatch,
    Skipped,
    collate_skipping,
    load_rgb,
    render_template,
    seeded_subset,
)
from datamodules.fixtures import encode_image, image_pixels, make_imagenet
from datamodules.imagenet import ImageNetDataModule
from dexar.schema import Sample


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_load_rgb_converts_every_mode(tmp_path):
    pixels = image_pixels((20, 12), 0)
    rgb = Image.fromarray(pixels)
    palette = rgb.quantize(16)
    palette.info["transparency"] = 0
    sources = {
        "gray-jpeg": encode_image(pixels, "gray"),
        "cmyk-jpeg": encode_image(pixels, "cmyk"),
        "palette-png": _png(rgb.quantize(16)),
        "palette-transparent-png": _png(palette),
        "la-png": _png(rgb.convert("LA")),
        "rgba-png": _png(rgb.convert("RGBA")),
        "16bit-png": _png(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)),
        "1bit-png": _png(rgb.convert("1")),
    }
    for name, data in sources.items():
        image = load_rgb(data)
        assert image.mode == "RGB" and image.size == (20, 12), name
    path = tmp_path / "x.jpg"
    path.write_bytes(sources["cmyk-jpeg"])
    assert load_rgb(path).mode == "RGB"
    gray16 = np.asarray(load_rgb(sources["16bit-png"]))[..., 0]
    assert np.array_equal(gray16, np.asarray(rgb.convert("L"))), "16-bit values are scaled back to 8 bits"


def test_load_rgb_raises_on_truncated_and_garbage():
    with pytest.raises(OSError):
        load_rgb(encode_image(image_pixels((32, 24), 1), "broken"))
    with pytest.raises(OSError):
        load_rgb(b"not an image")


def test_seeded_subset_is_deterministic_sorted_and_nested():
    a, b = seeded_subset(1000, 50, 3), seeded_subset(1000, 50, 3)
    assert a == b == sorted(a) and len(set(a)) == 50
    assert set(seeded_subset(1000, 20, 3)) <= set(a)
    assert seeded_subset(1000, 50, 4) != a
    assert seeded_subset(10, None, 0) == seeded_subset(10, 99, 0) == list(range(10))
    with pytest.raises(ValueError, match="positive"):
        seeded_subset(10, 0, 0)


def test_render_template_labels_words():
    fields = {"name": "kit fox", "article": "a", "names": "kit fox, Vulpes macrotis"}
    text, content = render_template("I see {article} {name}.", fields, ["name"])
    assert text == "I see a kit fox." and content == [False, False, False, True, True]
    assert len(content) == len(text.split())
    assert render_template("{name}", fields, ["name"]) == ("kit fox", [True, True])
    with pytest.raises(KeyError, match="nope"):
        render_template("{nope}", fields, ["name"])


def test_collate_moves_skips_aside_and_pickles():
    s = Sample(id="a", image=Image.new("RGB", (2, 2)), prompt="p")
    batch = collate_skipping([s, Skipped("b", "OSError: x", 1), s])
    assert isinstance(batch, SampleBatch) and list(batch) == [s, s]
    assert [m.id for m in batch.skipped] == ["b"]
    again = pickle.loads(pickle.dumps(batch))  # what a DataLoader worker sends back
    assert [m.id for m in again.skipped] == ["b"] and len(again) == 2


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("imagenet"), "folders", per_class=4)


def test_skips_counted_in_main_process_with_workers(imagenet_root):
    dm = ImageNetDataModule(str(imagenet_root.root), num_samples=None, batch_size=3, num_workers=2)
    dm.setup()
    ids, skipped = [], []
    for batch in dm.predict_dataloader():
        ids += [s.id for s in batch]
        skipped += [m.id for m in batch.skipped]
        dm.on_before_batch_transfer(batch, 0)
    broken = {f"imagenet-val-{k}" for k in imagenet_root.broken}
    assert set(skipped) == broken and {i for i, _ in dm.skipped} == broken and dm.num_skipped == len(broken)
    assert ids == [i for i in dm.dataset.ids if i not in broken], "order kept, broken ones dropped"


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.batch_types: set[type] = set()

    def predict_step(self, batch, batch_idx):
        self.batch_types.add(type(batch))
        self.seen += [s.id for s in batch]
        return [s.id for s in batch]


def test_trainer_predict_counts_skips_through_datamodule_hook(imagenet_root):
    dm = ImageNetDataModule(str(imagenet_root.root), num_samples=None, batch_size=4, num_workers=2)
    module = _Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.predict(module, datamodule=dm, return_predictions=False)
    assert dm.num_skipped == len(imagenet_root.broken)
    assert module.batch_types == {SampleBatch}
    assert len(module.seen) == len(dm.dataset) - dm.num_skipped


def test_same_subset_on_two_simulated_ranks(imagenet_root):
    """Each rank builds its own datamodule (as DDP processes do); Lightning's predict sampler shards it."""
    single = ImageNetDataModule(str(imagenet_root.root), num_samples=7, seed=5, num_workers=0)
    single.setup()
    expected = single.dataset.ids
    per_rank = []
    for rank in range(2):
        dm = ImageNetDataModule(str(imagenet_root.root), num_samples=7, seed=5, num_workers=0, batch_size=2)
        dm.setup()
        assert dm.dataset.ids == expected
        loader = dm.predict_dataloader()
        sampler = UnrepeatedDistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=rank, shuffle=False)
        loader = _update_dataloader(loader, sampler, mode=RunningStage.PREDICTING)
        ids = []
        for batch in loader:
            ids += [s.id for s in batch] + [m.id for m in batch.skipped]
        per_rank.append(ids)
    assert sorted(per_rank[0] + per_rank[1]) == sorted(expected)
    assert not set(per_rank[0]) & set(per_rank[1])
