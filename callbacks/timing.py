"""``Timing``: seconds per image for each phase (generation, shared trace, each method, evaluation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class Timing(Callback):
    """Accumulates the explainer's per-phase laps over a predict run and reports seconds per image.

    Phases: ``generation`` (greedy answers, when generated), ``trace`` (the one shared forward and
    backward), ``method/<label>`` (each method's own work on the trace) and ``evaluation/<label>``
    (metric updates, when the module evaluates). Totals are summed over processes before dividing by
    the number of images, so the figure is per image whatever the number of GPUs.

    Args:
        output_dir: Where ``timing.json`` is written on rank 0; default: the trainer's ``default_root_dir``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self.seconds: dict[str, float] = {}
        self.images = 0
        self.per_image: dict[str, float] = {}

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds, self.images, self.per_image = {}, 0, {}

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        laps = dict(getattr(getattr(pl_module, "explainer", None), "last_timings", {}) or {})
        laps.update(getattr(pl_module, "last_eval_timings", {}) or {})
        for name, sec in laps.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + sec
        # a resumed run skips samples done before: count only those computed now
        done = getattr(outputs, "sample_ids", None)
        self.images += len(batch) if done is None else len(done) + len(getattr(outputs, "failures", ()))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = sorted(self.seconds)
        totals = torch.tensor([self.seconds[n] for n in names] + [float(self.images)], dtype=torch.float64)
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals.to(pl_module.device), reduce_op="sum").cpu()
        images = max(1.0, float(totals[-1]))
        self.per_image = {n: float(totals[i]) / images for i, n in enumerate(names)}
        if trainer.is_global_zero:
            print("seconds per image: " + ", ".join(f"{n} {s:.4f}" for n, s in self.per_image.items()))
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"time_per_image/{n}": s for n, s in self.per_image.items()})
            if trainer.default_root_dir or self.output_dir:
                path = Path(self.output_dir or trainer.default_root_dir)
                path.mkdir(parents=True, exist_ok=True)
                (path / "timing.json").write_text(json.dumps({"seconds_per_image": self.per_image, "images": images}))
