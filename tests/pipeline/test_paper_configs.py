"""Every configs/paper and configs/ablations YAML parses as its header composes it, model unloaded."""

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


SHIPPED = CONFIGS + sorted((ROOT / "configs" / "ablations").glob("*.yaml"))
DATA = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "configs" / "data").glob("*.yaml")}


@functools.cache
def _load(path: Path):
    """The config parsed as its header's command runs it (after the default predict configs)."""
    args = grid.config_flags(path)
    if path.parent == PAPER:  # real datasets; Shapes (paper/shapes, ablations) is generated
        args += ["--data.root", "/data/nowhere"]
    return main(args, run=False)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_header_composes_the_base_then_the_dataset_then_the_config(path):
    """The header's command: configs/base/predict.yaml first, a paper config on a real dataset on its data config."""
    names = [Path(c).relative_to(ROOT).as_posix() for c in grid.composition(path)]
    assert names[0] == "configs/base/predict.yaml" and names[-1] == path.relative_to(ROOT).as_posix()
    data = [n for n in names if n.startswith("configs/data/")]
    assert names == ["configs/base/predict.yaml", *data, names[-1]] and len(data) == (path.parent == PAPER)
    own = yaml.safe_load(path.read_text())
    assert "seed_everything" not in own  # configs/base/predict.yaml's, as the trainer and logger blocks below
    assert set(own["trainer"]) <= {"accelerator", "default_root_dir", "logger", "callbacks"}
    assert set(own["trainer"]["logger"]["init_args"]) == {"group", "tags"}
    assert "callbacks" not in own["trainer"] or path.parent.name == "ablations"  # ablations: fewer overlays, no media


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
def test_paper_run_reads_its_data_config(path):
    """The dataset comes from configs/data (no copy to keep in sync): its class and every init arg, but
    ``root`` (given on the command line) and the few the paper config sets itself (only ``batch_size``)."""
    (data_config,) = [Path(c).stem for c in grid.composition(path) if Path(c).parent.name == "data"]
    own = (yaml.safe_load(path.read_text()).get("data") or {}).get("init_args") or {}
    assert set(own) <= {"batch_size"} and "class_path" not in (yaml.safe_load(path.read_text()).get("data") or {})
    reference = DATA[data_config]["data"]
    parsed = _load(path).config.data
    assert parsed.class_path == reference["class_path"]
    expected = {**reference["init_args"], **own, "root": "/data/nowhere"}
    assert {k: parsed.init_args[k] for k in expected} == expected


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
