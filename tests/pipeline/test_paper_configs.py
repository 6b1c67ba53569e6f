"""Every configs/paper and configs/ablations YAML parses on top of the default predict config, model unloaded."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import yaml

from dexar.methods import build_method
from dexar.pipeline import experiments as grid
from dexar.pipeline.report.tables import TABLES
from train_eval import main

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs" / "paper"
CONFIGS = sorted(PAPER.rglob("*.yaml"))
HUB_IDS = {  # appendix B of the paper
    "llava-hf/llava-1.5-7b-hf",
    "llava-hf/bakLlava-v1-hf",
    "google/paligemma-3b-pt-224",
    "florence-community/Florence-2-base",  # microsoft/Florence-2-base (appendix B) ported to native transformers
}


@functools.cache
def _load(path: Path):
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(path)]
    if path.parent == PAPER:  # real datasets; Shapes (paper/shapes, ablations) is generated
        args += ["--data.root", "/data/nowhere"]
    return main(args, run=False)


def test_every_paper_table_has_a_config_and_tables_2_to_5_a_shapes_one():
    tables = {grid.load_experiment(p).get("table") for p in CONFIGS if p.parent == PAPER}
    assert tables == set(TABLES)
    shapes = {grid.load_experiment(p).get("table") for p in (PAPER / "shapes").glob("*.yaml")}
    assert {"table2", "table3", "table4", "table5"} <= shapes


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(PAPER)))
def test_paper_config_loads_without_the_model(path):
    cli = _load(path)
    module, experiment = cli.model, cli.config.experiment
    assert module.vlm is None, "the model must not be loaded when the config is parsed"
    spec = TABLES[experiment["table"]]
    configured = set(next(iter(module.metric_sets.values())))
    assert {m for m, _, _ in spec.metrics} - {"sec_per_img", "shared_sec_per_img"} <= configured
    assert all(metric.input_kind for group in module.metric_sets.values() for metric in group.values())
    assert set(spec.rows + spec.groups) - {"method"} <= set(experiment.get("attrs", {})) | set(experiment["grid"])
    assert set(experiment.get("attrs", {}).get("method_attrs", {})) <= set(module.metric_sets)  # labels exist
    logger = cli.config.trainer.logger
    assert logger.class_path.endswith("WandbLogger")
    assert logger.init_args.group and experiment["table"] in logger.init_args.tags
    assert [type(c).__name__ for c in cli.trainer.callbacks][:4] == [
        "ResultsWriter",
        "HeatmapWriter",
        "Timing",
        "WandbMedia",
    ]
    if path.parent.name == "shapes":
        assert cli.config.trainer.accelerator == "cpu"
    else:
        levels = [lv for axis in grid.parse_grid(experiment["grid"]) for lv in axis.levels.values()]
        models = {module.hparams.model} | {
            lv["model.init_args.model"] for lv in levels if "model.init_args.model" in lv
        }
        assert models <= HUB_IDS


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent == PAPER], ids=lambda p: p.stem)
def test_paper_data_block_matches_its_data_config(path):
    data = yaml.safe_load(path.read_text())["data"]
    name = {"ImageNetDataModule": "imagenet", "VQAv2DataModule": "vqav2", "PascalVOCDataModule": "pascal_voc"}
    name |= {"PascalVOCQADataModule": "pascal_voc_qa", "ImageNetCDataModule": "imagenet_c"}
    reference = yaml.safe_load(
        (ROOT / "configs" / "data" / f"{name[data['class_path'].rsplit('.', 1)[1]]}.yaml").read_text()
    )
    assert data["class_path"] == reference["data"]["class_path"]
    ours = {k: v for k, v in data["init_args"].items() if k != "batch_size"}
    theirs = {k: v for k, v in reference["data"]["init_args"].items() if k != "batch_size"}
    assert ours == theirs


@pytest.mark.parametrize("path", [p for p in CONFIGS if grid.load_experiment(p).get("grid")], ids=lambda p: p.stem)
def test_every_grid_variant_sets_existing_keys_to_valid_options(path):
    cli = _load(path)
    axes = grid.parse_grid(cli.config.experiment["grid"], str(path))
    for variant in grid.variants(axes):
        config = copy.deepcopy(cli.config)
        for key, value in grid.settings_of(axes, variant).items():
            grid.set_dotted(config, key, value)
        for label, options in config.model.init_args.methods.items():
            options = dict(options)
            build_method(options.pop("method", label), **options)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "ablations").glob("*.yaml")), ids=lambda p: p.stem)
def test_ablation_config_loads_without_the_model(path):
    cli = _load(path)
    assert cli.model.vlm is None, "the model must not be loaded when the config is parsed"
    assert cli.config.trainer.accelerator == "cpu"
    assert [type(c).__name__ for c in cli.trainer.callbacks][:3] == ["ResultsWriter", "HeatmapWriter", "Timing"]
    assert cli.model.methods and cli.model.metric_sets
