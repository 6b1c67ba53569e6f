"""Ablation grids: declaration, expansion (CLI and W&B sweep), and how a variant changes a run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from dexar.pipeline import experiments as grid
from dexar.pipeline.cli import main as cli_main
from train_eval import main

GRID = {
    "model": {"a": {"model.init_args.model": "m-a"}, "b": {"model.init_args.model": "m-b", "data.init_args.seed": 3}},
    "head_filter": {"key": "model.init_args.methods.dexar.head_filter", "values": ["none", "max", "top-0.05"]},
    "relu": {"key": ["model.init_args.methods.dexar.relu"], "values": [True, False]},
}


def _config(tmp_path, grid_spec=GRID):
    path = tmp_path / "exp.yaml"
    text = {
        "experiment": {"table": "table3", "attrs": {"dataset": "shapes"}, "grid": grid_spec},
        "trainer": {
            "default_root_dir": str(tmp_path / "runs"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "p", "offline": True, "group": "g", "tags": ["base"]},
            },
        },
        "model": {
            "class_path": "dexar.pipeline.module.ExplainerModule",
            "init_args": {"methods": {"dexar": {"head_filter": "max"}, "attention": {}}},
        },
        "data": {"class_path": "datamodules.shapes.ShapesDataModule", "init_args": {"num_samples": 4}},
    }
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path


def test_grid_expands_to_every_combination():
    axes = grid.parse_grid(GRID)
    assert [a.name for a in axes] == ["model", "head_filter", "relu"]
    assert list(axes[2].levels) == ["true", "false"]
    found = grid.variants(axes)
    assert len(found) == len(GRID["model"]) * len(GRID["head_filter"]["values"]) * len(GRID["relu"]["values"])
    assert len({grid.slug(v) for v in found}) == len(found)
    settings = grid.settings_of(axes, {"model": "b", "head_filter": "top-0.05", "relu": "false"})
    assert settings == {
        **GRID["model"]["b"],
        "model.init_args.methods.dexar.head_filter": "top-0.05",
        "model.init_args.methods.dexar.relu": False,
    }


@pytest.mark.parametrize(
    ("spec", "variant", "message"),
    [
        ({"x": ["a"]}, {}, "experiment.grid.x"),
        ({"x": {"values": [1]}}, {}, "'key'"),
        ({"x": {"key": "a.b", "values": [1, "1"]}}, {}, "distinct"),
        (GRID, {"nope": "a"}, "no grid axis 'nope'"),
        (GRID, {"model": "c"}, "not a level of axis 'model'"),
    ],
)
def test_bad_grids_and_variants_name_the_key(spec, variant, message):
    with pytest.raises(grid.GridError, match=message):
        grid.settings_of(grid.parse_grid(spec, "exp.yaml"), variant, "exp.yaml")


def test_variant_sets_options_run_dir_and_wandb_name_and_tags(tmp_path):
    config = _config(tmp_path)
    cli = main(
        [
            "--config",
            str(config),
            "--variant.model",
            "b",
            "--variant.head_filter",
            "top-0.05",
            "--variant.relu",
            "false",
        ],
        run=False,
    )
    dexar = cli.model.methods["dexar"]
    assert (dexar.head_filter, dexar.relu) == ("top-0.05", False)
    assert cli.model.hparams.model == "m-b"
    assert "attention" in cli.model.methods  # the rest of the methods dict is kept
    slug = "model-b_head_filter-top-0.05_relu-false"
    assert cli.trainer.default_root_dir == str(tmp_path / "runs" / slug)
    init = cli.trainer.logger._wandb_init
    assert init["name"] == f"table3/{slug}" and init["group"] == "g" and init["dir"] == str(tmp_path / "runs" / slug)
    assert init["tags"] == ["base", "table3", "model=b", "head_filter=top-0.05", "relu=false"]
    assert not (tmp_path / "runs").exists()  # variant.json is written by `predict` only


def test_unknown_variant_level_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="'avg' is not a level of axis 'head_filter'"):
        main(["--config", str(_config(tmp_path)), "--variant.head_filter", "avg"], run=False)


def test_grid_key_missing_from_config_is_reported(tmp_path):
    config = _config(tmp_path, {"x": {"key": "model.init_args.nothing.here", "values": [1]}})
    with pytest.raises(SystemExit, match="model.init_args.nothing"):
        main(["--config", str(config), "--variant.x", "1"], run=False)


def test_dexar_grid_prints_one_command_per_variant(tmp_path, capsys):
    config = _config(tmp_path)
    assert cli_main(["grid", str(config), "--data.root", "/d"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = grid.variants(grid.parse_grid(GRID))
    assert len(lines) == len(expected)
    assert lines[0].startswith(f"python train_eval.py predict --config {config} --variant.model a")
    assert all(line.endswith("--data.root /d") for line in lines)


def test_dexar_grid_writes_a_wandb_sweep(tmp_path):
    config, out = _config(tmp_path), tmp_path / "sweep.yaml"
    assert cli_main(["grid", str(config), "--sweep", str(out)]) == 0
    sweep = yaml.safe_load(out.read_text())
    assert sweep["method"] == "grid"
    axes = grid.parse_grid(GRID)
    assert sweep["parameters"] == {f"variant.{a.name}": {"values": list(a.levels)} for a in axes}
    assert "${args}" in sweep["command"] and str(config) in sweep["command"]


def test_variant_record_places_the_run(tmp_path):
    record = json.loads(grid.variant_record(["c.yaml"], {"table": "table3", "attrs": {"dataset": "x"}}, {"a": "1"}))
    assert record == {"configs": ["c.yaml"], "table": "table3", "attrs": {"dataset": "x"}, "variant": {"a": "1"}}


def test_predict_writes_variant_json_through_a_callback(tmp_path, monkeypatch):
    """``variant.json`` comes from the VariantRecord callback when the run starts, never from parsing."""
    from lightning.pytorch import Trainer

    from callbacks import VariantRecord

    def start_only(self, *args, **kwargs):  # the record's setup hook, without explaining anything
        records = [c for c in self.callbacks if isinstance(c, VariantRecord)]
        assert len(records) == 1
        records[0].setup(self, None, "predict")

    monkeypatch.setattr(Trainer, "predict", start_only)
    spec = {"relu": {"key": "model.init_args.methods.dexar.relu", "values": [False]}}  # the bundled model
    args = ["--config", str(_config(tmp_path, spec)), "--variant.relu", "false", "--trainer.logger", "false"]
    cli = main(args, run=False)
    assert not any(isinstance(c, VariantRecord) for c in cli.trainer.callbacks)
    assert not (tmp_path / "runs").exists()
    main(["predict", *args])
    written = list((tmp_path / "runs").rglob("variant.json"))
    assert len(written) == 1 and written[0].parent.name == "relu-false"
    record = json.loads(written[0].read_text())
    assert record["table"] == "table3" and record["variant"] == {"relu": "false"}


ROOT = Path(__file__).resolve().parents[2]
TABLE2 = ROOT / "configs" / "paper" / "table2_segmentation.yaml"


def test_dexar_grid_emits_the_composition_of_a_paper_config(tmp_path, monkeypatch, capsys):
    """Every command carries the header's --config flags, in order; a relative config gives relative flags
    that resolve from where `dexar grid` runs, and the command they make parses from there."""
    composed = [ROOT / "configs" / "base" / "predict.yaml", ROOT / "configs" / "data" / "pascal_voc.yaml", TABLE2]
    assert cli_main(["grid", str(TABLE2), "--data.root", "/d"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    flags = " ".join(f"--config {c}" for c in composed)
    assert len(lines) == 4 and all(
        line.startswith(f"python train_eval.py predict {flags} --variant.model ") for line in lines
    )
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(TABLE2)
    (command, *_) = grid.commands(relative, ["--data.root", "/d"])
    assert command[4:9:2] == [os.path.relpath(c) for c in composed] and set(command[3:9:2]) == {"--config"}
    cli = main(command[3:], run=False)  # from another directory: the configs are found by path
    assert cli.config.trainer.default_root_dir == "runs/paper/table2_segmentation/model-llava-1.5"
    assert cli.config.trainer.accelerator == "auto" and cli.config.data.class_path.endswith("PascalVOCDataModule")
    sweep = grid.sweep(relative)
    assert sweep["command"][4:10] == command[3:9]


def test_header_command_must_end_with_the_config_itself(tmp_path, capsys):
    config = tmp_path / "configs" / "paper" / "mine.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(
        "# Run: python train_eval.py predict --config configs/paper/other.yaml\nexperiment: {table: table2}\n"
    )
    assert cli_main(["grid", str(config)]) == 2
    assert "must end with --config" in capsys.readouterr().err
    config.write_text(
        "# Run: python train_eval.py predict --config configs/base/none.yaml \\\n"
        "#          --config configs/paper/mine.yaml\nexperiment: {table: table2}\n"
    )
    assert cli_main(["grid", str(config)]) == 2
    assert "names configs/base/none.yaml, which is not in" in capsys.readouterr().err
