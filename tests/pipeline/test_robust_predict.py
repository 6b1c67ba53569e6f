"""Predict at scale: out of memory splits the batch (timing kept), evaluation failures are counted per sample."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch

import metrics as M
from callbacks import ResultsWriter
from datamodules.shapes import ShapesDataModule, make_shapes_sample
from dexar import SHAPES_CHECKPOINT
from dexar.pipeline.module import ExplainerModule
from tests.pipeline.failing_metric import FailingAUC

LEVELS = [0.0, 0.5]


@pytest.fixture
def module(tiny_checkpoint):
    module = ExplainerModule(model=tiny_checkpoint, methods={"dexar": {}, "attention": {}}, time_alone_batches=0)
    module.configure_model()
    return module


def _fake_explain(module, limit: int, calls: list):
    """``_explain`` that runs out of memory above ``limit`` samples; laps: 1 s of trace per sample."""
    real = module._explain

    def explain(samples, time_alone):
        calls.append(len(samples))
        if len(samples) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        explanations, _ = real(samples, time_alone)
        return explanations, {"trace": 1.0 * len(samples), "method/dexar": 0.5 * len(samples)}

    return explain


def test_out_of_memory_halves_the_batch_keeps_every_timing_and_says_so_once(module, monkeypatch, caplog):
    calls: list[int] = []
    monkeypatch.setattr(module, "_explain", _fake_explain(module, 2, calls))
    batch = [make_shapes_sample(i) for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="dexar.pipeline.module"):
        output = module._explain_batch(batch, 7)
    assert calls == [5, 3, 2, 1, 2]  # 5 → 3 + 2 → (2 + 1) + 2
    assert output.sample_ids == [s.id for s in batch]
    assert [e.sample_id for e in output.explanations["dexar"]] == output.sample_ids
    assert output.timed == 5 and output.timing == {"trace": 5.0, "method/dexar": 2.5}  # every sample's laps
    assert not output.failures and not module.failed
    said = [r.getMessage() for r in caplog.records]
    assert said == ["batch 7: out of memory with 5 samples; explained in sub-batches of 2 + 1 + 2"]


def test_a_sample_out_of_memory_on_its_own_fails_alone(module, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(module, "_explain", _fake_explain(module, 0, calls))
    output = module._explain_batch([make_shapes_sample(i) for i in range(2)], 0)
    assert calls == [2, 1, 1]
    assert output.sample_ids == [] and output.timed == 0
    assert [sid for sid, _ in output.failures] == ["shapes-test-0", "shapes-test-1"]
    assert all("OutOfMemoryError" in why for _, why in output.failures) and len(module.failed) == 2


def test_other_errors_are_not_taken_for_out_of_memory(module, monkeypatch, caplog):
    real, calls = module._explain, []

    def explain(samples, time_alone):
        calls.append(len(samples))
        if any(s.id == "shapes-test-1" for s in samples):
            raise RuntimeError("a bad sample")
        return real(samples, time_alone)

    monkeypatch.setattr(module, "_explain", explain)
    with caplog.at_level(logging.WARNING, logger="dexar.pipeline.module"):
        output = module._explain_batch([make_shapes_sample(i) for i in range(4)], 3)
    assert calls == [4, 1, 1, 1, 1]  # one by one, not halved
    assert output.sample_ids == ["shapes-test-0", "shapes-test-2", "shapes-test-3"]
    assert [sid for sid, _ in output.failures] == ["shapes-test-1"]
    assert not any("out of memory" in r.getMessage() for r in caplog.records)


def _predict(run_dir: Path, devices: int, fail_rank: int, num_samples: int = 5) -> dict:
    metrics = {
        "pos_auc": FailingAUC(fail_rank=fail_rank, levels=LEVELS),
        "neg_auc": M.NegativePerturbationAUC(levels=LEVELS),
        "epg": M.EnergyPointingGame(),
    }
    module = ExplainerModule(
        model=SHAPES_CHECKPOINT,
        methods={"dexar": {}, "attention": {}},
        answer_source="ground_truth",
        metrics=metrics,
        time_alone_batches=0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(run_dir),
        callbacks=[ResultsWriter()],
    )
    trainer.predict(
        module, datamodule=ShapesDataModule(num_samples=num_samples, batch_size=2), return_predictions=False
    )
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.skipif(not (Path(SHAPES_CHECKPOINT) / "model.safetensors").exists(), reason="no bundled checkpoint")
@pytest.mark.parametrize("devices", [1, 2], ids=["one process", "two processes"])
def test_an_evaluation_failure_is_counted_and_the_run_finishes(tmp_path, devices, capfd):
    """The first sample of the last process fails in both methods' evaluation (injected); nothing hangs."""
    results = _predict(tmp_path, devices, fail_rank=devices - 1)
    assert results["evaluation_failed_samples"] == 1
    assert results["evaluation_failures"] == {"dexar": 1, "attention": 1}
    assert results["failed_samples"] == 0
    for label in ("dexar", "attention"):
        for name in ("pos_auc", "neg_auc"):  # the failing (sample, method) feeds none of the method's metrics
            assert results["results"][label][name]["count"] == 4, (label, name)
    assert "1 failed evaluation (dexar: 1, attention: 1)" in capfd.readouterr().out


def test_predict_cli_keeps_no_predictions_in_memory(tmp_path, monkeypatch):
    from lightning.pytorch import Trainer

    from train_eval import main

    seen: dict = {}
    monkeypatch.setattr(Trainer, "predict", lambda self, **kwargs: seen.update(kwargs))
    args = ["predict", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    main([*args, "--data.init_args.num_samples", "2"])
    assert seen["return_predictions"] is False


def test_every_method_shares_one_pixel_values_copy_per_sample(module):
    samples = [make_shapes_sample(i) for i in range(2)]
    explanations, _ = module._explain(samples, time_alone=False)
    for b in range(2):
        dexar, attention = explanations["dexar"][b].inputs, explanations["attention"][b].inputs
        assert dexar is not attention  # a dict of its own
        assert dexar["pixel_values"].data_ptr() == attention["pixel_values"].data_ptr()
    assert (
        explanations["dexar"][0].inputs["pixel_values"].data_ptr()
        != explanations["dexar"][1].inputs["pixel_values"].data_ptr()
    )


def test_out_of_memory_inside_a_trace_sub_batch_halves_the_batch_once(tiny_checkpoint, monkeypatch, caplog):
    """trace_batch=2: an out-of-memory error in a sub-batch's trace is not swallowed; the batch is halved."""
    explain_module = importlib.import_module("dexar.explain")  # `dexar.explain` is also the function

    module = ExplainerModule(model=tiny_checkpoint, methods={"dexar": {}}, time_alone_batches=0, trace_batch=2)
    module.configure_model()
    real, traced = explain_module.run_trace, []

    def trace(adapter, batch, *rest):
        traced.append(batch.input_ids.shape[0])
        if batch.input_ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(adapter, batch, *rest)

    monkeypatch.setattr(explain_module, "run_trace", trace)
    batch = [make_shapes_sample(i) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="dexar.pipeline.module"):
        output = module._explain_batch(batch, 3)
    assert traced == [2, 2, 1, 1, 2, 1, 1]  # 4 (2 + 2: the first fails) → 2 (fails) → 1 + 1, twice
    assert output.sample_ids == [s.id for s in batch] and output.timed == 4
    assert not output.failures
    said = [r.getMessage() for r in caplog.records]
    assert said == ["batch 3: out of memory with 4 samples; explained in sub-batches of 1 + 1 + 1 + 1"]
