"""Evaluation in predict: metrics fed from explanations, results files, and what W&B receives."""

from __future__ import annotations

import json
import math
import struct

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger

import metrics as M
from callbacks import HeatmapWriter, ResultsWriter, Timing, WandbMedia
from datamodules.shapes import ShapesDataModule, make_shapes_sample
from dexar import Explainer, load_model
from dexar.methods import DexAR
from dexar.pipeline.evaluation import EvaluationSettings, Evaluator
from dexar.pipeline.module import ExplainerModule
from dexar.pipeline.report.wandb_runs import read_run, wait_for_exit
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
        callbacks=[ResultsWriter(), HeatmapWriter(num_overlays=2), Timing(), WandbMedia()],
    )
    trainer.predict(module, datamodule=ShapesDataModule(num_samples=4, batch_size=2), return_predictions=False)
    logger.experiment.finish()
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert results["dexar"]["epg"]["count"] == 4 and results["dexar"]["pos_auc"]["count"] == 4
    csv_rows = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 2 * len(metrics)
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    wait_for_exit(run_dir)  # finish() may return before W&B's service has written the records
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


def _hand_filler_db(weights, masses, content, eps=2.220446049250313e-16):
    """10·log10 of the mean content share over the mean filler share, shares λ·mass relative to the peak."""
    shares = [float(w) * float(m) for w, m in zip(weights, masses, strict=True)]
    peak = max(shares)
    c = [s / peak for s, k in zip(shares, content, strict=True) if k]
    f = [s / peak for s, k in zip(shares, content, strict=True) if not k]
    return 10 * math.log10(max(sum(c) / len(c), eps) / max(sum(f) / len(f), eps))


@pytest.mark.parametrize("keep_eos", [False, True])
def test_filler_snr_is_fed_weight_times_map_mass_and_differs_between_head_filters(tiny_checkpoint, keep_eos):
    model, processor = load_model(tiny_checkpoint)
    settings = [(h, f) for h in ("max", "avg", "top-0.3") for f in (True, False)]
    methods = {f"{h}_{f}": DexAR(head_filter=h, filler_filter=f) for h, f in settings}
    explainer = Explainer(model, processor, methods)
    samples = [make_shapes_sample(i) for i in range(6)]
    exps = explainer.explain_samples(samples, keep_eos=keep_eos)
    snr = {label: {"filler_snr": M.FillerSNR()} for label in methods}
    Evaluator(explainer.adapter, snr).update(samples, exps)
    eos = processor.tokenizer.eos_token_id
    means = {}
    for label in methods:
        expected = []
        for sample, exp in zip(samples, exps[label], strict=True):
            content = list(sample.word_is_content)  # word-level tokenizer: token t is word t
            assert exp.token_ids[-1] == eos if keep_eos else len(exp.token_ids) == len(content)
            content += [False] * keep_eos  # the end-of-sequence token is filler
            masses = [float(m.double().sum()) for m in exp.token_maps]
            expected.append(_hand_filler_db(exp.token_weights.tolist(), masses, content))
        values = snr[label]["filler_snr"].per_sample()
        assert values.numel() == len(samples)
        assert torch.allclose(values, torch.tensor(expected, dtype=values.dtype), atol=1e-9)
        means[label] = float(values.mean())
    for label, mean in means.items():
        if label.endswith("False"):
            assert abs(mean) > 0.01, label  # λ = 1 but the maps' masses differ: not 0 dB (a ratio of 1)
    assert len({round(m, 9) for m in means.values()}) == len(means), means  # every setting its own SNR


def test_every_metric_kind_has_a_feeder_and_every_perturbation_metric_maps_its_curve():
    """The registry covers the metrics package: each input_kind is known, each perturbation metric owns update_curve."""
    import inspect

    import metrics
    from dexar.pipeline.evaluation import FEEDERS, known_kinds

    assert list(FEEDERS) == ["localization", "filler", "perturbation"]
    classes = [c for _, c in inspect.getmembers(metrics, inspect.isclass) if getattr(c, "input_kind", None)]
    assert len(classes) >= 10
    for cls in classes:
        assert cls.input_kind in known_kinds(), cls
        if cls.input_kind.startswith("perturbation:"):
            assert callable(getattr(cls, "update_curve", None)), cls


def test_wait_for_exit_waits_for_the_exit_record(tmp_path):
    """A run file without its exit record (written up to the summary) times out; with it, returns at once."""
    from wandb.proto import wandb_internal_pb2

    from dexar.pipeline.report.wandb_runs import iter_records

    def write(records):
        data = b":W&B" + b"\x00\x00\x00"
        for record in records:
            payload = record.SerializeToString()
            data += struct.pack("<IHB", 0, len(payload), 1) + payload  # FULL chunks, all in the first block
        (tmp_path / "run-x.wandb").write_bytes(data)

    summary = wandb_internal_pb2.Record()
    summary.summary.update.add(key="a", value_json="1")
    exit_record = wandb_internal_pb2.Record()
    exit_record.exit.exit_code = 0
    write([summary])
    assert [r.WhichOneof("record_type") for r in iter_records(tmp_path / "run-x.wandb")] == ["summary"]
    with pytest.raises(TimeoutError, match="no exit record"):
        wait_for_exit(tmp_path, timeout=0.3)
    write([summary, exit_record])
    wait_for_exit(tmp_path, timeout=0.3)
    assert read_run(tmp_path)["summary"] == {"a": 1}
