"""Metrics in predict: 2 DDP processes give the values of 1 process, every sample counted once."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest

from datamodules.shapes import ShapesDataModule
from dexar.module import ExplainerModule
from metrics import EnergyPointingGame, FillerSNR, PerturbationAUC, SoftIoU

NUM_SAMPLES = 7  # odd: the ranks get different numbers of samples


def _results(checkpoint, run_dir, devices=1, strategy="auto") -> dict:
    metrics = {
        "epg": EnergyPointingGame(),
        "soft_iou": SoftIoU(),
        "filler_snr": FillerSNR(),
        "pos_auc": PerturbationAUC(levels=[0.0, 0.5, 1.0]),
    }
    module = ExplainerModule(
        model=checkpoint,
        methods={"dexar": {}, "attention": {}},
        answer_source="ground_truth",
        metrics=metrics,
        localization_target="tokens",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(run_dir),
    )
    data = ShapesDataModule(num_samples=NUM_SAMPLES, batch_size=2)
    trainer.predict(module, datamodule=data, return_predictions=False)
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
def test_ddp_metrics_equal_one_process(tiny_checkpoint, tmp_path):
    one = _results(tiny_checkpoint, tmp_path / "one")
    two = _results(tiny_checkpoint, tmp_path / "two", devices=2, strategy="ddp_spawn")
    assert one["results"].keys() == two["results"].keys() == {"dexar", "attention"}
    for label, group in one["results"].items():
        assert group.keys() == two["results"][label].keys()
        for name, stats in group.items():
            other = two["results"][label][name]
            assert stats["count"] == other["count"], (label, name)  # every sample (or token) counted once
            assert stats["count"] + stats["skipped"] > 0
            assert math.isfinite(stats["value"]), (label, name)
            assert abs(stats["value"] - other["value"]) <= 1e-6, (label, name, stats, other)
    assert one["results"]["dexar"]["pos_auc"]["count"] == NUM_SAMPLES
