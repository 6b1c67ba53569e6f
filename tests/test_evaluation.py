"""Evaluation in predict: metrics fed from explanations, results files, and what W&B receives."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger

import metrics as M
from callbacks import HeatmapWriter, Timing, WandbMedia
from callbacks.wandb_records import read_run
from datamodules.shapes import ShapesDataModule, make_shapes_sample
from dexar import Explainer, load_model
from dexar.evaluation import EvaluationSettings, Evaluator
from dexar.module import ExplainerModule
from metrics.functional import energy_pointing_game


def test_evaluator_feeds_token_maps_against_named_objects(tiny_checkpoint):
    model, processor = load_model(tiny_checkpoint)
    explainer = Explainer(model, processor)
    samples = [make_shapes_sample(i) for i in (0, 2, 6)]  # square images: the maps cover the whole image
    exps = explainer.explain_samples(samples)["dexar"]
    epg = M.EnergyPointingGame()
    evaluator = Evaluator(explainer.adapter, {"dexar": {"epg": epg}}, EvaluationSettings("tokens"))
    evaluator.update(samples, {"dexar": exps})
    expected = []
    for sample, exp in zip(samples, exps, strict=True):
        for t, k in enumerate(sample.word_mask_index):  # word-level tokenizer: token t is word t
            if k >= 0:
                up = F.interpolate(exp.token_maps[t][None, None].double(), size=(64, 64), mode="bilinear")[0, 0]
                expected.append(energy_pointing_game(up[None], torch.from_numpy(sample.masks[k])[None]))
    expected = torch.cat(expected)
    assert torch.allclose(epg.per_sample(), expected, atol=1e-12)
    assert evaluator.rows["dexar"]["epg"][0] == "shapes-test-0#3"


def test_metric_without_input_kind_is_rejected(tiny_checkpoint):
    from torchmetrics import MeanMetric

    with pytest.raises(ValueError, match="input_kind"):
        Evaluator(None, {"dexar": {"mean": MeanMetric()}})


def test_predict_evaluates_writes_results_and_logs_to_wandb(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    metrics = {
        "epg": M.EnergyPointingGame(),
        "soft_iou": M.SoftIoU(),
        "filler_snr": M.FillerSNR(),
        "pos_auc": M.PerturbationAUC(levels=[0.0, 0.3, 0.6]),
    }
    module = ExplainerModule(
        model=tiny_checkpoint, methods={"dexar": {}, "attention": {}}, answer_source="ground_truth", metrics=metrics
    )
    logger = WandbLogger(project="dexar-test", save_dir=str(tmp_path), offline=True, group="g", tags=["t"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        logger=logger,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
        callbacks=[HeatmapWriter(num_overlays=2), Timing(), WandbMedia()],
    )
    trainer.predict(module, datamodule=ShapesDataModule(num_samples=4, batch_size=2), return_predictions=False)
    logger.experiment.finish()
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert results["dexar"]["epg"]["count"] == 4 and results["dexar"]["pos_auc"]["count"] == 4
    csv_rows = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 2 * len(metrics)
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    logged = read_run(run_dir)
    flat = {k: v for row in logged["history"] for k, v in row.items()}
    for label in ("dexar", "attention"):
        for name in metrics:
            assert flat[f"{label}/{name}"] == pytest.approx(results[label][name]["value"], abs=1e-12)
    assert "time_per_image/trace" in flat
    tables = {p.name.split("_")[0] for p in (run_dir / "files" / "media" / "table").rglob("*.table.json")}
    assert "per" in tables  # per_sample table
    per_sample = json.loads(next((run_dir / "files" / "media" / "table").glob("per_sample*.table.json")).read_text())
    assert len(per_sample["data"]) == 2 * 4  # one row per sample and method
    curve = next((run_dir / "files" / "media" / "table").rglob("*pos_auc*.table.json"))
    assert len(json.loads(curve.read_text())["data"]) == 3
    assert any((run_dir / "files" / "media" / "images").rglob("*.png"))
