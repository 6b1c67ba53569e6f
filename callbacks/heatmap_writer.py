"""``HeatmapWriter``: per-rank, per-batch shards of maps (safetensors + JSON) and overlays."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dexar.explanation import Explanation
from dexar.pipeline import jsonsafe
from dexar.pipeline.resume import Progress, owner_rank
from dexar.schema import Sample

SHARD_GLOB = "shards/rank*/batch*.safetensors"
log = logging.getLogger(__name__)


class HeatmapWriter(BasePredictionWriter):
    """Writes every predict batch to ``output_dir/shards/rank{R}/batch{I}.safetensors`` as it finishes.

    Each shard holds, per method and sample, ``token_maps``, ``token_weights`` and ``sequence_map``
    tensors and the sample's metric contributions (``dexar.pipeline.resume``); its metadata JSON lists tokens,
    ids, answers, flags, failures, unreadable samples and the settings fingerprint. A shard is written
    under a temporary name and renamed into place (atomic on POSIX), so a killed run keeps every
    finished batch and never a half-written one. Overlays (sequence map + per-token strip) are written
    for dataset indices below ``num_overlays``, whatever the number of processes, before the shard.

    **Explorer** (``explorer=True``): those samples also get a page ``explorer/samples/<id>.html`` (every
    method side by side, per-sample metric values beside it), written with the overlays; at predict end
    rank 0 writes ``explorer/index.html`` (sortable sample list, mean curves), see
    :mod:`dexar.explorer.predict`.

    **Resume**: with ``resume=True`` (default) a run started again in the same directory reads the
    shards at predict start and hands them to the module (``resume_from``): done samples are skipped,
    their metric contributions, failures and measured seconds (``timing``: seconds per phase and the
    images they covered) restored, each on the process that owns the shard
    (:func:`dexar.pipeline.resume.owner_rank`). Batches with nothing new write no shard.

    Args:
        output_dir: Run directory; default: the trainer's ``default_root_dir``.
        num_overlays: Number of samples (by dataset index) that get PNG overlays.
        resume: Continue from the shards already in ``output_dir``.
        explorer: Write the HTML run explorer of the overlay samples.
    """

    def __init__(
        self, output_dir: str | None = None, num_overlays: int = 16, resume: bool = True, explorer: bool = True
    ) -> None:
        super().__init__(write_interval="batch")
        self._requested_dir = output_dir
        self.output_dir = Path(output_dir or "runs/predict")
        self.num_overlays = num_overlays
        self.resume = resume
        self.explorer = explorer
        self.written = 0
        self.resumed = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.output_dir = Path(self._requested_dir or trainer.default_root_dir)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.written = self.resumed = 0
        if not self.resume or not hasattr(pl_module, "resume_from"):
            return
        progress = read_progress(self.output_dir, trainer.global_rank, trainer.world_size)
        if progress.shards:
            pl_module.resume_from(progress)
            self.resumed = len(progress.done)
            if trainer.is_global_zero:
                done = f"{self.resumed} samples done in {progress.shards} shards"
                print(f"HeatmapWriter: resuming {self.output_dir}: {done}")

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
        if getattr(prediction, "empty", False):  # every sample was done by an earlier attempt
            return
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
        skipped = getattr(prediction, "unreadable", None)
        if skipped is None:
            skipped = [(m.id, m.reason) for m in getattr(batch, "skipped", ())]
        states = []
        for sample_id, by_label in getattr(prediction, "contributions", {}).items():
            for label, by_metric in by_label.items():
                for name, metric_states in by_metric.items():
                    rows = prediction.rows.get(sample_id, {}).get(label, {}).get(name, [])
                    miss = getattr(prediction, "misses", {}).get(sample_id, {}).get(label, {}).get(name)
                    entry = {"sample_id": sample_id, "label": label, "metric": name, "rows": rows, "states": {}}
                    if miss:
                        entry["miss"] = miss
                    for state, value in metric_states.items():
                        key = f"metric_state/{len(states)}/{state}"
                        tensors[key] = value.contiguous()
                        entry["states"][state] = key
                    states.append(entry)
        meta = {
            "records": records,
            "failures": prediction.failures,
            "unreadable": [{"id": sid, "reason": reason} for sid, reason in skipped],
            "sample_ids": prediction.sample_ids,
            "metric_states": states,
            "fingerprint": getattr(prediction, "fingerprint", ""),
            "timing": {"seconds": dict(getattr(prediction, "timing", {})), "images": getattr(prediction, "timed", 0)},
        }
        self._overlays(prediction, batch, batch_indices)
        _atomic_save(tensors, meta, _free_name(shard_dir, f"batch{batch_idx:06d}"))
        self.written += len(prediction.sample_ids)

    def _overlays(self, prediction: Any, batch: list[Sample], batch_indices: Sequence[int] | None) -> None:
        if batch_indices is None:
            return
        # Lightning's indices include samples the collate dropped as unreadable: drop them too.
        unreadable = {m.index for m in getattr(batch, "skipped", ())}
        batch_indices = [i for i in batch_indices if i not in unreadable]
        by_id = {s.id: (s, i) for s, i in zip(batch, batch_indices, strict=True)}
        pages: dict[str, dict[str, Explanation]] = {}
        for label, exps in prediction.explanations.items():
            for exp in exps:
                sample, index = by_id[exp.sample_id]
                if index < self.num_overlays:
                    exp_with_image: Explanation = Explanation(**{**exp.__dict__, "image": sample.image})
                    exp_with_image.save(self.output_dir / "overlays" / label / _safe(exp.sample_id))
                    pages.setdefault(exp.sample_id, {})[label] = exp_with_image
        if self.explorer:
            for sample_id, explanations in pages.items():
                try:  # a page that cannot be drawn must not stop the run
                    self._explorer_page(by_id[sample_id], explanations, getattr(prediction, "contributions", {}))
                except (ValueError, OSError) as err:
                    log.warning("explorer page of sample %s not written: %s", sample_id, err)

    def _explorer_page(
        self, sample_index: tuple[Sample, int], explanations: dict[str, Explanation], contributions: dict
    ) -> None:
        """One overlay sample's explorer page, every method side by side, with its metric values."""
        from dexar.explorer import payload_from_explanations
        from dexar.explorer.adapter import explanation_groups, filler_flags
        from dexar.explorer.predict import contribution_values, write_sample_page

        sample, index = sample_index
        first = next(iter(explanations.values()))
        groups = explanation_groups(first)
        filler = filler_flags(first.tokens, first.answer, sample.answer, sample.word_is_content, groups)
        payload = payload_from_explanations(explanations, image=sample.image, prompt=sample.prompt, filler=filler)
        metrics = contribution_values(contributions.get(sample.id, {}))
        write_sample_page(payload, self.output_dir / "explorer", index, metrics)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank 0 writes ``explorer/index.html`` once every process wrote its sample pages.

        The run's means and curves come from the module's ``summary`` (what ``ResultsWriter`` writes as
        ``results.json``), not from the file: the index is right whichever of the two callbacks runs first.
        """
        if not self.explorer or self.num_overlays <= 0:
            return
        trainer.strategy.barrier("explorer_index")  # every rank's pages are on disk
        if trainer.is_global_zero:
            from dexar.explorer import metric_specs
            from dexar.explorer.predict import write_predict_index

            specs = metric_specs(getattr(pl_module, "metric_sets", {}))
            summary = getattr(pl_module, "summary", None)
            results = None if summary is None else json.loads(jsonsafe.dumps(summary))  # as results.json reads
            index = write_predict_index(self.output_dir, specs, limit=self.num_overlays, results=results)
            if index is not None:
                print(f"HeatmapWriter: explorer of the first {self.num_overlays} samples: {index}")

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        failed = len(getattr(pl_module, "failed", []))
        if trainer.is_global_zero:
            print(
                f"HeatmapWriter: rank 0 wrote {self.written} samples ({failed} failed, {self.resumed} resumed) "
                f"to {self.output_dir}"
            )


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _free_name(shard_dir: Path, stem: str) -> Path:
    """``stem.safetensors``, or ``stem-N.safetensors`` if an earlier attempt used that name."""
    path, n = shard_dir / f"{stem}.safetensors", 1
    while path.exists():
        path, n = shard_dir / f"{stem}-{n}.safetensors", n + 1
    return path


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
    """Write a shard to a hidden temporary name, then rename it into place (never half-written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"json": jsonsafe.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _shard_meta(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["json"])


def read_progress(output_dir: str | Path, rank: int = 0, world_size: int = 1) -> Progress:
    """What the shards of ``output_dir`` already hold, for process ``rank`` of ``world_size``.

    ``done`` (and the shard count, fingerprints) cover every shard; failures, unreadable samples,
    metric contributions and timing only the shards ``rank`` owns (:func:`dexar.pipeline.resume.owner_rank`).
    The defaults read everything (one process).
    """
    progress = Progress()
    for path in sorted(Path(output_dir).glob(SHARD_GLOB)):
        try:
            meta = _shard_meta(path)
        except Exception as err:
            raise ValueError(f"{path}: unreadable shard ({type(err).__name__}: {err})") from None
        progress.shards += 1
        if meta.get("fingerprint"):
            progress.fingerprints.add(meta["fingerprint"])
        failures = [(sid, msg) for sid, msg in meta["failures"]]
        unreadable = [(u["id"], u["reason"]) for u in meta["unreadable"]]
        progress.done.update(meta["sample_ids"])
        progress.done.update(sid for sid, _ in failures + unreadable)
        if owner_rank(_shard_rank(path), world_size) != rank:
            continue
        try:
            tensors = load_file(str(path))
        except Exception as err:
            raise ValueError(f"{path}: unreadable shard ({type(err).__name__}: {err})") from None
        progress.failures += failures
        progress.unreadable += unreadable
        progress.explained.update(meta["sample_ids"])
        timing = meta.get("timing") or {}
        progress.timing.add(timing.get("seconds") or {}, int(timing.get("images") or 0))
        for entry in meta.get("metric_states", []):
            sid, label, name = entry["sample_id"], entry["label"], entry["metric"]
            states = {state: tensors[key] for state, key in entry["states"].items()}
            progress.contributions.setdefault(sid, {}).setdefault(label, {})[name] = states
            progress.rows.setdefault(sid, {}).setdefault(label, {})[name] = list(entry["rows"])
            if entry.get("miss"):
                progress.misses.setdefault(sid, {}).setdefault(label, {})[name] = entry["miss"]
    return progress


def _shard_rank(path: Path) -> int:
    """The rank that wrote a shard, from its ``rank{R}`` directory."""
    return int(path.parent.name.removeprefix("rank"))


def read_shards(output_dir: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Read every shard of a run: ``{label: {sample_id: record with tensors}}`` (all ranks)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(Path(output_dir).glob(SHARD_GLOB)):
        tensors = load_file(str(path))
        meta = _shard_meta(path)
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
