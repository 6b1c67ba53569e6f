"""Why a metric received no sample, and the error of a run that evaluated nothing.

A metric's ``count`` is 0 when no sample could feed it (no masks, no word masks for
``localization_target: tokens``, no ground-truth answer, ...) or when every value was degenerate
(NaN, counted in ``skipped``). The module records, per sample, method and metric, why the sample gave
the metric no row (:func:`unfed_reason`, a diagnosis of the sample against the conditions of
:class:`dexar.evaluation.Evaluator`), keeps it with the sample's metric contribution (it survives a
resume) and, at the end of the run, prints one line per metric whose count is 0
(:func:`zero_count_lines`). A run in which nothing was evaluated raises
:class:`NothingEvaluatedError` after ``results.json`` is written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from dexar.adapters.base import DexarInputError
from dexar.schema import Sample


class NothingEvaluatedError(DexarInputError):
    """No sample was evaluated (none explained, or no metric received a valid sample): the run failed."""


def unfed_reason(kind: str, sample: Sample, localization_target: str, dataset: str) -> str:
    """Why ``sample`` gave a metric of input kind ``kind`` no row (called only when it gave none).

    Args:
        kind: The metric's ``input_kind`` (``localization``, ``filler``, ``perturbation:<mode>``).
        sample: The explained sample.
        localization_target: ``sequence`` or ``tokens``.
        dataset: Dataset name for the message (e.g. ``PascalVOC``).
    """
    if kind == "localization":
        if sample.masks is None:
            return f"{dataset} samples have no object masks"
        if localization_target == "tokens":
            if sample.word_mask_index is None:
                return f"{dataset} has no word masks; use localization_target: sequence"
            return "no explained token names a masked object (word masks need answer_source: ground_truth)"
        return "the sample's mask could not be used"
    if kind == "filler":
        if sample.word_is_content is None:
            return f"{dataset} has no content/filler word labels"
        if sample.answer is None:
            return f"{dataset} samples have no ground-truth answer"
        return "content/filler word labels need the ground-truth answer; use answer_source: ground_truth"
    if kind.startswith("perturbation:") and sample.answer is None:
        return f"{dataset} samples have no ground-truth answer (perturbation scores its perplexity)"
    return "the sample could not feed this metric"


def count_misses(misses: Iterable[Mapping[str, Mapping[str, str]]]) -> Counter[tuple[str, str, str]]:
    """``(label, metric, reason)`` → number of samples, over per-sample misses (label → metric → reason)."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for by_label in misses:
        for label, by_metric in by_label.items():
            for name, reason in by_metric.items():
                counts[(label, name, reason)] += 1
    return counts


def zero_count_reasons(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    misses: Mapping[tuple[str, str, str], int],
    explained: int,
    failed: int,
    unreadable: int,
) -> dict[str, dict[str, str]]:
    """Label → metric → why its count is 0, for every metric of a method that ran with ``count == 0``."""
    out: dict[str, dict[str, str]] = {}
    for label, group in results.items():
        for name, stats in group.items():
            if stats.get("n/a") or stats.get("count", 0) > 0:
                continue
            if explained == 0:
                why = f"no sample was explained ({unreadable} unreadable, {failed} failed)"
            elif stats.get("skipped", 0) > 0:
                why = f"all {stats['skipped']} values were degenerate (NaN: e.g. an empty mask or a constant map)"
            else:
                reasons = Counter({r: n for (lab, met, r), n in misses.items() if lab == label and met == name})
                why = "; ".join(f"{r} ({n} samples)" for r, n in reasons.most_common()) or "no sample fed it"
            out.setdefault(label, {})[name] = why
    return out


def zero_count_lines(reasons: Mapping[str, Mapping[str, str]]) -> list[str]:
    """One line per metric: ``"epg: 0 samples — <why>"`` (``"<label>/epg: ..."`` where methods differ)."""
    by_metric: dict[str, dict[str, str]] = {}
    for label, group in reasons.items():
        for name, why in group.items():
            by_metric.setdefault(name, {})[label] = why
    lines = []
    for name, by_label in by_metric.items():
        if len(set(by_label.values())) == 1:
            lines.append(f"{name}: 0 samples — {next(iter(by_label.values()))}")
        else:
            lines += [f"{label}/{name}: 0 samples — {why}" for label, why in by_label.items()]
    return lines
