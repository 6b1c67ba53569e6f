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
from callbacks import HeatmapWriter, ResultsWriter, Timing, WandbMedia, read_progress, read_shards
from callbacks import heatmap_writer as hw
from datamodules.shapes import ShapesDataModule
from dexar.pipeline.module import ExplainerModule

ROOT = Path(__file__).resolve().parents[2]
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


class SlowRank(Callback):
    """Sleeps after each batch of one rank (under DDP the other ranks finish first)."""

    def __init__(self, rank: int, seconds: float) -> None:
        self.rank, self.seconds = rank, seconds

    def on_predict_batch_end(self, trainer, *args, **kwargs):
        if trainer.global_rank == self.rank:
            time.sleep(self.seconds)


def _run(
    checkpoint: str, out: Path, *extra: Callback, methods=None, devices: int = 1
) -> tuple[ExplainerModule, HeatmapWriter]:
    """One predict run with every default callback (``devices`` > 1: DDP on CPU processes)."""
    module, writer = _module(checkpoint, methods), HeatmapWriter(num_overlays=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
        callbacks=[ResultsWriter(), writer, Timing(), WandbMedia(), *extra],
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
        "import sys, time; sys.path.insert(0, sys.argv[3]); sys.path.insert(0, sys.argv[3] + '/tests/pipeline')\n"
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


def _timing(out: Path) -> dict:
    return json.loads((out / "timing.json").read_text())


def test_run_killed_at_epoch_end_keeps_its_timing(tiny_checkpoint, tmp_path):
    """Issue 13.3: the rerun of a run killed after its last batch reported ``{}`` seconds for 1 image."""
    with pytest.raises(RuntimeError, match="killed"):
        _run(tiny_checkpoint, tmp_path, Kill(after=NUM_SAMPLES // BATCH))
    assert len(read_progress(tmp_path).done) == NUM_SAMPLES
    _run(tiny_checkpoint, tmp_path)  # nothing left to compute
    timing = _timing(tmp_path)
    for phase in ("encoding", "trace", "method/dexar", "evaluation/dexar"):
        assert timing["phases"][phase]["images"] == NUM_SAMPLES  # every image was computed by the first attempt
        assert timing["seconds_per_image"][phase] > 0
    # the first attempt timed each method alone on its first time_alone_batches (2) batches, not on the third
    assert timing["phases"]["alone/dexar"]["images"] == 2 * BATCH
    assert timing["images"] == NUM_SAMPLES
    assert set(timing["methods"]["dexar"]) == {"sec_per_img", "shared_sec_per_img"}


def test_resumed_timing_merges_attempts_and_counts_only_computed_images(tiny_checkpoint, tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        _run(tiny_checkpoint, tmp_path, Kill(after=1))
    first = read_progress(tmp_path).timing
    assert first.images["trace"] == BATCH and first.images["alone/dexar"] == BATCH
    _run(tiny_checkpoint, tmp_path)
    timing = _timing(tmp_path)
    assert timing["phases"]["trace"]["images"] == NUM_SAMPLES
    # alone: 1 batch in the first attempt + the 2 first batches of the second
    assert timing["phases"]["alone/dexar"]["images"] == 3 * BATCH
    shards = read_progress(tmp_path).timing  # every batch of both attempts keeps its own seconds
    for phase, entry in timing["phases"].items():
        assert entry == {"seconds": pytest.approx(shards.seconds[phase]), "images": shards.images[phase]}


@pytest.mark.slow
def test_resume_under_ddp_counts_each_sample_once(tiny_checkpoint, uninterrupted, tmp_path):
    """A one-process crash resumed by two processes (another world size: rank 0 takes over every shard)."""
    with pytest.raises(RuntimeError, match="killed"):
        _run(tiny_checkpoint, tmp_path, Kill(after=1))
    _run(tiny_checkpoint, tmp_path, devices=2)
    resumed = _results(tmp_path)
    assert len(read_shards(tmp_path)["dexar"]) == NUM_SAMPLES  # no sample written twice
    for label, group in uninterrupted["results"].items():
        for name, stats in group.items():
            assert resumed["results"][label][name]["count"] == stats["count"]
            # other batches under DDP (float32 padding noise): equal to ~1e-7, not bit for bit
            assert resumed["results"][label][name]["value"] == pytest.approx(stats["value"], rel=1e-5, abs=1e-7)
    assert _timing(tmp_path)["phases"]["trace"]["images"] == NUM_SAMPLES


@pytest.fixture(scope="module")
def uninterrupted_ddp(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted-ddp")
    _run(tiny_checkpoint, out, devices=2)
    return _results(out)


@pytest.mark.slow
def test_sigkilled_ddp_run_resumes_to_the_uninterrupted_results(
    tiny_checkpoint, uninterrupted, uninterrupted_ddp, tmp_path
):
    """Issue 13.1: kill -9 a two-process run after rank 1 finished its samples; the rerun's rank 1 has
    nothing to do (it used to abort: gloo collective mismatch in Timing) and the results are exactly
    those of the uninterrupted two-process run."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[3]); sys.path.insert(0, sys.argv[3] + '/tests/pipeline')\n"
        "import test_resume as t\n"
        "t._run(sys.argv[1], t.Path(sys.argv[2]), t.SlowRank(0, 60.0), devices=2)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, tiny_checkpoint, str(tmp_path), str(ROOT)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,  # its own process group: the kill takes the spawned ranks too
    )
    rank_batches = -(-NUM_SAMPLES // 2 // BATCH)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and (
            len(list(tmp_path.glob("shards/rank001/batch*.safetensors"))) < rank_batches
            or not list(tmp_path.glob("shards/rank000/batch*.safetensors"))
        ):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = read_progress(tmp_path).done
    assert len(list(tmp_path.glob("shards/rank001/*"))) == rank_batches and 0 < len(done) < NUM_SAMPLES
    _run(tiny_checkpoint, tmp_path, devices=2)
    assert _results(tmp_path) == uninterrupted_ddp
    assert len(read_shards(tmp_path)["dexar"]) == NUM_SAMPLES
    assert _timing(tmp_path)["phases"]["trace"]["images"] == NUM_SAMPLES
    for label, group in uninterrupted["results"].items():  # and one process gives the same up to float32 noise
        for name, stats in group.items():
            assert uninterrupted_ddp["results"][label][name]["count"] == stats["count"]
            assert uninterrupted_ddp["results"][label][name]["value"] == pytest.approx(
                stats["value"], rel=1e-5, abs=1e-7
            )
