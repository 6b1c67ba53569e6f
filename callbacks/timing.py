"""``Timing``: seconds per image for each phase (generation, shared trace, each method, evaluation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from dexar import jsonsafe
from dexar.distributed import gather_objects
from dexar.phase_timing import PhaseTotals, method_seconds


class Timing(Callback):
    """Accumulates each batch's per-phase seconds over a predict run and reports seconds per image.

    Phases (:mod:`dexar.phase_timing`): ``generation``, ``encoding``, ``trace`` (the one trace shared
    by every method), ``method/<label>`` (each method's own work on it), ``alone/<label>`` (the method
    run on its own, on the first ``model.time_alone_batches`` batches of each process) and
    ``evaluation/<label>``. Every phase divides its seconds by the images of the batches that ran it,
    summed over processes and over the earlier attempts of a resumed run (their shards keep each
    batch's timing; the module hands over those of the shards its process owns).

    ``timing.json``: ``seconds_per_image`` (phase → s), ``phases`` (phase → total ``seconds`` and
    ``images``), ``images`` (images timed) and ``methods``: per method label, ``sec_per_img`` (the
    paper's: the method alone) and ``shared_sec_per_img`` (its cost in this run: shared trace + its own
    work). The same go to the logger as ``time_per_image/<phase>``, ``time_per_image/sec_per_img/<label>``
    and ``time_per_image/shared_sec_per_img/<label>``.

    Args:
        output_dir: Where ``timing.json`` is written on rank 0; default: the trainer's ``default_root_dir``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self.totals = PhaseTotals()
        self.per_image: dict[str, float] = {}
        self.methods: dict[str, dict[str, float]] = {}

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.totals, self.per_image, self.methods = PhaseTotals(), {}, {}

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # only what was computed now: samples done by an earlier attempt or failed are not timed
        self.totals.add(getattr(outputs, "timing", {}) or {}, int(getattr(outputs, "timed", 0) or 0))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mine = PhaseTotals().merge(self.totals).merge(getattr(pl_module, "earlier_timing", None) or PhaseTotals())
        totals = PhaseTotals.total(gather_objects(mine))  # any phases on any rank: no shape to agree on
        self.per_image = totals.per_image()
        self.methods = method_seconds(self.per_image)
        if not trainer.is_global_zero:
            return
        print("seconds per image: " + ", ".join(f"{n} {s:.4f}" for n, s in self.per_image.items()))
        if trainer.logger is not None:
            logged = {f"time_per_image/{n}": s for n, s in self.per_image.items()}
            for label, entry in self.methods.items():
                if "alone" in entry:
                    logged[f"time_per_image/sec_per_img/{label}"] = entry["alone"]
                if "shared" in entry:
                    logged[f"time_per_image/shared_sec_per_img/{label}"] = entry["shared"]
            trainer.logger.log_metrics(logged)
        path = Path(self.output_dir or trainer.default_root_dir)
        path.mkdir(parents=True, exist_ok=True)
        payload = {
            "seconds_per_image": self.per_image,
            "images": max(totals.images.values(), default=0),
            "phases": {p: {"seconds": totals.seconds[p], "images": totals.images[p]} for p in sorted(totals.seconds)},
            "methods": {
                label: {
                    key: entry[src]
                    for key, src in (("sec_per_img", "alone"), ("shared_sec_per_img", "shared"))
                    if src in entry
                }
                for label, entry in self.methods.items()
            },
        }
        (path / "timing.json").write_text(jsonsafe.dumps(payload, indent=2))
