"""``ExplainerModule``: a LightningModule whose ``predict_step`` explains a batch of samples."""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn
from torchmetrics import Metric

from dexar.adapters import DexarInputError
from dexar.explain import ANSWER_SOURCES, Explainer
from dexar.explanation import Explanation
from dexar.loading import load_model
from dexar.methods import build_method
from dexar.phase_timing import PhaseTotals
from dexar.pipeline.coverage import (
    NothingEvaluatedError,
    count_misses,
    unfed_reason,
    zero_count_lines,
    zero_count_reasons,
)
from dexar.pipeline.distributed import gather_objects
from dexar.pipeline.evaluation import EvaluationSettings, Evaluator
from dexar.pipeline.resume import (
    Contribution,
    Misses,
    Progress,
    Rows,
    add_states,
    check_resumable,
    fingerprint,
    metric_states,
    sorted_ids,
)
from dexar.schema import Sample
from dexar.shapes.model import SHAPES_CHECKPOINT

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
        misses: Sample id → method label → metric → why the sample gave the metric no row.
        fingerprint: Hash of the settings the results depend on (a resumed run must match it).
        timing: Seconds of this batch by phase (:mod:`dexar.phase_timing`), for the ``timed`` images.
        timed: Number of images the ``timing`` covers (the explained samples).

    """

    explanations: dict[str, list[Explanation]]
    sample_ids: list[str]
    failures: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] | None = None
    contributions: dict[str, Contribution] = field(default_factory=dict)
    rows: dict[str, Rows] = field(default_factory=dict)
    misses: dict[str, Misses] = field(default_factory=dict)
    fingerprint: str = ""
    timing: dict[str, float] = field(default_factory=dict)
    timed: int = 0

    @property
    def empty(self) -> bool:
        """True when the batch added nothing (every sample was done by an earlier attempt)."""
        return not self.sample_ids and not self.failures and not self.unreadable


EVALUATION_FAILED = "evaluation failed"
"""Prefix of the miss a metric records for a sample whose evaluation raised (see ``ExplainerModule._evaluate``)."""

NOT_FINGERPRINTED = ("time_alone_batches", "trace_batch")
"""Settings the results do not depend on: a resumed run may change them."""


class ExplainerModule(L.LightningModule):
    """Explains every predict batch with one or more methods (one shared trace per batch).

    Run it with ``Trainer(inference_mode=False)``: the explanation needs gradients.

    A method the model's architecture does not define (e.g. rollout on Florence-2's cross-attention)
    is dropped for that model at setup with one warning; ``results.json`` gives each of its metrics as
    ``{"value": null, "count": 0, "n/a": <reason>}`` and ``dexar report`` writes ``n/a`` in its cells.

    A batch that runs out of memory is halved until it fits (:meth:`_explain_batch`); a sample whose
    evaluation raises for a method is counted (``evaluation_failed_samples`` in ``results.json``) and
    adds nothing to that method's metrics (:meth:`_evaluate`).

    A run in which nothing was evaluated (no sample explained, or no metric received a valid sample)
    prints, per metric, why its count is 0 and raises :class:`~dexar.pipeline.coverage.NothingEvaluatedError`
    (a :class:`~dexar.adapters.DexarInputError`: one line, exit 1) after ``callbacks.ResultsWriter`` wrote
    ``results.json``.

    Args:
        model: Checkpoint directory or cached hub id (default: the bundled Shapes model).
        methods: Method label → options. The label is the registry name unless the options hold
            ``method: NAME`` (so several variants of one method can run side by side).
        dtype: Model dtype (``float32``, ``bfloat16``, ``float16``, ``float64``).
        answer_source: ``generate`` explains the model's greedy answer; ``ground_truth``
            teacher-forces the dataset's answer.
        max_new_tokens: Generation budget.
        keep_eos: Explain the end-of-sequence token too.
        metrics: Metric name → torchmetrics object (copied per method).
        localization_target: ``sequence`` or ``tokens`` (see :mod:`dexar.pipeline.evaluation`).
        perturbation_max_batch: Perturbed images per forward.
        perturbation_replacement: Replacement value of perturbed pixels (``pixel_values`` space).
        time_alone_batches: On this many first batches of each process, every method is also run on
            its own (a trace of its own needs + its work) and timed: the paper's sec/img
            (``alone/<label>`` in ``timing.json``). 0: never; -1: every batch. Results are unchanged.
        trace_batch: Samples per trace (and per IIA forward); a larger batch is explained in sub-batches
            of this many. ``None``: sized by the memory model from the free accelerator memory (the whole
            batch on the CPU); see :meth:`dexar.explain.Explainer.samples_per_trace`. Results are unchanged.

    """

    def __init__(
        self,
        model: str = SHAPES_CHECKPOINT,
        methods: dict[str, dict[str, Any]] | None = None,
        dtype: str = "float32",
        answer_source: str = "generate",
        max_new_tokens: int = 32,
        keep_eos: bool = False,
        metrics: dict[str, Metric] | None = None,
        localization_target: str = "sequence",
        perturbation_max_batch: int = 16,
        perturbation_replacement: float = 0.0,
        time_alone_batches: int = 2,
        trace_batch: int | None = None,
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
        # each sample is evaluated into fresh copies: its states are its contribution (dexar.pipeline.resume)
        self.metric_scratch = copy.deepcopy(self.metric_sets)
        self.contributions: dict[str, Contribution] = {}
        self.contribution_rows: dict[str, Rows] = {}
        self.misses: dict[str, Misses] = {}
        self.done: set[str] = set()
        self.explained: set[str] = set()
        self.resumed_samples = 0
        self.earlier_timing = PhaseTotals()
        """Seconds and images per phase of earlier attempts of the run, from the shards this process owns."""
        self.fingerprint = fingerprint(
            {
                "hparams": {k: v for k, v in self.hparams.items() if k not in NOT_FINGERPRINTED},
                "metrics": {n: _describe_metric(m) for n, m in (metrics or {}).items()},
            }
        )
        self.vlm: torch.nn.Module | None = None
        self.explainer: Explainer | None = None
        self.evaluator: Evaluator | None = None
        self.not_applicable: dict[str, str] = {}
        """Method label → why the model cannot run it (dropped at setup)."""
        self.failed: list[tuple[str, str]] = []
        self._recorded_unreadable: set[str] = set()
        self.unreadable: list[tuple[str, str]] = []
        self._alone_batches = 0
        self.results: dict[str, dict[str, dict[str, Any]]] = {}
        self.nothing_evaluated: str | None = None
        self.num_evaluation_failed = 0
        self.evaluation_failures: dict[str, int] = {}
        self.zero_count_reasons: dict[str, dict[str, str]] = {}
        self.summary: dict[str, Any] | None = None
        """What ``results.json`` holds (set at predict epoch end, every rank): dataset, model, sample counts,
        ``results``, ``curves``; ``callbacks.ResultsWriter`` writes it, ``HeatmapWriter`` indexes the explorer by it."""

    def setup(self, stage: str) -> None:
        """Before predict, stop in one line on an empty dataset or more processes than samples.

        Lightning would skip an empty run silently (exit 0, no results) and die in its sampler with a
        bare ``AssertionError`` when a process gets no sample.
        """
        if stage != "predict" or self._trainer is None:
            return
        size, processes = _num_predict_samples(self.trainer), self.trainer.world_size
        if size == 0:
            raise NothingEvaluatedError("nothing to evaluate: the predict dataset has no sample")
        if size is not None and size < processes:
            raise DexarInputError(
                f"{size} sample(s) for {processes} processes: each process needs at least one sample; "
                f"use at most {size} processes (--trainer.devices, --trainer.num_nodes) or more samples"
            )

    def configure_model(self) -> None:
        """Load the VLM once per process, on this process's device; drop the methods it cannot run."""
        if self.vlm is not None:
            return
        vlm, processor = load_model(self.hparams.model, dtype=self.hparams.dtype, device=self.device)
        for p in vlm.parameters():
            p.requires_grad_(False)
        self.vlm = vlm
        self.explainer = Explainer(
            vlm, processor, self.methods, skip_unsupported=True, trace_batch=self.hparams.trace_batch
        )
        self.not_applicable = dict(self.explainer.skipped)
        for label in self.not_applicable:  # the same on every process: the metric collectives still match
            del self.metric_sets[label], self.metric_scratch[label]
        if self.not_applicable and rank_zero_only.rank == 0:
            log.warning(
                "%s cannot run on %s; skipped (n/a in results.json): %s",
                ", ".join(self.not_applicable),
                self.hparams.model,
                "; ".join(f"{label}: {why}" for label, why in self.not_applicable.items()),
            )
        groups = {label: dict(group.items()) for label, group in self.metric_scratch.items() if len(group)}
        self.evaluator = Evaluator(self.explainer.adapter, groups, self.settings)

    def resume_from(self, progress: Progress) -> None:
        """Take over what an earlier attempt of this run did (called by ``HeatmapWriter`` at predict start).

        Every rank skips the done samples and keeps the failures, unreadable records, metric
        contributions and timing of the shards it owns (``progress`` holds only those, see
        :func:`dexar.pipeline.resume.owner_rank`), so that each sample counts exactly once across processes.

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
        self._recorded_unreadable = set(progress.done)
        self.failed += list(progress.failures)
        self.unreadable += list(progress.unreadable)
        self.explained |= progress.explained
        self.contributions.update(progress.contributions)
        self.contribution_rows.update(progress.rows)
        self.misses.update(progress.misses)
        self.earlier_timing = progress.timing

    def _explain(
        self, samples: list[Sample], time_alone: bool
    ) -> tuple[dict[str, list[Explanation]], dict[str, float]]:
        assert self.explainer is not None
        hp = self.hparams
        with torch.enable_grad():
            out = self.explainer.explain_samples(
                samples, hp.answer_source, hp.max_new_tokens, hp.keep_eos, keep_images=False, time_alone=time_alone
            )
        return out, dict(self.explainer.last_timings)

    def predict_step(self, batch: list[Sample], batch_idx: int, dataloader_idx: int = 0) -> PredictOutput:
        self.configure_model()
        assert self.explainer is not None
        skipped = getattr(batch, "skipped", ())
        unreadable = [(m.id, m.reason) for m in skipped if m.id not in self._recorded_unreadable]
        self.unreadable += unreadable
        todo = [s for s in batch if s.id not in self.done]
        if todo:
            output = self._explain_batch(todo, batch_idx)
        else:  # done by an earlier attempt of the run: nothing to recompute
            output = PredictOutput({label: [] for label in self.explainer.methods}, [])
        output.unreadable = unreadable
        output.fingerprint = self.fingerprint
        self.explained.update(output.sample_ids)
        self._evaluate(todo, output)
        return output

    def _evaluate(self, batch: list[Sample], output: PredictOutput) -> None:
        """Evaluate each explained sample into fresh metric copies and keep the states as its contribution.

        The batch's perturbed images of every method and sample are scored together first
        (:meth:`dexar.pipeline.evaluation.Evaluator.score`); their seconds are shared among the methods by their
        number of samples scored. A (sample, method) whose evaluation raises (a NaN map, an empty
        answer, a failing metric) contributes nothing to that method's metrics; each of its metrics
        records ``evaluation failed: <error>`` as the sample's miss (kept in the shards, so a resumed
        run counts it too) and the run reports it (:data:`EVALUATION_FAILED`). The contributions go
        to the output (the writer stores them for resume) and to ``self.contributions`` (merged into
        the metrics at epoch end). Per-method seconds are added to ``output.timing``
        (``evaluation/<label>``).
        """
        if self.evaluator is None or not self.evaluator.metrics or not output.sample_ids:
            return
        by_id = {s.id: s for s in batch}
        start = time.perf_counter()
        scored = self.evaluator.score(batch, output.explanations)
        pooled = time.perf_counter() - start
        scored_per_label = Counter(label for label, _ in scored)
        for label, exps in output.explanations.items():
            if label not in self.evaluator.metrics:
                continue
            start = time.perf_counter()
            for exp in exps:
                sample = by_id[exp.sample_id]
                misses = self._evaluate_sample(label, sample, exp, scored.get((label, exp.sample_id)), output)
                if misses:
                    output.misses.setdefault(exp.sample_id, {})[label] = misses
            share = pooled * scored_per_label[label] / max(1, sum(scored_per_label.values()))
            output.timing[f"evaluation/{label}"] = time.perf_counter() - start + share
        self.contributions.update(output.contributions)
        self.contribution_rows.update(output.rows)
        self.misses.update(output.misses)

    def _evaluate_sample(
        self, label: str, sample: Sample, exp: Explanation, curves: Any, output: PredictOutput
    ) -> dict[str, str]:
        """Evaluate one (sample, method) into ``output``; returns its misses (metric → why it got no row)."""
        assert self.evaluator is not None
        try:
            states, rows = self._evaluate_one(label, sample, exp, curves)
        except Exception as err:  # noqa: BLE001 - one sample's evaluation must not end the run
            why = f"{EVALUATION_FAILED}: {type(err).__name__}: {err}"
            log.warning(
                "sample %s: %s evaluation failed (%s: %s); counted, not scored",
                sample.id,
                label,
                type(err).__name__,
                err,
            )
            group = self.evaluator.metrics[label]
            for metric in group.values():
                metric.reset()
            states = {name: metric_states(metric) for name, metric in group.items()}
            rows = {name: [] for name in group}
            misses = dict.fromkeys(group, why)
        else:
            misses = {
                name: unfed_reason(
                    self.evaluator.kinds[label][name], sample, self.settings.localization_target, self._dataset
                )
                for name, ids in rows.items()
                if not ids
            }
        output.contributions.setdefault(sample.id, {})[label] = states
        output.rows.setdefault(sample.id, {})[label] = rows
        return misses

    @property
    def _dataset(self) -> str:
        """Name of the dataset (the datamodule's class without ``DataModule``), for messages."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return type(datamodule).__name__.removesuffix("DataModule") if datamodule is not None else "the dataset"

    def _evaluate_one(
        self, label: str, sample: Sample, exp: Explanation, curves: Any = None
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[str]]]:
        assert self.evaluator is not None
        group = self.evaluator.metrics[label]
        for metric in group.values():
            metric.reset()
        self.evaluator.rows[label] = {name: [] for name in group}
        with torch.inference_mode():
            self.evaluator.update_one(label, sample, exp, curves)
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
        """Explain a batch, with its timing; one bad sample or an out-of-memory error must not kill the run.

        Out of memory (``torch.OutOfMemoryError``, and only that) splits the batch in halves, again
        until it fits (a single sample that does not fit fails), and logs once per batch the sizes it
        was explained in. Any other error explains the batch's samples one by one (a failing sample is
        counted in ``failed_samples``). Every explained sample's laps are kept (``timed`` counts them
        all), and only explained samples are timed; the first ``time_alone_batches`` batches also time
        each method on its own.
        """
        limit = self.hparams.time_alone_batches
        time_alone = limit < 0 or self._alone_batches < limit
        sizes: list[int] = []
        output = self._explain_fitting(batch, time_alone, batch_idx, sizes)
        if len(sizes) > 1:
            log.warning(
                "batch %d: out of memory with %d samples; explained in sub-batches of %s",
                batch_idx,
                len(batch),
                " + ".join(map(str, sizes)),
            )
        self._alone_batches += bool(output.sample_ids)
        return output

    def _explain_fitting(
        self, batch: list[Sample], time_alone: bool, batch_idx: int, sizes: list[int]
    ) -> PredictOutput:
        """Explain ``batch``, halving it on out-of-memory errors; ``sizes`` gets the sizes that ran."""
        try:
            explanations, laps = self._explain(batch, time_alone)
        except torch.OutOfMemoryError as err:
            _free_device_cache(self.device)
            if len(batch) == 1:
                sizes.append(1)
                failure = (batch[0].id, f"{type(err).__name__}: {err}")
                log.warning("sample %s skipped: out of memory on its own", batch[0].id)
                self.failed.append(failure)
                return PredictOutput({label: [] for label in self.explainer.methods}, [], failures=[failure])
            half = (len(batch) + 1) // 2
            parts = [self._explain_fitting(part, time_alone, batch_idx, sizes) for part in (batch[:half], batch[half:])]
            return _merge_outputs(parts)
        except Exception as err:  # noqa: BLE001 - not memory: find the bad sample one by one
            log.warning("batch %d failed (%s); explaining its samples one by one", batch_idx, err)
            sizes.append(len(batch))
            return self._explain_one_by_one(batch, time_alone)
        sizes.append(len(batch))
        return PredictOutput(explanations, [s.id for s in batch], timing=laps, timed=len(batch))

    def _explain_one_by_one(self, batch: list[Sample], time_alone: bool) -> PredictOutput:
        assert self.explainer is not None
        output = PredictOutput({label: [] for label in self.explainer.methods}, [])
        timing = PhaseTotals()
        for sample in batch:
            try:
                single, laps = self._explain([sample], time_alone)
            except Exception as err:
                output.failures.append((sample.id, f"{type(err).__name__}: {err}"))
                log.warning("sample %s skipped: %s", sample.id, err)
                continue
            output.sample_ids.append(sample.id)
            timing.add(laps, 1)
            for label, exps in single.items():
                output.explanations[label] += exps
        output.timing, output.timed = timing.seconds, len(output.sample_ids)
        self.failed += output.failures
        return output

    def on_predict_epoch_end(self) -> None:
        """Compute every metric (synced across processes: every rank takes part) into :attr:`summary`.

        ``self.results[label][metric]`` holds ``value`` (mean over valid samples), ``count`` and
        ``skipped`` (degenerate samples, never averaged in); a metric with no valid sample also holds
        ``reason`` (why), a method the model cannot run ``n/a`` (why) instead. ``callbacks.ResultsWriter``
        logs them through the logger and writes ``results.json`` and ``results.csv`` in the run directory
        (rank 0, at predict end). Every collective here has the same shape on every rank, whatever each
        rank computed.
        """
        rows = self._merge_contributions()
        if self.evaluator is not None:
            self.evaluator.rows = rows
        results: dict[str, dict[str, dict[str, Any]]] = {}
        for label, group in self.metric_sets.items():
            results[label] = {}
            for name, metric in group.items():
                value = float(metric.compute())
                per = metric.per_sample() if hasattr(metric, "per_sample") else torch.empty(0)
                valid = int(torch.isfinite(per).sum())
                results[label][name] = {"value": value, "count": valid, "skipped": int(per.numel()) - valid}
        self.curves = _mean_curves(self.metric_sets)
        local = [float(len(self.failed)), float(len(self.unreadable)), float(len(self.explained))]
        counts = torch.tensor(local, device=self.device)
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.num_failed, self.num_unreadable, self.num_explained = (int(c) for c in counts.tolist())
        misses = sum(
            gather_objects(count_misses(self.misses[sid] for sid in self.contributions if sid in self.misses)),
            Counter(),
        )
        eval_failed = sum(gather_objects(_evaluation_failures(self.misses)), Counter())
        self.num_evaluation_failed = eval_failed.pop(None, 0)
        self.evaluation_failures = {label: eval_failed[label] for label in self.method_specs if eval_failed[label]}
        reasons = zero_count_reasons(results, misses, self.num_explained, self.num_failed, self.num_unreadable)
        for label, group in reasons.items():
            for name, why in group.items():
                results[label][name]["reason"] = why
        metric_names = next((list(group) for group in self.metric_sets.values()), [])
        for label, why in self.not_applicable.items():
            results[label] = {name: {"value": None, "count": 0, "skipped": 0, "n/a": why} for name in metric_names}
        self.results = {label: results[label] for label in self.method_specs if label in results}
        self.nothing_evaluated = _nothing_evaluated(
            self.results, self.num_explained, self.num_unreadable, self.num_failed
        )
        self.zero_count_reasons = reasons
        datamodule = getattr(self.trainer, "datamodule", None)
        self.summary = {
            "dataset": type(datamodule).__name__ if datamodule is not None else "dataloader",
            "model": str(self.hparams.model),
            "failed_samples": self.num_failed,
            "unreadable_samples": self.num_unreadable,
            "evaluation_failed_samples": self.num_evaluation_failed,
            "evaluation_failures": self.evaluation_failures,
            "not_applicable": dict(self.not_applicable),
            "results": self.results,
            "curves": self.curves,
        }

    def on_predict_end(self) -> None:
        """Say why a metric's count is 0, and fail a run that evaluated nothing.

        Lightning calls this after every callback's ``on_predict_end``: ``callbacks.ResultsWriter`` has written
        ``results.json`` and the other callbacks what there was.
        """
        if self.trainer.is_global_zero:
            for line in zero_count_lines(self.zero_count_reasons):
                print(line)
        if self.nothing_evaluated:
            raise NothingEvaluatedError(self.nothing_evaluated)


def _merge_outputs(parts: list[PredictOutput]) -> PredictOutput:
    """One output of sub-batches explained in turn: explanations in order, laps summed, every image timed."""
    out = PredictOutput({label: [] for label in parts[0].explanations}, [])
    for part in parts:
        for label, exps in part.explanations.items():
            out.explanations[label] += exps
        out.sample_ids += part.sample_ids
        out.failures += part.failures
        for phase, seconds in part.timing.items():
            out.timing[phase] = out.timing.get(phase, 0.0) + seconds
        out.timed += part.timed
    return out


def _free_device_cache(device: torch.device) -> None:
    """Return cached blocks to the device after an out-of-memory error (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _evaluation_failures(misses: dict[str, Misses]) -> Counter:
    """Samples whose evaluation raised: per method label, and in total (key ``None``: distinct samples)."""
    out: Counter = Counter()
    for by_label in misses.values():
        failed = [label for label, by_metric in by_label.items() if _evaluation_failed(by_metric)]
        out.update(failed)
        out[None] += bool(failed)
    return out


def _evaluation_failed(by_metric: dict[str, str]) -> bool:
    return any(str(why).startswith(EVALUATION_FAILED) for why in by_metric.values())


def _nothing_evaluated(
    results: dict[str, dict[str, dict[str, Any]]], explained: int, unreadable: int, failed: int
) -> str | None:
    """The error message of a run that evaluated nothing, or ``None``."""
    if explained == 0:
        return f"nothing was evaluated: no sample was explained ({unreadable} unreadable, {failed} failed)"
    counts = [s["count"] for group in results.values() for s in group.values() if not s.get("n/a")]
    if counts and not any(counts):
        return f"nothing was evaluated: {explained} samples explained, but no metric received a valid sample"
    return None


def _num_predict_samples(trainer: L.Trainer) -> int | None:
    """Length of the predict dataset (``None`` when unknown, e.g. an iterable dataset)."""
    datamodule = getattr(trainer, "datamodule", None)
    try:
        loader = (
            datamodule.predict_dataloader()
            if datamodule is not None
            else trainer.predict_loop._data_source.dataloader()
        )
        return len(loader.dataset)
    except (AttributeError, TypeError, NotImplementedError):
        return None


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
