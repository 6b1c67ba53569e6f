"""The explorer wired into dexar: maps placed by the explanation's geometry, `dexar explain --html`,
`Explanation.save(html=True)`, predict's `explorer/` (one process, resumed, DDP), W&B pages, report links."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import metrics as M
from callbacks import HeatmapWriter, ResultsWriter, Timing, WandbMedia
from datamodules.shapes import ShapesDataModule, make_shapes_sample
from dexar.adapters.geometry import MapGeometry
from dexar.explanation import Explanation
from dexar.explorer import payload_from_explanations, write_run_explorer
from dexar.explorer.adapter import filler_flags, placement
from dexar.explorer.page import page_data
from dexar.explorer.predict import contribution_values, page_name, read_sample_rows
from dexar.explorer.synthetic import synthetic_run
from dexar.pipeline.cli import main as cli_main
from dexar.pipeline.module import ExplainerModule
from dexar.pipeline.report.tables import report
from tests.pipeline.test_resume import Kill


def _page_json(text: str, key: str = "dx-data") -> dict:
    return json.loads(re.search(rf'<script type="application/json" id="{key}">(.*?)</script>', text, re.S).group(1))


def _explanation(grid: torch.Tensor, image: Image.Image, geometry: MapGeometry | None, method="dexar") -> Explanation:
    return Explanation(
        tokens=["▁red", "▁circle"],
        token_ids=[1, 2],
        token_maps=torch.stack([grid, grid.flip(-1)]),
        token_weights=torch.tensor([1.0, 2.0]),
        sequence_map=grid,
        inputs={},
        answer_positions=torch.tensor([0, 1]),
        method=method,
        answer="red circle",
        image=image,
        sample_id="s/1",
        geometry=geometry,
    )


# ---------------------------------------------------------------- where the maps lie


def test_a_center_crop_becomes_the_grid_box_and_the_maps_stay_grids():
    image = Image.new("RGB", (300, 200))
    grid = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    crop = MapGeometry((200, 300), (0.0, 50.0, 200.0, 250.0))  # (y0, x0, y1, x1): the centred square
    exps, box = placement([_explanation(grid, image, crop)], (300, 200))
    assert box == (50.0, 0.0, 250.0, 200.0) and exps[0].token_maps.shape == (2, 4, 4)
    payload = payload_from_explanations([_explanation(grid, image, crop)])
    assert payload.grid_box == (50.0, 0.0, 250.0, 200.0) and np.shape(payload.methods[0].sequence_map) == (4, 4)
    assert page_data(payload)["grid_box"] == [50 / 300, 0, 250 / 300, 1]
    whole = MapGeometry.whole((200, 300))
    assert placement([_explanation(grid, image, whole)], (300, 200))[1] is None
    assert placement([_explanation(grid, image, None)], (300, 200))[1] is None


def test_a_box_past_the_image_is_placed_on_the_image_first():
    """Padding (LLaVA's pad-to-square, LLaVA-NeXT's canvas): the maps are placed, zero where unseen."""
    image = Image.new("RGB", (300, 200))
    grid = torch.rand(4, 4, generator=torch.Generator().manual_seed(1))
    padded = MapGeometry((200, 300), (-50.0, 0.0, 250.0, 300.0))  # a 300×300 square around the image
    exp = _explanation(grid, image, padded)
    exps, box = placement([exp], (300, 200), map_max_side=60)
    assert box is None and exps[0].sequence_map.shape == (40, 60)  # the image's aspect, longer side 60
    assert torch.allclose(exps[0].token_maps, exp.upsample((40, 60)).token_maps)
    cropped = MapGeometry((200, 300), (0.0, 0.0, 200.0, 150.0), seen_box=(0.0, 0.0, 200.0, 100.0))
    exps, box = placement([_explanation(grid, image, cropped)], (300, 200), map_max_side=60)
    assert box is None and float(exps[0].sequence_map[:, 21:].abs().max()) == 0  # unseen right part: zero
    with pytest.raises(ValueError, match=r"geometry is for a 300×200 image, the image given is 100×100"):
        placement([exp], (100, 100))


def test_filler_flags_follow_the_labelled_answer_word_for_word():
    assert filler_flags(
        ["▁i", "▁see", "▁a", "▁tri", "angle"], "i see a triangle", "i see a triangle", [0, 0, 0, 1]
    ) == [
        True,
        True,
        True,
        False,
    ]
    tokens = ["▁a", "▁red", "▁cir", "cle", "</s>"]
    assert filler_flags(tokens, "a red circle", "a red circle", [False, True, True]) == [True, False, False, None]
    assert filler_flags(tokens, "a blue circle", "a red circle", [False, True, True]) is None  # generated otherwise
    assert filler_flags(tokens, "a red circle", None, None) is None


def test_page_names_are_unique_without_knowing_the_other_ids():
    assert page_name("shapes-test-3") == "shapes-test-3"
    names = {page_name(i) for i in ("a/b", "a_b", "A_B", "a b")}
    assert len(names) == 4 and "a_b" in names
    assert re.fullmatch(r"a_b-[0-9a-f]{8}", page_name("a/b"))


def test_contribution_values_are_the_mean_of_the_finite_per_sample_values():
    contribution = {
        "dexar": {
            "epg": {"values": torch.tensor([0.2, float("nan"), 0.4]), "total": torch.tensor(0.6)},
            "iou": {"values": torch.tensor([float("nan")])},
            "mean": {"total": torch.tensor(1.0)},  # no per-sample values: left out
        }
    }
    values = contribution_values(contribution)
    assert values == {"dexar": {"epg": pytest.approx(0.3), "iou": None}}


# ---------------------------------------------------------------- dexar explain --html, Explanation.save(html=True)


def test_explanation_save_writes_the_page(tmp_path):
    image = Image.new("RGB", (64, 64), "white")
    exp = _explanation(torch.rand(4, 4), image, None)
    exp.save(tmp_path, html=True, prompt="what is it?")
    data = _page_json((tmp_path / "explanation.html").read_text())
    assert [w["text"] for w in data["methods"][0]["words"]] == ["red", "circle"] and data["prompt"] == "what is it?"
    assert (tmp_path / "sequence.png").is_file()
    exp.image = None
    with pytest.raises(ValueError, match="html=True needs the image"):
        exp.save(tmp_path / "again", html=True)


def test_cli_html_with_several_methods_shares_one_explain_call(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from dexar.explain import Explainer

    calls = []
    original = Explainer.explain_samples

    def counted(self, *args, **kwargs):
        calls.append(sorted(self.methods))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Explainer, "explain_samples", counted)
    image = tmp_path / "scene.png"
    make_shapes_sample(2, "test").image.save(image)
    out = tmp_path / "out"
    args = ["explain", str(image), "--model", tiny_checkpoint, "--prompt", "describe the image."]
    args += ["--answer", "i see a red circle", "--out", str(out), "--html"]
    assert cli_main([*args, "--method", "dexar,attention", "--head-filter", "avg"]) == 0, capsys.readouterr().err
    assert calls == [["attention", "dexar"]]  # one call: one trace for both methods
    printed = capsys.readouterr().out
    assert "dexar words:" in printed and "attention words:" in printed and "explanation.html" in printed
    data = _page_json((out / "explanation.html").read_text())
    assert [m["name"] for m in data["methods"]] == ["dexar", "attention"] and data["title"] == "scene.png"
    assert data["methods"][0]["options"]["head_filter"] == "avg"  # the option went to the method that takes it
    assert [w["text"] for w in data["methods"][1]["words"]] == ["i", "see", "a", "red", "circle"]
    assert "://" not in (out / "explanation.html").read_text().replace("http://www.w3.org/2000/svg", "")
    for name in ("dexar", "attention"):
        assert (out / name / "tokens.png").is_file() and (out / name / "explanation.json").is_file()
    assert cli_main([*args, "--method", "dexar"]) == 0  # one method: files in out/ as before, and the page
    assert (out / "sequence.png").is_file() and len(_page_json((out / "explanation.html").read_text())["methods"]) == 1
    capsys.readouterr()
    bad_model = [*args[:2], "--model", str(tmp_path / "nope"), *args[4:]]  # refused before any model is loaded
    for bad, message in (
        ("dexar,dexar", "lists a method twice"),
        ("attention,rollout", "does not take ['head_filter']"),
        ("dexar,nope", "unknown method 'nope'"),
    ):
        assert cli_main([*bad_model, "--method", bad, "--head-filter", "max"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- predict writes explorer/


NUM_SAMPLES, BATCH, OVERLAYS = 5, 2, 3


def _module(checkpoint: str) -> ExplainerModule:
    metrics = {"epg": M.EnergyPointingGame(), "pos_auc": M.PerturbationAUC(levels=[0.0, 0.4, 0.8])}
    return ExplainerModule(
        model=checkpoint,
        methods={"dexar": {}, "attention": {}},
        answer_source="ground_truth",
        metrics=metrics,
        localization_target="tokens",
        # float64: DDP batches the samples differently (rank 0: 0+2, 4; one process: 0+1, 2+3, 4), and a sample
        # left-padded to another length rounds differently (float32: maps 3e-7 apart, EPG 9.3e-9 on the Shapes
        # split's 5/9/9/13/9-word answers); float64 keeps that rounding far below the 1e-9 the tests compare at
        dtype="float64",
    )


def _predict(checkpoint: str, out: Path, *extra, devices: int = 1, logger=False) -> ExplainerModule:
    module = _module(checkpoint)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        inference_mode=False,
        logger=logger,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
        # ResultsWriter last, the order where an index built from results.json would miss the means
        callbacks=[HeatmapWriter(num_overlays=OVERLAYS), Timing(), WandbMedia(), *extra, ResultsWriter()],
    )
    trainer.predict(
        module, datamodule=ShapesDataModule(num_samples=NUM_SAMPLES, batch_size=BATCH), return_predictions=False
    )
    return module


def _index(out: Path) -> dict:
    return _page_json((out / "explorer" / "index.html").read_text(), "dx-run-data")


def _per_sample_means(module: ExplainerModule) -> dict[str, dict[str, dict[str, float]]]:
    """Sample → method → metric: the mean of the module's own per-sample values over the sample's rows."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for label, group in module.metric_sets.items():
        for name, metric in group.items():
            for row, value in zip(module.evaluator.rows[label][name], metric.per_sample().tolist(), strict=True):
                if np.isfinite(value):
                    out.setdefault(row.split("#")[0], {}).setdefault(label, {}).setdefault(name, []).append(value)
    return {s: {m: {k: float(np.mean(v)) for k, v in g.items()} for m, g in by.items()} for s, by in out.items()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("explorer-run")
    module = _predict(tiny_checkpoint, out)
    return out, _per_sample_means(module)


def test_predict_writes_the_run_explorer_of_the_overlay_samples(uninterrupted):
    out, expected = uninterrupted
    data = _index(out)
    ids = [f"shapes-test-{i}" for i in range(OVERLAYS)]
    assert [s["id"] for s in data["samples"]] == ids
    assert [m["name"] for m in data["methods"]] == ["dexar", "attention"]
    assert [(m["name"], m["higher_is_better"]) for m in data["metrics"]] == [("epg", True), ("pos_auc", True)]
    for row in data["samples"]:
        for method, by_metric in expected[row["id"]].items():
            for name, value in by_metric.items():
                assert row["metrics"][method][name] == pytest.approx(value, abs=1e-12), (row["id"], method, name)
    results = json.loads((out / "results.json").read_text())
    index = (out / "explorer" / "index.html").read_text()
    assert "pos_auc ↑" in index and f"{results['results']['dexar']['epg']['value']:.4g}" in index
    pages = sorted(p.name for p in (out / "explorer" / "samples").glob("*.html"))
    assert pages == [f"{i}.html" for i in ids]
    page = _page_json((out / "explorer" / "samples" / "shapes-test-0.html").read_text())
    sample = make_shapes_sample(0, "test")
    words = page["methods"][0]["words"]
    assert [w["text"] for w in words] == sample.answer.split() and page["side_by_side"] is True
    assert [w["filler"] for w in words] == [not c for c in sample.word_is_content]  # labelled answer: flags known
    assert page["prompt"] == sample.prompt


def test_resumed_run_lists_every_overlay_sample_with_the_same_values(tiny_checkpoint, uninterrupted, tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        _predict(tiny_checkpoint, tmp_path, Kill(after=1))
    first = tmp_path / "explorer" / "samples" / "shapes-test-0.html"
    assert first.is_file() and not (tmp_path / "explorer" / "index.html").exists()
    mtime = first.stat().st_mtime_ns
    _predict(tiny_checkpoint, tmp_path)
    assert first.stat().st_mtime_ns == mtime  # the finished sample was not redone
    assert _rows(tmp_path) == _rows(uninterrupted[0])


def _rows(out: Path) -> list[dict]:
    """The index rows without the thumbnails (JPEG bytes may differ between processes)."""
    return [{k: v for k, v in r.items() if k != "thumb"} for r in _index(out)["samples"]]


@pytest.mark.slow
def test_ddp_run_explorer_equals_the_one_process_explorer(tiny_checkpoint, uninterrupted, tmp_path):
    """Each rank writes its own samples' pages; rank 0's index lists them all, values as with one process."""
    _predict(tiny_checkpoint, tmp_path, devices=2)
    ddp, one = _rows(tmp_path), _rows(uninterrupted[0])
    assert (
        [r["id"] for r in ddp] == [r["id"] for r in one] == [r["id"] for r in read_sample_rows(tmp_path / "explorer")]
    )
    for a, b in zip(ddp, one, strict=True):
        assert {k: v for k, v in a.items() if k != "metrics"} == {k: v for k, v in b.items() if k != "metrics"}
        for method, by_metric in b["metrics"].items():
            assert a["metrics"][method] == pytest.approx(by_metric, abs=1e-9)


def test_wandb_per_sample_table_holds_the_overlay_pages(tiny_checkpoint, tmp_path, monkeypatch):
    """Column ``explanation``: the page (an ``html-file`` of the table artifact) in each overlay sample's first row."""
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))  # the table artifact's staging files
    logger = WandbLogger(project="dexar-test", save_dir=str(tmp_path), offline=True, mode="offline")
    _predict(tiny_checkpoint, tmp_path, logger=logger)
    logger.experiment.finish()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    table = json.loads(next((run_dir / "files" / "media" / "table").glob("per_sample*.table.json")).read_text())
    column = table["columns"].index("explanation")
    firsts = {}
    for row in table["data"]:
        firsts.setdefault(row[0].split("#")[0], row)
    ids = [f"shapes-test-{i}" for i in range(OVERLAYS)]
    assert sorted(s for s, row in firsts.items() if row[column]) == ids  # the first row of each overlay sample
    assert sum(bool(row[column]) for row in table["data"]) == OVERLAYS  # and no other row
    staged = [p.read_text(errors="replace") for p in (tmp_path / "data").rglob("*") if p.is_file()]
    types = [json.loads(t)["column_types"] for t in staged if t.startswith('{"_type": "table"')]
    assert any("html-file" in json.dumps(t) for t in types)
    pages = [_page_json(t) for t in staged if 'id="dx-data"' in t]
    assert sorted(p["sample_id"] for p in pages) == ids and all(len(p["methods"]) == 2 for p in pages)


# ---------------------------------------------------------------- dexar report links the explorers


def test_report_links_each_runs_explorer(tmp_path):
    run = tmp_path / "runs" / "my run"
    run.mkdir(parents=True)
    (run / "results.json").write_text(
        json.dumps({"dataset": "ShapesDataModule", "model": "m", "results": {"dexar": {"epg": {"value": 0.5}}}})
    )
    plain = tmp_path / "runs" / "plain"
    plain.mkdir()
    (plain / "results.json").write_text((run / "results.json").read_text())
    write_run_explorer(synthetic_run(samples=2), run)
    text = report([tmp_path / "runs"], tmp_path / "reports")
    links = re.findall(r"\[([^\]]+)\]\(([^)]+)\)", text.split("Explorers", 1)[1])
    assert links == [("my run", "../runs/my%20run/explorer/index.html")]  # the run without an explorer: no link
    assert (tmp_path / "reports" / "../runs/my run/explorer/index.html").resolve().is_file()
