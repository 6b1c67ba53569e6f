"""Every configs/data/<name>.yaml composes with the predict config and sets up on its fixture."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from callbacks.heatmap_writer import read_shards
from datamodules.fixtures import make_imagenet, make_imagenet_c, make_voc, make_vqav2
from datamodules.imagenet_c import PAPER_CORRUPTIONS
from dexar.shapes_model import SHAPES_CHECKPOINT
from train_eval import main

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "imagenet": ("ImageNetDataModule", lambda p: make_imagenet(p, "flat")),
    "vqav2": ("VQAv2DataModule", make_vqav2),
    "pascal_voc": ("PascalVOCDataModule", make_voc),
    "pascal_voc_qa": ("PascalVOCQADataModule", make_voc),
    "imagenet_c": ("ImageNetCDataModule", lambda p: make_imagenet_c(p, corruptions=PAPER_CORRUPTIONS, per_class=1)),
}


def test_every_data_config_is_tested():
    assert {p.stem for p in (ROOT / "configs" / "data").glob("*.yaml")} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_data_config_composes_with_predict_config(name, tmp_path):
    class_name, build = CASES[name]
    fixture = build(tmp_path / "data")
    configs = [ROOT / "configs" / "demo.yaml", ROOT / "configs" / "data" / f"{name}.yaml"]
    args = [a for c in configs for a in ("--config", str(c))] + ["--data.root", str(fixture.root)]
    cli = main(args, run=False)
    dm = cli.datamodule
    assert type(dm).__name__ == class_name
    assert dm.hparams.root == str(fixture.root) and dm.hparams.seed == 0 and dm.hparams.split == "val"
    assert cli.trainer.predict_loop is not None and type(cli.model).__name__ == "ExplainerModule"
    dm.setup("predict")
    assert len(dm.dataset) > 0
    first = dm.dataset[0]
    assert first.id and (getattr(first, "image", None) is not None or first.reason)


def test_unreadable_image_is_counted_in_results_and_never_fatal(tmp_path):
    """A truncated JPEG mid-batch: predict finishes, writes the rest, and results.json counts it."""
    fixture = make_imagenet(tmp_path / "data", "folders", per_class=2, broken=(1,))
    run = tmp_path / "run"
    configs = [ROOT / "configs" / "demo.yaml", ROOT / "configs" / "data" / "imagenet.yaml"]
    args = [a for c in configs for a in ("--config", str(c))]
    args += ["--data.root", str(fixture.root), "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "3"]
    args += ["--trainer.default_root_dir", str(run), "--trainer.logger", "false"]
    args += ["--model.init_args.metrics", "null"]
    args += ["--model.init_args.answer_source", "generate", "--model.init_args.max_new_tokens", "3"]
    main(["predict", *args])
    payload = json.loads((run / "results.json").read_text())
    assert payload["unreadable_samples"] == len(fixture.broken) == 1
    shards = read_shards(run)
    assert set(shards["dexar"]) == {f"imagenet-val-{k}" for k in fixture.keys if k not in fixture.broken}
    assert len(list((run / "overlays" / "dexar").iterdir())) == len(fixture.keys) - 1


def _readme_dataset_commands() -> dict[str, list[str]]:
    """README "Datasets": data config name -> the arguments of its `python train_eval.py predict` command."""
    commands = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        found = re.match(r"^python train_eval\.py predict --config configs/data/(\w+)\.yaml ", line.strip())
        if found:
            commands[found[1]] = shlex.split(line)[2:]  # from `predict` on
    return commands


def test_readme_has_one_command_per_data_config():
    assert set(_readme_dataset_commands()) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_readme_dataset_command_gives_finite_metrics_on_fixtures(name, tmp_path):
    """The README's command, root and checkpoint replaced by a fixture and the bundled model: every metric finite."""
    fixture = CASES[name][1](tmp_path / "data")
    args = _readme_dataset_commands()[name]
    args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
    args[args.index("--data.root") + 1] = str(fixture.root)
    args[args.index("--model.init_args.model") + 1] = SHAPES_CHECKPOINT
    run = tmp_path / "run"
    args += ["--data.init_args.num_samples", "2", "--data.init_args.batch_size", "2"]
    if name == "imagenet_c":  # 3 of the 6 corruptions are enough here
        args += ["--data.init_args.corruptions", "[fog, pixelate, brightness]", "--data.init_args.num_samples", "1"]
    args += ["--data.init_args.num_workers", "0", "--trainer.default_root_dir", str(run)]
    args += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    main(args)
    results = json.loads((run / "results.json").read_text())["results"]
    assert results and all(results.values())
    for label, group in results.items():
        for metric, stats in group.items():
            assert math.isfinite(stats["value"]) and stats["count"] > 0, (name, label, metric, stats)
