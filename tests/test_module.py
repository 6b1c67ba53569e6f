"""Lightning predict pipeline: shards, overlays, bad samples, and DDP (2 CPU processes) = 1 process."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks import HeatmapWriter, Timing, read_shards
from datamodules.shapes import ShapesDataModule, ShapesDataset
from dexar.module import ExplainerModule
from dexar.schema import collate_samples


def _predict(checkpoint, out_dir, devices=1, strategy="auto", num_samples=10, answer_source="ground_truth"):
    module = ExplainerModule(model=checkpoint, methods={"dexar": {}, "attention": {}}, answer_source=answer_source)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(out_dir),  # results.json lands in the run directory, not the cwd
        callbacks=[HeatmapWriter(str(out_dir), num_overlays=3)],
    )
    trainer.predict(
        module, datamodule=ShapesDataModule(num_samples=num_samples, batch_size=3), return_predictions=False
    )
    return read_shards(out_dir)


def test_predict_writes_shards_and_overlays(tiny_checkpoint, tmp_path):
    shards = _predict(tiny_checkpoint, tmp_path)
    assert set(shards) == {"dexar", "attention"}
    assert sorted(shards["dexar"]) == sorted(f"shapes-test-{i}" for i in range(10))
    rec = shards["dexar"]["shapes-test-0"]
    assert rec["token_maps"].shape[0] == len(rec["tokens"]) and rec["sequence_map"].shape == (8, 8)
    overlays = sorted(p.name for p in (tmp_path / "overlays" / "dexar").iterdir())
    assert overlays == ["shapes-test-0", "shapes-test-1", "shapes-test-2"]
    assert (tmp_path / "overlays" / "dexar" / "shapes-test-0" / "tokens.png").is_file()


def test_timing_reports_each_phase_per_image(tiny_checkpoint, tmp_path):
    timing = Timing(str(tmp_path))
    module = ExplainerModule(model=tiny_checkpoint, methods={"dexar": {}, "attention": {}}, answer_source="generate")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        callbacks=[timing],
        default_root_dir=str(tmp_path),
    )
    trainer.predict(module, datamodule=ShapesDataModule(num_samples=4, batch_size=2), return_predictions=False)
    assert {"generation", "trace", "method/dexar", "method/attention"} <= set(timing.per_image)
    assert all(v > 0 for v in timing.per_image.values())
    assert (tmp_path / "timing.json").is_file()


def test_bad_sample_is_counted_not_fatal(tiny_checkpoint, tmp_path):
    class WithBroken(ShapesDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            if index == 4:
                sample.image = "not an image"
            return sample

    module = ExplainerModule(model=tiny_checkpoint, answer_source="ground_truth")
    writer = HeatmapWriter(str(tmp_path), num_overlays=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        callbacks=[writer],
        default_root_dir=str(tmp_path),
    )
    loader = DataLoader(WithBroken(7), batch_size=3, collate_fn=collate_samples)
    trainer.predict(module, loader, return_predictions=False)
    assert [sid for sid, _ in module.failed] == ["shapes-test-4"]
    assert "expected a PIL image" in module.failed[0][1]
    assert len(read_shards(tmp_path)["dexar"]) == 6


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tiny_checkpoint, tmp_path):
    one = _predict(tiny_checkpoint, tmp_path / "one", num_samples=9)
    two = _predict(tiny_checkpoint, tmp_path / "two", devices=2, strategy="ddp_spawn", num_samples=9)
    assert len(list((tmp_path / "two" / "shards").iterdir())) == 2, "each rank writes its own shards"
    for label in one:
        assert sorted(one[label]) == sorted(two[label])  # every sample exactly once (read_shards rejects repeats)
        for sid, rec in one[label].items():
            other = two[label][sid]
            assert rec["tokens"] == other["tokens"]
            assert torch.allclose(rec["token_maps"], other["token_maps"], atol=1e-6)
            assert torch.allclose(rec["sequence_map"], other["sequence_map"], atol=1e-6)
