"""``variant.json``: which paper table, attributes and grid variant a run is, written into its run directory."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class VariantRecord(Callback):
    """Write ``record`` (:func:`dexar.pipeline.experiments.apply_variant`'s) as ``variant.json`` at setup, rank 0.

    ``dexar report`` places a run's results by it. The CLI adds this callback to ``predict`` runs of a config
    with an ``experiment`` section, so parsing a config (``run=False``, ``dexar grid``) writes nothing.

    Args:
        record: ``configs``, ``table``, ``attrs`` and ``variant`` of the run.

    """

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.record = dict(record)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            (root / "variant.json").write_text(json.dumps(self.record, indent=2))
