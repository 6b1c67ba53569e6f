"""LightningCLI entry point: ``fit`` trains the Shapes model, ``predict`` explains (and evaluates).

Examples:
    python train_eval.py predict                      # bundled Shapes model on Shapes, CPU
    python train_eval.py fit --config configs/shapes/fit.yaml
    python train_eval.py predict --config configs/demo.yaml --trainer.devices 2 --trainer.strategy ddp
    python train_eval.py predict --config configs/base/predict.yaml --config configs/data/pascal_voc.yaml \
        --config configs/paper/table2_segmentation.yaml --data.root /data/voc

``predict`` starts from ``configs/base/predict.yaml`` (trainer, W&B logger, callbacks) and ``configs/demo.yaml``
(the Shapes demo); each ``--config`` overrides the ones before it (a paper config's header gives its command).

Bad input (a dataset root in no known layout, a checkpoint that cannot be loaded, any
:class:`~dexar.adapters.DexarInputError`) ends the run with one ``error: <message>`` and exit status 1,
no traceback. ``predict`` checks the data and the checkpoint before the Trainer and its logger start,
so such a run leaves no W&B run behind.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from torch.multiprocessing.spawn import ProcessRaisedException

from callbacks.results_writer import ResultsWriter
from callbacks.variant_record import VariantRecord
from datamodules.common import BenchmarkDataModule, DatasetLayoutError
from dexar.adapters import ADAPTERS, DexarInputError
from dexar.loading import resolve_dtype
from dexar.pipeline.experiments import GridError, apply_variant

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIGS = {
    "fit": [str(CONFIGS / "shapes" / "fit.yaml")],
    "predict": [str(CONFIGS / "base" / "predict.yaml"), str(CONFIGS / "demo.yaml")],
}
"""Config files parsed before any ``--config``, per subcommand (also by ``main(run=False)``: the ``predict`` ones)."""
USER_ERRORS = (DexarInputError, DatasetLayoutError)
"""Errors in what the user gave (data, checkpoint, prompt): printed as one ``error:`` message, exit 1."""

NOISE_WARNINGS = ((FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),)
"""Library warnings nobody running this CLI can act on (torch 2.13 deprecates a class Lightning still uses)."""
NOISE_LOGS = {
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip:",),
    "lightning.fabric.utilities.rank_zero": ("💡 Tip:",),
}
"""Logger name -> message prefixes dropped (Lightning's advertising banners)."""


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Filter the library messages of :data:`NOISE_WARNINGS` and :data:`NOISE_LOGS`, by message only.

    Called when this module is imported: that also covers the processes ``ddp_spawn`` starts, which
    import it again.
    """
    for category, message in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in NOISE_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))


quiet_known_noise()


class LoggedConfig(SaveConfigCallback):
    """Writes ``config.yaml`` to the run directory and logs the full resolved config to the logger."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_validation=True))
            trainer.logger.log_hyperparams({"cli": config})


def place_run_files(config: Any) -> None:
    """Make ``trainer.default_root_dir`` the one place every file of the run goes: loggers save there too.

    A logger's ``save_dir`` left at its default (``None`` or ``.``) is set to the run directory; one set
    to another directory is refused, since ``config.yaml``, the W&B run and the results would be split.

    Raises:
        SystemExit: A logger's ``save_dir`` names another directory (one line).
    """
    trainer = config.get("trainer")
    root = trainer.get("default_root_dir") if trainer is not None else None
    if not root:
        return
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        args = getattr(logger, "init_args", None)
        if args is None or "save_dir" not in args:
            continue
        current = args.get("save_dir")
        if current not in (None, "", ".") and Path(current) != Path(root):
            raise SystemExit(
                f"error: trainer.logger.init_args.save_dir ({current}) is not the run directory "
                f"trainer.default_root_dir ({root}): set only --trainer.default_root_dir, where all of a run goes"
            )
        args.save_dir = str(root)


def check_inputs(model: Any, datamodule: Any) -> None:
    """Index the dataset and open the checkpoint's config, before any Trainer or logger exists.

    Raises:
        SystemExit: The data or the checkpoint is unusable (one ``error:`` message).
    """
    if isinstance(datamodule, BenchmarkDataModule):
        try:
            datamodule.setup("predict")  # idempotent: the Trainer's own setup reuses the index
        except (*USER_ERRORS, ValueError, KeyError) as err:  # the data.* values: layout, subset, template
            raise SystemExit(f"error: {err.args[0] if isinstance(err, KeyError) else err}") from None
    hparams = getattr(model, "hparams", {})
    if "model" not in hparams:
        return
    try:
        resolve_dtype(hparams.get("dtype", "float32"))
        model_type = _model_type(str(hparams["model"]))
    except DexarInputError as err:
        raise SystemExit(f"error: {err}") from None
    if model_type not in ADAPTERS:
        raise SystemExit(f"error: unsupported model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")


def _model_type(source: str) -> str | None:
    """``model_type`` of a checkpoint directory or cached hub id (reads its config only)."""
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.from_pretrained(source), "model_type", None)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "local directory" if Path(source).exists() else "local directory or Hugging Face cache entry"
        raise DexarInputError(f"cannot load model {source!r} ({where}): {first}") from None


def spawned_user_error(trace: str) -> str | None:
    """The message of a :data:`USER_ERRORS` exception in the traceback text a ``ddp_spawn`` process sent back.

    The last ``module.Class: message`` line of the trace names the exception; ``None`` when it is not
    one of ours (the caller then re-raises the original error).
    """
    for line in reversed(trace.strip().splitlines()):
        found = re.match(r"^((?:\w+\.)+)(\w+): (.*)$", line)
        if not found:
            continue
        try:
            error_type = getattr(importlib.import_module(found[1].rstrip(".")), found[2])
        except (ImportError, AttributeError):
            return None
        is_ours = isinstance(error_type, type) and issubclass(error_type, USER_ERRORS)
        return found[3] if is_ours else None
    return None


class DexarCLI(LightningCLI):
    """LightningCLI plus the paper-run keys ``experiment`` (table, attrs, grid) and ``variant``.

    See ``dexar.pipeline.experiments``.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        # explanations need gradients: no config has to repeat it (a config or flag may still set True)
        parser.set_defaults({"trainer.inference_mode": False})
        parser.add_argument(
            "--experiment",
            type=dict[str, Any] | None,
            default=None,
            help="paper experiment: table (dexar report key), attrs, grid (axis -> levels); "
            "see dexar.pipeline.experiments",
        )
        parser.add_argument(
            "--variant",
            type=dict[str, str] | None,
            default=None,
            help="grid variant to run: --variant.<axis> <label> (list them with `dexar grid CONFIG`)",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        try:
            self.variant_record = apply_variant(config)
        except GridError as err:  # one line, no traceback: the message names the file and key at fault
            raise SystemExit(f"error: {err}") from None
        place_run_files(config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self.subcommand == "predict":  # before the Trainer: its logger starts a W&B run at setup
            check_inputs(self.model, self.datamodule)
            root = self.config[self.subcommand].trainer.get("default_root_dir")
            if root:  # W&B looks for a git root there when it starts
                Path(root).mkdir(parents=True, exist_ok=True)
                # processes ddp_spawn starts attach to the W&B run with settings from the environment only:
                # without this their media go to ./wandb
                os.environ["WANDB_DIR"] = str(Path(root).resolve())
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand in ("predict", None):
            trainer.callbacks = results_first(trainer.callbacks)
        if self.subcommand == "predict" and getattr(self, "variant_record", None) is not None:
            trainer.callbacks.append(VariantRecord(self.variant_record))  # variant.json, when the run starts
        if self.subcommand == "predict":
            # every result is in the run directory (shards, results.json); returned predictions would keep
            # every explanation of the run in memory on every process (LightningCLI keeps them under DDP)
            trainer.predict = functools.partial(trainer.predict, return_predictions=False)
        return trainer


def results_first(callbacks: list[Callback]) -> list[Callback]:
    """``callbacks`` with one :class:`~callbacks.ResultsWriter` first: a configured one, else a new one.

    Every ``predict`` run writes ``results.json``, whatever its config lists, and before any other callback's
    ``on_predict_end`` (a callback reading the file finds it complete).
    """
    writers = [c for c in callbacks if isinstance(c, ResultsWriter)]
    return (writers[:1] or [ResultsWriter()]) + [c for c in callbacks if not isinstance(c, ResultsWriter)]


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` when given.

    ``run=False`` parses and instantiates a ``predict`` run without a subcommand (``args`` without
    ``predict``): the same default configs, the same callbacks, nothing run.

    Raises:
        SystemExit: With ``error: <message>`` (status 1) for bad input (:data:`USER_ERRORS`), also when a
            ``ddp_spawn`` process raised it.
    """
    wandb_dir = os.environ.get("WANDB_DIR")
    try:
        return DexarCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs=(
                {cmd: {"default_config_files": files} for cmd, files in DEFAULT_CONFIGS.items()}
                if run
                else {"default_config_files": DEFAULT_CONFIGS["predict"]}
            ),
            save_config_callback=LoggedConfig,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except USER_ERRORS as err:
        raise SystemExit(f"error: {err}") from None
    except ProcessRaisedException as err:
        message = spawned_user_error(str(err))
        if message is None:
            raise
        raise SystemExit(f"error: {message}") from None
    finally:
        if run and wandb_dir is None:  # the run is over: leave the environment as it was
            os.environ.pop("WANDB_DIR", None)
        elif run:
            os.environ["WANDB_DIR"] = wandb_dir


if __name__ == "__main__":
    main()
