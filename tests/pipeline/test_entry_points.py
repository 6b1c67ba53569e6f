"""`train_eval.py` as a user runs it: one-line input errors before any W&B run, the run directory as the one place.

Bad dataset roots go through ``main()`` (every datamodule × every kind of bad root) and through the script
itself in a subprocess; the run directory is checked from another working directory, also under ``ddp_spawn``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp
import wandb
from torch.multiprocessing.spawn import ProcessRaisedException

from datamodules.fixtures import make_imagenet, make_imagenet_c, make_voc, make_vqav2
from dexar.adapters import DexarInputError
from dexar.pipeline.module import ExplainerModule
from train_eval import main, results_first, spawned_user_error

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "configs" / "data"
NOISE = ("LeafSpec", "💡 Tip", "past_key_values", "Images sizes do not match")
"""Messages a user cannot act on that no run may print (issue 13.11)."""


def _unknown(root: Path) -> Path:
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "cat.jpg").write_bytes(b"not a dataset")
    (root / "notes.txt").write_text("hello")
    return root


def _partial(name: str, root: Path) -> Path:
    """A real layout with one part broken: the kind of mistake a copy or an extraction leaves behind."""
    if name == "imagenet":
        (make_imagenet(root, "folders").root / "val" / "cats").mkdir()
    elif name == "vqav2":
        (make_vqav2(root).root / "v2_mscoco_val2014_annotations.json").unlink()
    elif name in ("pascal_voc", "pascal_voc_qa"):
        shutil.rmtree(make_voc(root).root / "VOCdevkit" / "VOC2012" / "SegmentationClass")
    else:
        shutil.rmtree(make_imagenet_c(root, corruptions=("pixelate", "brightness")).root / "brightness")
    return root


BAD_ROOTS = {
    "missing": lambda name, root: root,
    "empty": lambda name, root: root.mkdir(parents=True) or root,
    "unknown": lambda name, root: _unknown(root),
    "partial": _partial,
}
DATASETS = sorted(p.stem for p in DATA.glob("*.yaml"))


def _args(name: str, root: Path, run: Path) -> list[str]:
    return [
        "predict",
        "--config",
        str(DATA / f"{name}.yaml"),
        "--data.root",
        str(root),
        "--trainer.default_root_dir",
        str(run),
    ]


@pytest.mark.parametrize("case", sorted(BAD_ROOTS))
@pytest.mark.parametrize("name", DATASETS)
def test_bad_root_is_an_error_of_two_lines_before_any_run(name, case, tmp_path, monkeypatch):
    cwd, run = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = BAD_ROOTS[case](name, tmp_path / "root")
    with pytest.raises(SystemExit) as exit_:
        main(_args(name, root, run))
    message = str(exit_.value.code)
    assert message.startswith("error: ") and str(root) in message and message.count("\n") <= 1, message
    assert not run.exists() and os.listdir(cwd) == []  # no W&B run, no run directory, nothing in the cwd


def test_bad_roots_through_the_script_print_at_most_three_lines(tmp_path):
    """The real entry point, one bad root per datamodule (run side by side): exit 1, ≤ 3 lines, nothing written."""
    procs = {}
    for name, case in zip(DATASETS, ["missing", "partial", "empty", "unknown", "partial"], strict=True):
        cwd, root = tmp_path / name / "cwd", BAD_ROOTS[case](name, tmp_path / name / "root")
        cwd.mkdir(parents=True)
        command = [sys.executable, str(ROOT / "train_eval.py"), *_args(name, root, tmp_path / name / "run")]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs[name] = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        out = proc.communicate(timeout=600)[0].decode()
        lines = out.strip().splitlines()
        assert proc.returncode == 1 and len(lines) <= 3 and any(x.startswith("error: ") for x in lines), (name, out)
        assert "Traceback" not in out and "wandb" not in out
        assert os.listdir(tmp_path / name / "cwd") == [] and not (tmp_path / name / "run").exists()


class NothingEvaluated(DexarInputError):
    """Stands for the pipeline's own "nothing evaluated" error: any DexarInputError subclass."""


def _raise_nothing_evaluated(index: int) -> None:
    raise NothingEvaluated("no sample was evaluated (all 2 unreadable)")


def test_input_error_at_epoch_end_is_one_line(tmp_path, monkeypatch):
    def fail(self):
        raise NothingEvaluated("no sample was evaluated (all 2 unreadable)")

    monkeypatch.setattr(ExplainerModule, "on_predict_epoch_end", fail)
    args = ["predict", "--data.init_args.num_samples", "1", "--model.init_args.methods", "{dexar: {}}"]
    args += ["--model.init_args.metrics", "null", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exit_.value.code == "error: no sample was evaluated (all 2 unreadable)"


def test_input_error_of_a_spawned_process_is_recognised():
    """ddp_spawn hands the parent a rank's traceback as text: an input error in it is still one line."""
    with pytest.raises(ProcessRaisedException) as err:
        mp.start_processes(_raise_nothing_evaluated, nprocs=1, start_method="spawn")
    assert spawned_user_error(str(err.value)) == "no sample was evaluated (all 2 unreadable)"
    bug = str(err.value).replace(f"{__name__}.NothingEvaluated", "ValueError").replace("no sample", "a bug")
    assert spawned_user_error(bug) is None  # not bad input: the traceback stays


def test_logger_save_dir_elsewhere_is_refused(tmp_path):
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=r"save_dir \(.*elsewhere\) is not the run directory"):
        main([*args, "--trainer.logger.init_args.save_dir", str(tmp_path / "elsewhere")], run=False)
    cli = main(args, run=False)
    assert cli.trainer.logger.save_dir == str(tmp_path / "run") and cli.trainer.log_dir == str(tmp_path / "run")


def _small_run(run: Path) -> list[str]:
    metrics = "{epg: {class_path: metrics.EnergyPointingGame}, pos_auc: {class_path: metrics.PerturbationAUC}}"
    args = ["predict", "--trainer.default_root_dir", str(run), "--data.init_args.num_samples", "4"]
    args += ["--data.init_args.batch_size", "2", "--model.init_args.methods", "{dexar: {}}"]
    return [*args, "--model.init_args.metrics", metrics, "--trainer.enable_progress_bar", "false"]


def _assert_whole_run_in(run: Path) -> None:
    assert (run / "config.yaml").is_file() and (run / "results.json").is_file()
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert any(offline.glob("run-*.wandb")) and any((offline / "files" / "media" / "images").rglob("*.png"))


def test_run_directory_is_the_one_place(tmp_path, monkeypatch):
    """Only --trainer.default_root_dir, started from another directory: config.yaml and W&B land in the run dir."""
    cwd, run = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    main(_small_run(run))
    wandb.finish()
    assert os.listdir(cwd) == []
    _assert_whole_run_in(run)


@pytest.mark.slow
def test_run_directory_is_the_one_place_under_ddp_spawn_and_quiet(tmp_path):
    """The script under ddp_spawn (2 processes) from another directory: media too stay in the run dir; no noise."""
    cwd, run = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    command = [sys.executable, str(ROOT / "train_eval.py"), *_small_run(run)]
    command += ["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.listdir(cwd) == []
    _assert_whole_run_in(run)
    output = done.stdout + done.stderr
    assert not [n for n in NOISE if n in output], output[-3000:]


def test_the_cli_defaults_to_inference_mode_off_and_validates_metric_names(capsys):
    """No config repeats ``inference_mode: false`` (the CLI's default); a misspelt metric class fails at parse
    time with an error naming the ``metrics`` key and the class path."""
    assert not any("inference_mode" in p.read_text() for p in (ROOT / "configs").rglob("*.yaml"))
    base = ["--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.logger", "false"]
    cli = main(base, run=False)
    assert cli.trainer.predict_loop.inference_mode is False
    assert all(hasattr(m, "update") for m in cli.model.metric_sets["dexar"].values())
    with pytest.raises(SystemExit):
        main([*base, "--model.init_args.metrics", "{soft: {class_path: metrics.SoftIOU}}"], run=False)
    err = capsys.readouterr().err
    assert 'Parser key "metrics"' in err and "metrics.SoftIOU" in err


def test_every_predict_run_gets_one_results_writer_first():
    """``results.json`` needs no config entry: the CLI puts one ResultsWriter before every other callback,
    the configured one when a config lists it (anywhere), else a new one."""
    from callbacks import HeatmapWriter, ResultsWriter, Timing

    heat, timing, configured = HeatmapWriter(), Timing(), ResultsWriter(output_dir="elsewhere")
    added = results_first([heat, timing])
    assert isinstance(added[0], ResultsWriter) and added[1:] == [heat, timing]
    assert results_first([heat, configured, timing]) == [configured, heat, timing]
    assert results_first([configured, heat, ResultsWriter()]) == [configured, heat]
    cli = main(["--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.logger", "false"], run=False)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names[:4] == ["ResultsWriter", "HeatmapWriter", "Timing", "WandbMedia"] and names.count("ResultsWriter") == 1
