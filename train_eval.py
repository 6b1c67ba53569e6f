"""LightningCLI entry point: ``fit`` trains the Shapes model, ``predict`` explains (and evaluates).

Examples:
    python train_eval.py predict                      # bundled Shapes model on Shapes, CPU
    python train_eval.py fit --config configs/shapes/fit.yaml
    python train_eval.py predict --config configs/demo.yaml --trainer.devices 2 --trainer.strategy ddp

"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from dexar.grid import GridError, apply_variant

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIGS = {
    "fit": [str(CONFIGS / "shapes" / "fit.yaml")],
    "predict": [str(CONFIGS / "demo.yaml")],
}


class LoggedConfig(SaveConfigCallback):
    """Writes ``config.yaml`` to the run directory and logs the full resolved config to the logger."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_validation=True))
            trainer.logger.log_hyperparams({"cli": config})


class DexarCLI(LightningCLI):
    """LightningCLI plus the paper-run keys ``experiment`` (table, attrs, grid) and ``variant`` (see ``dexar.grid``)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--experiment",
            type=dict[str, Any] | None,
            default=None,
            help="paper experiment: table (dexar report key), attrs, grid (axis -> levels); see dexar.grid",
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
            apply_variant(config, write=self.subcommand == "predict")
        except GridError as err:  # one line, no traceback: the message names the file and key at fault
            raise SystemExit(f"error: {err}") from None


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` when given."""
    return DexarCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={cmd: {"default_config_files": files} for cmd, files in DEFAULT_CONFIGS.items()},
        save_config_callback=LoggedConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
