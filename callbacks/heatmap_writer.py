"""``HeatmapWriter``: per-rank, per-batch shards of maps (safetensors + JSON) and overlays."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors.torch import load_file, save_file

from dexar.explanation import Explanation
from dexar.schema import Sample


class HeatmapWriter(BasePredictionWriter):
    """Writes every predict batch to ``output_dir/shards/rank{R}/batch{I}.safetensors`` as it finishes.

    Each shard holds, per method and sample, ``token_maps``, ``token_weights`` and ``sequence_map``
    tensors; its metadata JSON lists tokens, ids, answers, flags and failures. A killed run keeps every
    finished batch. Overlays (sequence map + per-token strip) are written for dataset indices below
    ``num_overlays``, whatever the number of processes.

    Args:
        output_dir: Run directory; default: the trainer's ``default_root_dir``.
        num_overlays: Number of samples (by dataset index) that get PNG overlays.
    """

    def __init__(self, output_dir: str | None = None, num_overlays: int = 16) -> None:
        super().__init__(write_interval="batch")
        self._requested_dir = output_dir
        self.output_dir = Path(output_dir or "runs/predict")
        self.num_overlays = num_overlays
        self.written = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.output_dir = Path(self._requested_dir or trainer.default_root_dir)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: list[Sample],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        shard_dir = self.output_dir / "shards" / f"rank{trainer.global_rank:03d}"
        shard_dir.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        records: list[dict[str, Any]] = []
        for label, exps in prediction.explanations.items():
            for exp in exps:
                key = f"{label}/{exp.sample_id}"
                tensors[f"{key}/token_maps"] = exp.token_maps.float().contiguous()
                tensors[f"{key}/token_weights"] = exp.token_weights.float().contiguous()
                tensors[f"{key}/sequence_map"] = exp.sequence_map.float().contiguous()
                records.append({"label": label, **exp.to_dict()})
        unreadable = [{"id": m.id, "reason": m.reason} for m in getattr(batch, "skipped", ())]
        meta = {
            "records": records,
            "failures": prediction.failures,
            "unreadable": unreadable,
            "sample_ids": prediction.sample_ids,
        }
        save_file(tensors, str(shard_dir / f"batch{batch_idx:06d}.safetensors"), metadata={"json": json.dumps(meta)})
        self.written += len(prediction.sample_ids)
        self._overlays(prediction, batch, batch_indices)

    def _overlays(self, prediction: Any, batch: list[Sample], batch_indices: Sequence[int] | None) -> None:
        if batch_indices is None:
            return
        # Lightning's indices include samples the collate dropped as unreadable: drop them too.
        unreadable = {m.index for m in getattr(batch, "skipped", ())}
        batch_indices = [i for i in batch_indices if i not in unreadable]
        by_id = {s.id: (s, i) for s, i in zip(batch, batch_indices, strict=True)}
        for label, exps in prediction.explanations.items():
            for exp in exps:
                sample, index = by_id[exp.sample_id]
                if index < self.num_overlays:
                    exp_with_image: Explanation = Explanation(**{**exp.__dict__, "image": sample.image})
                    exp_with_image.save(self.output_dir / "overlays" / label / _safe(exp.sample_id))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        failed = len(getattr(pl_module, "failed", []))
        if trainer.is_global_zero:
            print(f"HeatmapWriter: rank 0 wrote {self.written} samples ({failed} failed) to {self.output_dir}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def read_shards(output_dir: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Read every shard of a run: ``{label: {sample_id: record with tensors}}`` (all ranks)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(Path(output_dir).glob("shards/rank*/batch*.safetensors")):
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["json"])
        for rec in meta["records"]:
            key = f"{rec['label']}/{rec['sample_id']}"
            full = dict(rec)
            for name in ("token_maps", "token_weights", "sequence_map"):
                full[name] = tensors[f"{key}/{name}"]
            out.setdefault(rec["label"], {})
            if rec["sample_id"] in out[rec["label"]]:
                raise ValueError(f"sample {rec['sample_id']} appears twice in {output_dir}")
            out[rec["label"]][rec["sample_id"]] = full
    return out
