"""LightningCLI entry point: ``fit`` trains the Shapes model, ``predict`` explains (and evaluates).

Examples:
    python train_eval.py predict                      # bundled Shapes model on Shapes, CPU
    python train_eval.py fit --config configs/shapes/fit.yaml
    python train_eval.py predict --config configs/demo.yaml --trainer.devices 2 --trainer.strategy ddp

"""

from __future__ import annotations

from pathlib import Path

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

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


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` when given."""
    return LightningCLI(
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
