"""Metrics in predict do not depend on the number of processes or on how samples are batched.

A batch of several samples pads its prompts, which moves each map by float noise (~1e-7); on the
bundled Shapes model that used to reorder the upsampled map's near-ties (sample 5 of the test split
with DEX-AR in a batch of 4 changed its perturbation AUCs by ~1e-2). The reference run explains one
sample per batch on one process; the others use small batches of unequal prompt lengths, on one and
on two processes (``ddp_spawn``, gloo), where the ranks get different numbers of samples. Every
metric must agree to 1e-6 and count every sample (or token) once.
``benchmarks/batch_independence.py`` runs the full matrix (1–3 processes × batch sizes 1, 4, 16).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest

from callbacks import ResultsWriter
from datamodules.shapes import ShapesDataModule
from dexar import SHAPES_CHECKPOINT
from dexar.pipeline.module import ExplainerModule
from metrics import (
    DeletionAUC,
    EnergyPointingGame,
    FillerSNR,
    InsertionAUC,
    NegativePerturbationAUC,
    PerturbationAUC,
    SoftIoU,
)

NUM_SAMPLES = 7  # odd: the ranks get different numbers of samples
LEVELS = [0.0, 0.2, 0.5, 0.8, 1.0]  # both end images, for deletion and insertion


def _results(run_dir, batch_size, devices=1, strategy="auto") -> dict:
    metrics = {
        "epg": EnergyPointingGame(),
        "soft_iou": SoftIoU(),
        "filler_snr": FillerSNR(),
        "pos_auc": PerturbationAUC(levels=LEVELS),
        "neg_auc": NegativePerturbationAUC(levels=LEVELS),
        "deletion": DeletionAUC(levels=LEVELS),
        "insertion": InsertionAUC(levels=LEVELS),
    }
    module = ExplainerModule(
        model=SHAPES_CHECKPOINT,
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
        callbacks=[ResultsWriter()],
    )
    data = ShapesDataModule(num_samples=NUM_SAMPLES, batch_size=batch_size)
    trainer.predict(module, datamodule=data, return_predictions=False)
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not (Path(SHAPES_CHECKPOINT) / "model.safetensors").exists(), reason="no bundled checkpoint")
def test_metrics_equal_across_processes_and_batch_sizes(tmp_path):
    reference = _results(tmp_path / "one-b1", batch_size=1)
    others = {
        "one process, batches of 4": _results(tmp_path / "one-b4", batch_size=4),
        "two processes, batches of 3": _results(tmp_path / "two-b3", batch_size=3, devices=2, strategy="ddp_spawn"),
    }
    assert reference["results"].keys() == {"dexar", "attention"}
    for run, other in others.items():
        assert other["results"].keys() == reference["results"].keys(), run
        for label, group in reference["results"].items():
            assert group.keys() == other["results"][label].keys()
            for name, stats in group.items():
                theirs = other["results"][label][name]
                assert stats["count"] == theirs["count"], (run, label, name)  # every sample (or token) once
                assert stats["skipped"] == theirs["skipped"], (run, label, name)
                assert stats["count"] > 0 and math.isfinite(stats["value"]), (run, label, name)
                assert abs(stats["value"] - theirs["value"]) <= 1e-6, (run, label, name, stats, theirs)
    assert reference["results"]["dexar"]["pos_auc"]["count"] == NUM_SAMPLES
