"""Resume: a run killed midway and started again ends with the results of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import metrics as M
from callbacks import HeatmapWriter, Timing, read_progress, read_shards
from callbacks import heatmap_writer as hw
from datamodules.shapes import ShapesDataModule
from dexar.module import ExplainerModule

ROOT = Path(__file__).resolve().parents[1]
NUM_SAMPLES, BATCH = 6, 2


class Kill(Callback):
    """Raises after ``after`` batches were written (the writer runs first): an injected crash."""

    def __init__(self, after: int) -> None:
        self.after = after

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 == self.after:
            raise RuntimeError("killed")


class Explained(Callback):
    """Records which samples the module explained in this attempt."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.ids += outputs.sample_ids


def _module(checkpoint: str, methods=None) -> ExplainerModule:
    metrics = {
        "epg": M.EnergyPointingGame(),
        "iou": M.BestThresholdIoU(num_thresholds=11),
        "filler_snr": M.FillerSNR(),
        "pos_auc": M.PerturbationAUC(levels=[0.0, 0.4, 0.8]),
    }
    return ExplainerModule(
        model=checkpoint,
        methods=methods or {"dexar": {}, "dexar_avg": {"method": "dexar", "head_filter": "avg"}},
        answer_source="ground_truth",
        metrics=metrics,
        localization_target="tokens",
    )


def _run(checkpoint: str, out: Path, *extra: Callback, methods=None) -> tuple[ExplainerModule, HeatmapWriter]:
    module, writer = _module(checkpoint, methods), HeatmapWriter(num_overlays=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
        callbacks=[writer, Timing(), *extra],
    )
    trainer.predict(
        module, datamodule=ShapesDataModule(num_samples=NUM_SAMPLES, batch_size=BATCH), return_predictions=False
    )
    return module, writer


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(tiny_checkpoint, out)
    return _results(out)


def test_killed_run_resumes_to_the_same_results(tiny_checkpoint, uninterrupted, tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        _run(tiny_checkpoint, tmp_path, Kill(after=2))
    assert not (tmp_path / "results.json").exists()
    done = read_progress(tmp_path).done
    assert len(done) == 2 * BATCH
    explained = Explained()
    module, writer = _run(tiny_checkpoint, tmp_path, explained)
    assert not set(explained.ids) & done, "a sample done before was recomputed"
    assert len(explained.ids) == NUM_SAMPLES - len(done) and writer.resumed == len(done)
    assert _results(tmp_path) == uninterrupted
    assert uninterrupted["results"]["dexar"]["pos_auc"]["count"] == NUM_SAMPLES
    assert len(read_shards(tmp_path)["dexar"]) == NUM_SAMPLES
    rows = module.evaluator.rows["dexar"]["epg"]
    assert len(rows) == len(set(rows)) == uninterrupted["results"]["dexar"]["epg"]["count"]


def test_rerun_of_a_finished_run_recomputes_nothing(tiny_checkpoint, uninterrupted, tmp_path):
    _run(tiny_checkpoint, tmp_path)
    shards = sorted(p.name for p in tmp_path.glob("shards/rank*/*"))
    explained = Explained()
    _run(tiny_checkpoint, tmp_path, explained)
    assert explained.ids == []
    assert sorted(p.name for p in tmp_path.glob("shards/rank*/*")) == shards
    assert _results(tmp_path) == uninterrupted


def test_sigkilled_process_resumes_to_the_same_results(tiny_checkpoint, uninterrupted, tmp_path):
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[3]); sys.path.insert(0, sys.argv[3] + '/tests')\n"
        "from lightning.pytorch.callbacks import Callback\n"
        "import torch\n"
        "import test_resume as t\n"
        "class Slow(Callback):\n"
        "    def on_predict_batch_end(self, *a, **k): time.sleep(0.3)\n"
        "torch.set_num_threads(int(sys.argv[4]))  # same float reductions as this process\n"
        "t._run(sys.argv[1], t.Path(sys.argv[2]), Slow())\n"
    )
    args = [tiny_checkpoint, str(tmp_path), str(ROOT), str(torch.get_num_threads())]
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while len(list(tmp_path.glob("shards/rank*/batch*.safetensors"))) < 2 and time.time() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = read_progress(tmp_path).done
    assert 0 < len(done) < NUM_SAMPLES
    explained = Explained()
    _run(tiny_checkpoint, tmp_path, explained)
    assert not set(explained.ids) & done
    assert _results(tmp_path) == uninterrupted


def test_shards_are_never_half_written(tiny_checkpoint, tmp_path, monkeypatch):
    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(hw, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        _run(tiny_checkpoint, tmp_path)
    assert list(tmp_path.glob("shards/rank*/*")) == []  # neither a shard nor the temporary file
    assert read_progress(tmp_path).shards == 0


def test_resume_with_other_settings_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        _run(tiny_checkpoint, tmp_path, Kill(after=1))
    with pytest.raises(ValueError, match="default_root_dir"):
        _run(tiny_checkpoint, tmp_path, methods={"attention": {}})


@pytest.mark.slow
def test_resume_under_ddp_counts_each_sample_once(tiny_checkpoint, uninterrupted, tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        _run(tiny_checkpoint, tmp_path, Kill(after=1))
    module, writer = _module(tiny_checkpoint), HeatmapWriter(num_overlays=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        callbacks=[writer],
    )
    trainer.predict(
        module, datamodule=ShapesDataModule(num_samples=NUM_SAMPLES, batch_size=BATCH), return_predictions=False
    )
    resumed = _results(tmp_path)
    assert len(read_shards(tmp_path)["dexar"]) == NUM_SAMPLES  # no sample written twice
    for label, group in uninterrupted["results"].items():
        for name, stats in group.items():
            assert resumed["results"][label][name]["count"] == stats["count"]
            # other batches under DDP (float32 padding noise): equal to ~1e-7, not bit for bit
            assert resumed["results"][label][name]["value"] == pytest.approx(stats["value"], rel=1e-5, abs=1e-7)
