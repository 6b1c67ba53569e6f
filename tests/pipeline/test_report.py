"""`dexar report`: paper tables from finished runs (results.json or W&B offline runs), CSV and PNGs."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import wandb
import yaml

from datamodules.fixtures import make_imagenet
from dexar.adapters.florence2 import Florence2Adapter
from dexar.pipeline import experiments as grid
from dexar.pipeline.cli import main as cli_main
from dexar.pipeline.report.paper_numbers import PAPER
from dexar.pipeline.report.tables import TABLES, build_table, collect, display, format_value, report, to_markdown
from dexar.testing.florence2 import random_florence2
from train_eval import main

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "configs" / "paper" / "shapes"
SMALL = [
    "--data.init_args.num_samples",
    "2",
    "--data.init_args.batch_size",
    "2",
    "--trainer.enable_progress_bar",
    "false",
]


def _fake_run(path: Path, table: str, attrs: dict, results: dict, variant: dict | None = None) -> Path:
    path.mkdir(parents=True)
    payload = {"results": {m: {k: {"value": v, "count": 1} for k, v in r.items()} for m, r in results.items()}}
    (path / "results.json").write_text(json.dumps(payload))
    (path / "variant.json").write_text(json.dumps({"table": table, "attrs": attrs, "variant": variant or {}}))
    return path


def test_paper_numbers_sit_beside_ours_where_the_setting_matches(tmp_path):
    ours = {"dexar": {"soft_iou": 0.1234, "iou": 0.3, "epg": 0.25}, "attention": {"soft_iou": 0.02, "iou": 0.1}}
    _fake_run(tmp_path / "llava", "table2", {"model": "llava-1.5", "dataset": "pascal_voc"}, ours)
    _fake_run(tmp_path / "other", "table2", {"model": "my-vlm", "dataset": "pascal_voc"}, {"dexar": {"epg": 0.5}})
    table = build_table(TABLES["table2"], collect([tmp_path]))
    text = to_markdown(table)
    paper = PAPER["table2"][(("llava-1.5", "dexar"), (), "soft_iou")]
    cell = f"{format_value(ours['dexar']['soft_iou'] * 100)} ({paper:.2f})"
    assert f"|  | DEX-AR | {cell} |" in text  # the model is shown once
    assert f"| my-vlm | DEX-AR | — | — | {format_value(50.0)} |" in text  # no paper row for this model: ours only
    assert table.rows.index(("llava-1.5", "attention")) < table.rows.index(("llava-1.5", "dexar"))  # paper order


def test_variants_fill_rows_and_column_groups(tmp_path):
    for model in ("llava-1.5", "bakllava"):
        for head in ("max", "avg"):
            values = {"snr": len(model) + (head == "max"), "mse": 0.1 * len(head)}
            _fake_run(tmp_path / model / head, "table3", {}, {"dexar": values}, {"model": model, "head_filter": head})
    out = tmp_path / "report"
    report([tmp_path], out)
    rows = list(csv.DictReader(open(out / "table3.csv")))
    assert [r["head_filter"] for r in rows] == ["max", "avg"]  # the paper's row order
    max_row = rows[0]
    assert float(max_row["bakllava snr"]) == len("bakllava") + 1
    assert float(max_row["llava-1.5 snr (paper)"]) == PAPER["table3"][(("max",), ("llava-1.5",), "snr")]


def test_method_attrs_place_side_by_side_settings_in_their_cells(tmp_path):
    """Table 8 layout: one run, labels with the filler filter off land in the same row, another column."""
    attrs = {"dataset": "imagenet_c", "model": "llava-1.5", "corruption": "fog", "filler": "on"}
    attrs["method_attrs"] = {"dexar_max_nofiller": {"method": "dexar_max", "filler": "off"}}
    results = {"dexar_max": {"filler_snr": 140.0}, "dexar_max_nofiller": {"filler_snr": 7.5}}
    results["dexar_avg"] = {"filler_snr": 9.0}
    _fake_run(tmp_path / "run", "table8", attrs, results)
    table = build_table(TABLES["table8"], collect([tmp_path]))
    assert table.rows == [("dexar_max",), ("dexar_avg",)]  # paper order
    assert table.cells[(("dexar_max",), ("fog", "on"), "filler_snr")] == 140.0
    assert table.cells[(("dexar_max",), ("fog", "off"), "filler_snr")] == 7.5
    text = to_markdown(table)
    paper = PAPER["table8"][(("dexar_max",), ("fog", "on"), "filler_snr")]
    assert f"| max | {format_value(140.0)} ({paper:.2f}) | {format_value(7.5)} |" in text
    assert display("dexar_top05_nofiller") == "top-0.05 (filler ✗)"  # gallery rows of side-by-side labels


def test_report_of_missing_directory_is_a_one_line_error(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "no such run directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shapes_runs(tmp_path_factory):
    """Shapes tables 1-5 and 8 through the real CLI (one variant each, 2 samples); table 4 also logs to W&B."""
    root = tmp_path_factory.mktemp("paper-shapes")
    runs = {
        "table1_perturbation": [["--model.init_args.methods", "{dexar: {}}"]],
        "table2_segmentation": [[]],
        "table3_head_filter": [["--variant.head_filter", "avg"]],
        "table4_filtering": [["--variant.head", "on", "--variant.filler", "off"]],
        "table5_relu_layers": [["--variant.relu", "false", "--variant.layers", "last"]],
        "table8_head_filters": [[]],
    }
    for name, variants in runs.items():
        for variant in variants:
            args = ["predict", *grid.config_flags(SHAPES / f"{name}.yaml"), *variant, *SMALL]  # as its header says
            args += ["--trainer.default_root_dir", str(root / name)]
            if name == "table4_filtering":
                args += ["--trainer.logger.init_args.save_dir", str(root / name)]
            else:
                args += ["--trainer.logger", "false"]
            main(args)
            if name == "table4_filtering":
                wandb.finish()  # flush the offline run (a CLI process does it at exit)
    return root


def test_shapes_tables_end_to_end(shapes_runs, tmp_path):
    out = tmp_path / "report"
    assert cli_main(["report", str(shapes_runs), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    for key in ("table1", "table2", "table3", "table4", "table5", "table8"):
        assert TABLES[key].title in text and (out / f"{key}.csv").is_file()
    for run in collect([shapes_runs]):
        spec = TABLES[run.table]
        scale = {m: s for m, _, s in spec.metrics}
        for label, metric, value in run.values():
            if metric in scale:
                assert format_value(value * scale[metric]) in text, (run.path, label, metric)
    for key in ("table1", "table2", "table3", "table4", "table5", "table8"):
        table = build_table(TABLES[key], collect([shapes_runs]))
        assert table.cells and not set(table.cells) & set(table.paper)  # the paper has no Shapes numbers
    table8 = build_table(TABLES["table8"], collect([shapes_runs]))
    assert table8.groups == [("clean", "on"), ("clean", "off")] and len(table8.rows) == 7
    assert len(table8.cells) == 14  # each head filter, filler filter on and off, side by side from one run
    assert len(list(out.glob("table1_curve_pos_auc_*.png"))) == 1
    assert (out / "table2_gallery.png").is_file()


def test_wandb_offline_run_gives_the_same_table(shapes_runs, tmp_path):
    run_dir = next((shapes_runs / "table4_filtering").iterdir())
    expected = to_markdown(build_table(TABLES["table4"], collect([run_dir])))
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir / "wandb", copy / "wandb")
    runs = collect([copy])
    assert len(runs) == 1 and runs[0].path.name.startswith("offline-run-")
    assert to_markdown(build_table(TABLES["table4"], runs)) == expected


def test_tick_values_are_round_and_a_wide_positive_range_gets_a_log_axis():
    from dexar.pipeline.report.plots import linear_ticks, log_ticks, tick_label, wants_log_axis

    ticks = linear_ticks(0.18, 55.3)
    assert ticks == [0, 20, 40, 60] and [tick_label(t, 20) for t in ticks] == ["0", "20", "40", "60"]
    assert [tick_label(t, 0.2) for t in linear_ticks(0.0, 0.9)] == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert tick_label(0.25, 0.25) == "0.25" and tick_label(0.05, 0.05) == "0.05"
    # NEG curves: six methods between 1 and 7, two near 62: on a log axis 1-7 fill 42% of the height, not 10%
    curves = [1.0, 2.5, 4.0, 7.0, 61.0, 62.0]
    assert wants_log_axis(curves) and not wants_log_axis([0.8, 1.0, 3.5]) and not wants_log_axis([0.0, 70.0])
    assert log_ticks(1.0, 62.0) == [1, 2, 5, 10, 20, 50, 100]
    assert log_ticks(0.5, 3.0) == [0.5, 1, 2, 5]


def test_line_chart_draws_both_scales(tmp_path):
    from dexar.pipeline.report.plots import line_chart

    levels = [i / 10 for i in range(10)]
    series = {f"m{i}": (levels, [1 + i * p for p in levels]) for i in range(7)}
    series["far"] = (levels, [1 + 68 * p for p in levels])
    for log in (None, False):
        img = line_chart(series, "Table 1: negative perturbation", "fraction of pixels removed", "NPPL", log)
        assert img.size == (820, 490) and len(img.getcolors(100000)) > 20  # lines, markers, text


def test_sec_per_img_is_the_method_alone_with_the_shared_cost_beside_it(tmp_path):
    """Issue 12.4: the paper times each method on its own; the shared trace serves every method's needs."""
    run = _fake_run(
        tmp_path / "run", "table1", {"model": "llava-1.5", "dataset": "imagenet"}, {"dexar": {"pos_auc": 18.0}}
    )
    per_image = {"generation": 0.01, "encoding": 0.02, "trace": 1.0, "method/dexar": 0.1, "alone/dexar": 0.5}
    (run / "timing.json").write_text(json.dumps({"seconds_per_image": per_image}))
    table = build_table(TABLES["table1"], collect([tmp_path]))
    key = (("llava-1.5", "dexar"), ("imagenet",))
    assert table.cells[(*key, "sec_per_img")] == pytest.approx(0.53)  # 0.01 + 0.02 + 0.5
    assert table.cells[(*key, "shared_sec_per_img")] == pytest.approx(1.13)  # 0.01 + 0.02 + 1.0 + 0.1
    assert table.paper[(*key, "sec_per_img")] == PAPER["table1"][(*key, "sec_per_img")]
    text = to_markdown(table)
    assert "| ImageNet sec/img | ImageNet shared sec/img |" in text
    assert f"| {format_value(0.53)} ({PAPER['table1'][(*key, 'sec_per_img')]:.2f}) | {format_value(1.13)} |" in text


def test_method_the_model_cannot_run_reads_na_with_its_reason(tmp_path):
    run = _fake_run(
        tmp_path / "flo", "table1b", {"model": "florence-2", "dataset": "imagenet"}, {"dexar": {"pos_auc": 0.9}}
    )
    payload = json.loads((run / "results.json").read_text())
    why = "attention rollout multiplies self-attention matrices over image and text tokens"
    payload["results"]["rollout"] = {
        m: {"value": None, "count": 0, "skipped": 0, "n/a": why} for m in ("pos_auc", "neg_auc")
    }
    (run / "results.json").write_text(json.dumps(payload))
    out = tmp_path / "report"
    report([tmp_path], out)
    text = (out / "report.md").read_text()
    paper = PAPER["table1b"][(("florence-2", "rollout"), ("imagenet",), "pos_auc")]
    assert f"| Rollout | n/a ({why}) ({paper:.2f}) | n/a ({why})" in text
    rows = {r["method"]: r for r in csv.DictReader(open(out / "table1b.csv"))}
    assert rows["rollout"]["imagenet pos_auc"] == "n/a" and float(rows["dexar"]["imagenet pos_auc"]) == 0.9


def test_the_default_run_is_reported(tmp_path):
    """Issue 13.12: a run without variant.json (the default config) was skipped."""
    main(["predict", *SMALL, "--trainer.default_root_dir", str(tmp_path / "demo"), "--trainer.logger", "false"])
    out = tmp_path / "report"
    assert cli_main(["report", str(tmp_path), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "Runs of no paper table" in text and "skipped" not in text
    results = json.loads((tmp_path / "demo" / "results.json").read_text())["results"]
    for label, group in results.items():
        for metric, stats in group.items():
            if stats["value"] is not None:
                assert format_value(stats["value"]) in text, (label, metric)
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert {(r["run"], r["method"]) for r in rows} == {("demo", "dexar"), ("demo", "attention")}
    assert all(float(r["sec_per_img"]) > 0 and float(r["shared_sec_per_img"]) > 0 for r in rows)


def test_florence2_table1b_run_finishes_with_na_cells(tmp_path, capsys, caplog):
    """Issue 12.6: configs/paper/table1b_* lists rollout, gradcam, chefercam and iia, which Florence-2 refuses;
    the run died at setup. Now they are skipped with one warning and reported n/a, every other method runs."""
    model, processor = random_florence2(dtype=torch.float32, seed=1)
    checkpoint = tmp_path / "tiny-florence2"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    make_imagenet(tmp_path / "imagenet", per_class=1, broken=())
    config = yaml.safe_load((ROOT / "configs" / "paper" / "table1b_imagenet.yaml").read_text())
    florence = config["experiment"]["grid"]["model"]["florence-2"]
    assert florence["model.init_args.model"] == "florence-community/Florence-2-base"  # native, no remote code
    florence["model.init_args.model"] = str(checkpoint)
    (tmp_path / "table1b_imagenet.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    runs = tmp_path / "runs"
    composed = grid.composition(ROOT / "configs" / "paper" / "table1b_imagenet.yaml")[:-1]  # base, data
    args = [
        "predict",
        *[a for c in composed for a in ("--config", c)],
        "--config",
        str(tmp_path / "table1b_imagenet.yaml"),
    ]
    args += ["--variant.model", "florence-2"]
    args += ["--data.init_args.root", str(tmp_path / "imagenet"), "--data.init_args.num_workers", "0"]
    args += ["--model.init_args.dtype", "float32", "--model.init_args.time_alone_batches", "0"]
    args += ["--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.default_root_dir", str(runs)]
    with caplog.at_level(logging.WARNING, logger="dexar.pipeline.module"):
        main([*args, *SMALL])
    refused = ["rollout", "gradcam", "chefercam", "iia"]
    warnings = [r for r in caplog.records if "cannot run on" in r.getMessage()]
    assert len(warnings) == 1 and all(label in warnings[0].getMessage() for label in refused)
    run_dir = runs / "model-florence-2"
    results = json.loads((run_dir / "results.json").read_text())
    assert sorted(results["not_applicable"]) == sorted(refused)
    for label, group in results["results"].items():
        for stats in group.values():
            if label in refused:
                assert stats["n/a"] == Florence2Adapter.refused_methods[label] and stats["value"] is None
            else:
                assert stats["count"] == 2 and "n/a" not in stats
    assert set(results["results"]) == set(config["model"]["init_args"]["methods"])
    text = report([runs], tmp_path / "report")
    for label in refused:
        assert f"n/a ({Florence2Adapter.refused_methods[label]})" in text
    assert "| Florence-2 | Attention |" in text
