"""``ExplainerModule``: a LightningModule whose ``predict_step`` explains a batch of samples."""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from dexar.evaluation import EvaluationSettings, Evaluator
from dexar.explain import ANSWER_SOURCES, Explainer
from dexar.explanation import Explanation
from dexar.loading import load_model
from dexar.methods import build_method
from dexar.resume import (
    Contribution,
    Progress,
    Rows,
    add_states,
    check_resumable,
    fingerprint,
    metric_states,
    sorted_ids,
)
from dexar.schema import Sample
from dexar.shapes_model import SHAPES_CHECKPOINT

log = logging.getLogger(__name__)


@dataclass
class PredictOutput:
    """What ``predict_step`` returns for one batch.

    Attributes:
        explanations: Per method label, one :class:`Explanation` per explained sample (no images).
        sample_ids: Ids of the explained samples, in order.
        failures: ``(sample_id, error message)`` of samples that could not be explained.
        unreadable: ``(sample_id, reason)`` of the batch's undecodable samples not recorded before
            (``None``: take them from the batch).
        contributions: Sample id → what the sample added to each method's metrics (for resume).
        rows: Sample id → the metric row ids of those contributions.
        fingerprint: Hash of the settings the results depend on (a resumed run must match it).

    """

    explanations: dict[str, list[Explanation]]
    sample_ids: list[str]
    failures: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] | None = None
    contributions: dict[str, Contribution] = field(default_factory=dict)
    rows: dict[str, Rows] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def empty(self) -> bool:
        """True when the batch added nothing (every sample was done by an earlier attempt)."""
        return not self.sample_ids and not self.failures and not self.unreadable


class ExplainerModule(L.LightningModule):
    """Explains every predict batch with one or more methods (one shared trace per batch).

    Run it with ``Trainer(inference_mode=False)``: the explanation needs gradients.

    Args:
        model: Checkpoint directory or cached hub id (default: the bundled Shapes model).
        methods: Method label → options. The label is the registry name unless the options hold
            ``method: NAME`` (so several variants of one method can run side by side).
        dtype: Model dtype (``float32``, ``bfloat16``, ``float16``, ``float64``).
        answer_source: ``generate`` explains the model's greedy answer; ``ground_truth``
            teacher-forces the dataset's answer.
        max_new_tokens: Generation budget.
        keep_eos: Explain the end-of-sequence token too.

    """

    def __init__(
        self,
        model: str = SHAPES_CHECKPOINT,
        methods: dict[str, dict[str, Any]] | None = None,
        dtype: str = "float32",
        answer_source: str = "generate",
        max_new_tokens: int = 32,
        keep_eos: bool = False,
        metrics: dict[str, Any] | None = None,
        localization_target: str = "sequence",
        perturbation_max_batch: int = 16,
        perturbation_replacement: float = 0.0,
    ) -> None:
        super().__init__()
        if answer_source not in ANSWER_SOURCES:
            raise ValueError(f"model.answer_source must be one of {ANSWER_SOURCES}, got {answer_source!r}")
        self.save_hyperparameters(ignore=["metrics"])
        self.settings = EvaluationSettings(localization_target, perturbation_max_batch, perturbation_replacement)
        self.method_specs = {label: dict(opts or {}) for label, opts in (methods or {"dexar": {}}).items()}
        self.methods = {
            label: build_method(opts.pop("method", label), **opts)
            for label, opts in ((k, dict(v)) for k, v in self.method_specs.items())
        }
        self.metric_sets = nn.ModuleDict(
            {label: nn.ModuleDict({n: copy.deepcopy(m) for n, m in (metrics or {}).items()}) for label in self.methods}
        )
        for name, metric in (metrics or {}).items():
            check_resumable(metric, f"model.metrics.{name}")
        # each sample is evaluated into fresh copies: its states are its contribution (dexar.resume)
        self.metric_scratch = copy.deepcopy(self.metric_sets)
        self.contributions: dict[str, Contribution] = {}
        self.contribution_rows: dict[str, Rows] = {}
        self.done: set[str] = set()
        self.resumed_samples = 0
        self.fingerprint = fingerprint(
            {
                "hparams": {k: v for k, v in self.hparams.items()},
                "metrics": {n: _describe_metric(m) for n, m in (metrics or {}).items()},
            }
        )
        self.vlm: torch.nn.Module | None = None
        self.explainer: Explainer | None = None
        self.evaluator: Evaluator | None = None
        self.failed: list[tuple[str, str]] = []
        self._recorded_unreadable: set[str] = set()
        self.unreadable: list[tuple[str, str]] = []
        self.last_eval_timings: dict[str, float] = {}
        self.results: dict[str, dict[str, dict[str, float]]] = {}

    def configure_model(self) -> None:
        """Load the VLM once per process, on this process's device."""
        if self.vlm is not None:
            return
        vlm, processor = load_model(self.hparams.model, dtype=self.hparams.dtype, device=self.device)
        for p in vlm.parameters():
            p.requires_grad_(False)
        self.vlm = vlm
        self.explainer = Explainer(vlm, processor, self.methods)
        groups = {label: dict(group.items()) for label, group in self.metric_scratch.items() if len(group)}
        self.evaluator = Evaluator(self.explainer.adapter, groups, self.settings)

    def resume_from(self, progress: Progress) -> None:
        """Take over what an earlier attempt of this run did (called by ``HeatmapWriter`` at predict start).

        Every rank skips the done samples; rank 0 alone keeps their failures, unreadable records and
        metric contributions, so that each sample counts exactly once across processes.

        Raises:
            ValueError: The shards were written with other settings (methods, metrics, model, ...).
        """
        stale = progress.fingerprints - {self.fingerprint}
        if stale:
            raise ValueError(
                f"the run directory's shards were written with other settings (fingerprint {sorted(stale)[0]} "
                f"!= {self.fingerprint}); use a new --trainer.default_root_dir or delete its shards/"
            )
        self.done = set(progress.done)
        self.resumed_samples = len(progress.done)
        self._recorded_unreadable = {sid for sid, _ in progress.unreadable}
        if self.trainer.is_global_zero:
            self.failed += list(progress.failures)
            self.unreadable += list(progress.unreadable)
            self.contributions.update(progress.contributions)
            self.contribution_rows.update(progress.rows)

    def _explain(self, samples: list[Sample]) -> dict[str, list[Explanation]]:
        assert self.explainer is not None
        hp = self.hparams
        with torch.enable_grad():
            return self.explainer.explain_samples(
                samples, hp.answer_source, hp.max_new_tokens, hp.keep_eos, keep_images=False
            )

    def predict_step(self, batch: list[Sample], batch_idx: int, dataloader_idx: int = 0) -> PredictOutput:
        self.configure_model()
        skipped = getattr(batch, "skipped", ())
        unreadable = [(m.id, m.reason) for m in skipped if m.id not in self._recorded_unreadable]
        self.unreadable += unreadable
        todo = [s for s in batch if s.id not in self.done]
        if todo:
            output = self._explain_batch(todo, batch_idx)
        else:  # done by an earlier attempt of the run: nothing to recompute
            self.last_eval_timings = {}
            if self.explainer is not None:
                self.explainer.last_timings = {}
            output = PredictOutput({label: [] for label in self.methods}, [])
        output.unreadable = unreadable
        output.fingerprint = self.fingerprint
        self._evaluate(todo, output)
        return output

    def _evaluate(self, batch: list[Sample], output: PredictOutput) -> None:
        """Evaluate each explained sample into fresh metric copies and keep the states as its contribution.

        The contributions go to the output (the writer stores them for resume) and to
        ``self.contributions`` (merged into the metrics at epoch end). Per-method seconds are in
        ``last_eval_timings``.
        """
        self.last_eval_timings = {}
        if self.evaluator is None or not self.evaluator.metrics or not output.sample_ids:
            return
        by_id = {s.id: s for s in batch}
        for label, exps in output.explanations.items():
            if label not in self.evaluator.metrics:
                continue
            start = time.perf_counter()
            for exp in exps:
                states, rows = self._evaluate_one(label, by_id[exp.sample_id], exp)
                output.contributions.setdefault(exp.sample_id, {})[label] = states
                output.rows.setdefault(exp.sample_id, {})[label] = rows
            self.last_eval_timings[f"evaluation/{label}"] = time.perf_counter() - start
        self.contributions.update(output.contributions)
        self.contribution_rows.update(output.rows)

    def _evaluate_one(
        self, label: str, sample: Sample, exp: Explanation
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[str]]]:
        assert self.evaluator is not None
        group = self.evaluator.metrics[label]
        for metric in group.values():
            metric.reset()
        self.evaluator.rows[label] = {name: [] for name in group}
        with torch.inference_mode():
            self.evaluator.update([sample], {label: [exp]})
        states = {name: metric_states(metric) for name, metric in group.items()}
        return states, {name: list(ids) for name, ids in self.evaluator.rows[label].items()}

    def _merge_contributions(self) -> dict[str, dict[str, list[str]]]:
        """Rebuild ``metric_sets`` from every contribution, in natural sample-id order; returns the rows."""
        rows: dict[str, dict[str, list[str]]] = {
            label: {name: [] for name in group} for label, group in self.metric_sets.items()
        }
        for group in self.metric_sets.values():
            for metric in group.values():
                metric.reset()
        for sample_id in sorted_ids(self.contributions):
            for label, states in self.contributions[sample_id].items():
                if label not in self.metric_sets:
                    continue
                for name, metric_state in states.items():
                    add_states(self.metric_sets[label][name], metric_state)
                    rows[label][name] += self.contribution_rows.get(sample_id, {}).get(label, {}).get(name, [])
        return rows

    def _explain_batch(self, batch: list[Sample], batch_idx: int) -> PredictOutput:
        try:
            return PredictOutput(self._explain(batch), [s.id for s in batch])
        except Exception as err:  # one bad sample must not kill the run: retry one by one
            log.warning("batch %d failed (%s); explaining its samples one by one", batch_idx, err)
        merged: dict[str, list[Explanation]] = {label: [] for label in self.methods}
        ids, failures = [], []
        for sample in batch:
            try:
                single = self._explain([sample])
            except Exception as err:
                failures.append((sample.id, f"{type(err).__name__}: {err}"))
                log.warning("sample %s skipped: %s", sample.id, err)
                continue
            ids.append(sample.id)
            for label, exps in single.items():
                merged[label] += exps
        self.failed += failures
        return PredictOutput(merged, ids, failures)

    def on_predict_epoch_end(self) -> None:
        """Compute every metric (synced across processes: every rank takes part), then report on rank 0.

        ``self.results[label][metric]`` holds ``value`` (mean over valid samples), ``count`` and
        ``skipped`` (degenerate samples, never averaged in). Rank 0 logs them through the logger and
        writes ``results.json`` and ``results.csv`` in the run directory.
        """
        rows = self._merge_contributions()
        if self.evaluator is not None:
            self.evaluator.rows = rows
        results: dict[str, dict[str, dict[str, float]]] = {}
        for label, group in self.metric_sets.items():
            results[label] = {}
            for name, metric in group.items():
                value = float(metric.compute())
                per = metric.per_sample() if hasattr(metric, "per_sample") else torch.empty(0)
                valid = int(torch.isfinite(per).sum())
                results[label][name] = {"value": value, "count": valid, "skipped": int(per.numel()) - valid}
        self.results = results
        self.curves = _mean_curves(self.metric_sets)
        counts = torch.tensor([float(len(self.failed)), float(len(self.unreadable))], device=self.device)
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.num_failed, self.num_unreadable = (int(c) for c in counts.tolist())
        if self.trainer.is_global_zero:
            report_results(self.trainer, self, results, self.num_failed, self.num_unreadable, self.curves)


def _mean_curves(metric_sets: nn.ModuleDict) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Mean curve of every curve metric: ``levels``, ``y`` (and ``x`` for PIC). Collective under DDP."""
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    for label, group in metric_sets.items():
        for name, metric in group.items():
            if hasattr(metric, "mean_curve"):
                parts = [t.tolist() for t in metric.mean_curve()]
                keys = ("levels", "x", "y") if len(parts) == 3 else ("levels", "y")
                curves.setdefault(label, {})[name] = dict(zip(keys, parts, strict=True))
    return curves


def _describe_metric(metric: Any) -> dict[str, Any]:
    """Class and level grid of a metric: what its per-sample states depend on."""
    levels = getattr(metric, "levels", None)
    return {"class": type(metric).__name__, "levels": levels.tolist() if levels is not None else None}


def report_results(
    trainer: L.Trainer,
    module: ExplainerModule,
    results: dict,
    num_failed: int,
    num_unreadable: int = 0,
    curves: dict | None = None,
) -> None:
    """Rank 0: log metrics through the logger, write ``results.json`` / ``results.csv``, print a table.

    ``failed_samples`` counts samples whose explanation raised; ``unreadable_samples`` those whose
    files could not be decoded (dropped by the datamodule's collate), both summed over ranks.
    """
    run_dir = Path(trainer.default_root_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    datamodule = getattr(trainer, "datamodule", None)
    dataset = type(datamodule).__name__ if datamodule is not None else "dataloader"
    model = str(module.hparams.model)
    rows = [
        {"dataset": dataset, "model": model, "method": label, "metric": name, **stats}
        for label, group in results.items()
        for name, stats in group.items()
    ]
    payload = {
        "dataset": dataset,
        "model": model,
        "failed_samples": num_failed,
        "unreadable_samples": num_unreadable,
        "results": results,
        "curves": curves or {},
    }
    tmp = run_dir / f".results.json.{os.getpid()}.tmp"  # atomic: a reader never sees half a file
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, run_dir / "results.json")
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["dataset", "model", "method", "metric", "value", "count", "skipped"])
        writer.writeheader()
        writer.writerows(rows)
    if trainer.logger is not None and rows:
        trainer.logger.log_metrics({f"{r['method']}/{r['metric']}": r["value"] for r in rows})
        trainer.logger.log_metrics({"failed_samples": float(num_failed), "unreadable_samples": float(num_unreadable)})
    if rows:
        width = max(len(r["method"]) for r in rows) + 2
        print(f"{'method':<{width}}{'metric':<24}{'value':>10}{'count':>8}{'skipped':>9}")
        for r in rows:
            print(f"{r['method']:<{width}}{r['metric']:<24}{r['value']:>10.4f}{r['count']:>8}{r['skipped']:>9}")
    print(
        f"results: {run_dir / 'results.json'}, {run_dir / 'results.csv'} "
        f"({num_failed} samples failed, {num_unreadable} unreadable)"
    )
