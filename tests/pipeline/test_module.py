"""Lightning predict pipeline: shards, overlays, bad samples, and DDP (2 CPU processes) = 1 process."""

from __future__ import annotations

import importlib
import json

import lightning as L
import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

import metrics as M
from callbacks import HeatmapWriter, ResultsWriter, Timing, read_shards
from callbacks.heatmap_writer import SHARD_GLOB
from datamodules.fixtures import make_imagenet
from datamodules.imagenet import ImageNetDataModule
from datamodules.shapes import ShapesDataModule, ShapesDataset
from dexar.adapters import DexarInputError
from dexar.explain import Explainer
from dexar.methods import build_method
from dexar.phase_timing import PhaseTotals, method_seconds
from dexar.pipeline.coverage import NothingEvaluatedError
from dexar.pipeline.module import ExplainerModule
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
            # float32 maps of other batch compositions (padding changes the kernels' rounding, ~1e-7 relative);
            # each token map is min-max normalised on its own, so a token whose raw map spans a small range
            # scales that up (measured: ≤ 6.2e-6 for token maps, ≤ 2.4e-7 for sequence maps)
            assert torch.allclose(rec["token_maps"], other["token_maps"], atol=2e-5)
            assert torch.allclose(rec["sequence_map"], other["sequence_map"], atol=1e-6)


# -- per-method sec/img: each method alone (issue 12.4) ------------------------------------------------


def test_time_alone_traces_each_method_with_its_own_needs(tiny64, samples, monkeypatch):
    model, processor = tiny64
    methods = {
        "dexar": build_method("dexar"),
        "chefercam": build_method("chefercam"),
        "attention": build_method("attention"),
    }
    explainer = Explainer(model, processor, methods)
    traced: list[frozenset[str]] = []
    explain_module = importlib.import_module("dexar.explain")  # `dexar.explain` is also the function
    real_run = explain_module.run_trace
    monkeypatch.setattr(
        explain_module, "run_trace", lambda a, b, needs: traced.append(frozenset(needs)) or real_run(a, b, needs)
    )
    shared = explainer.explain_samples(samples[:2], "ground_truth")
    assert traced == [explainer.needs] and not any(p.startswith("alone/") for p in explainer.last_timings)
    timed = explainer.explain_samples(samples[:2], "ground_truth", time_alone=True)
    assert traced[1:] == [explainer.needs, *(m.needs for m in methods.values())]
    assert {f"alone/{label}" for label in methods} <= set(explainer.last_timings)
    for label in methods:  # timing a method alone changes none of the results
        for a, b in zip(shared[label], timed[label], strict=True):
            assert torch.equal(a.token_maps, b.token_maps) and torch.equal(a.sequence_map, b.sequence_map)


def test_method_seconds_add_generation_and_encoding_to_alone_and_shared():
    totals = PhaseTotals()
    laps = {"generation": 0.2, "encoding": 0.4, "trace": 4.0, "method/dexar": 0.4, "method/chefercam": 2.0}
    totals.add(laps, 4)  # a batch of 4 images
    totals.add({**laps, "alone/dexar": 2.0, "alone/chefercam": 6.0}, 2)  # alone is timed on this batch only
    per_image = totals.per_image()
    assert per_image["trace"] == pytest.approx(8.0 / 6) and per_image["alone/dexar"] == pytest.approx(1.0)
    seconds = method_seconds(per_image)
    base = (0.4 + 0.8) / 6
    assert seconds["dexar"] == {"alone": pytest.approx(base + 1.0), "shared": pytest.approx(base + (8.0 + 0.8) / 6)}
    assert seconds["chefercam"]["alone"] == pytest.approx(base + 3.0)
    totals.add({"trace": 1.0}, 0)  # nothing computed: nothing counted
    assert totals.images["trace"] == 6


# -- runs that evaluate nothing, strict JSON, fewer samples than processes (issue 13.4, 13.5, 13.9) --------


def _strict_json(text: str):
    def reject(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=reject)


def _every_json_is_strict(run_dir):
    files = sorted(run_dir.rglob("*.json"))
    for path in files:
        _strict_json(path.read_text())
    for path in run_dir.glob(SHARD_GLOB):
        with safe_open(str(path), "pt") as f:
            _strict_json(f.metadata()["json"])
    return [p.name for p in files]


def _trainer(out_dir, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(out_dir),
        callbacks=[ResultsWriter(), HeatmapWriter(num_overlays=1), Timing()],
        **kwargs,
    )


def test_run_with_every_image_unreadable_fails_after_writing_strict_json(tiny_checkpoint, tmp_path, capsys):
    make_imagenet(tmp_path / "imagenet", per_class=1, broken=(0, 1, 2))
    data = ImageNetDataModule(str(tmp_path / "imagenet"), num_samples=None, batch_size=2, num_workers=0)
    metrics = {"pos_auc": M.PerturbationAUC(levels=[0.0, 0.5]), "epg": M.EnergyPointingGame()}
    module = ExplainerModule(model=tiny_checkpoint, answer_source="ground_truth", metrics=metrics)
    with pytest.raises(NothingEvaluatedError, match=r"no sample was explained \(3 unreadable, 0 failed\)") as err:
        _trainer(tmp_path / "run").predict(module, datamodule=data, return_predictions=False)
    assert isinstance(err.value, DexarInputError)  # train_eval.py: one line `error: ...`, exit 1
    out = capsys.readouterr().out
    assert "pos_auc: 0 samples — no sample was explained (3 unreadable, 0 failed)" in out
    assert "results.json" in _every_json_is_strict(tmp_path / "run")
    results = _strict_json((tmp_path / "run" / "results.json").read_text())
    assert results["unreadable_samples"] == 3
    assert results["results"]["dexar"]["pos_auc"] == {
        "value": None,
        "count": 0,
        "skipped": 0,
        "reason": "no sample was explained (3 unreadable, 0 failed)",
    }


def test_localization_without_word_masks_says_why_and_fails(tiny_checkpoint, tmp_path, capsys):
    class NoWordMasksDataModule(ShapesDataModule):
        def predict_dataloader(self):
            class Stripped(ShapesDataset):
                def __getitem__(self, index):
                    sample = super().__getitem__(index)
                    sample.word_mask_index = None
                    return sample

            return DataLoader(Stripped(3), batch_size=3, collate_fn=collate_samples)

    module = ExplainerModule(
        model=tiny_checkpoint,
        answer_source="ground_truth",
        metrics={"epg": M.EnergyPointingGame()},
        localization_target="tokens",
    )
    with pytest.raises(NothingEvaluatedError, match="3 samples explained, but no metric received a valid sample"):
        _trainer(tmp_path).predict(module, datamodule=NoWordMasksDataModule(), return_predictions=False)
    why = "NoWordMasks has no word masks; use localization_target: sequence"
    assert f"epg: 0 samples — {why} (3 samples)" in capsys.readouterr().out
    results = _strict_json((tmp_path / "results.json").read_text())
    assert results["results"]["dexar"]["epg"]["reason"] == f"{why} (3 samples)"


def test_sequence_localization_on_the_same_data_evaluates(tiny_checkpoint, tmp_path):
    module = ExplainerModule(
        model=tiny_checkpoint, answer_source="ground_truth", metrics={"epg": M.EnergyPointingGame()}
    )
    _trainer(tmp_path).predict(
        module, datamodule=ShapesDataModule(num_samples=3, batch_size=3), return_predictions=False
    )
    assert module.results["dexar"]["epg"]["count"] == 3 and "reason" not in module.results["dexar"]["epg"]
    assert module.nothing_evaluated is None


@pytest.mark.slow
def test_fewer_samples_than_processes_stops_at_setup_in_one_line(tiny_checkpoint, tmp_path):
    """Issue 13.4 (2 samples, 3 processes; here 1 sample, 2 processes: the same case, cheaper): Lightning's
    sampler died with a bare AssertionError."""
    module = ExplainerModule(model=tiny_checkpoint, answer_source="ground_truth")
    trainer = _trainer(tmp_path, devices=2, strategy="ddp_spawn")
    message = r"1 sample\(s\) for 2 processes: each process needs at least one sample; use at most 1 processes"
    with pytest.raises(Exception, match=message) as err:
        trainer.predict(module, datamodule=ShapesDataModule(num_samples=1, batch_size=1), return_predictions=False)
    assert "AssertionError" not in str(err.value)


def test_empty_dataset_stops_at_setup(tiny_checkpoint, tmp_path):
    """Lightning skips a predict loop without batches: no results, exit 0. The run must fail instead."""
    module = ExplainerModule(model=tiny_checkpoint, answer_source="ground_truth")
    with pytest.raises(NothingEvaluatedError, match="the predict dataset has no sample"):
        _trainer(tmp_path).predict(module, datamodule=ShapesDataModule(num_samples=0), return_predictions=False)
    assert module.vlm is None  # stopped before loading the model
