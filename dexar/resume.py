"""Resume support: per-sample metric contributions that survive a killed run, and what a run already did.

A predict run evaluates each sample into *fresh* copies of its metrics and keeps the resulting states
(the sample's **contribution**: ``sum`` states hold the sample's own sums, ``cat`` states its own rows).
``HeatmapWriter`` stores the contributions in the sample's shard. At the end of the epoch the module
rebuilds its metrics from all contributions — those restored from earlier shards and the new ones — in
one deterministic order (natural sort of sample ids), so a run killed at any point and restarted with the
same command ends with exactly the same results as an uninterrupted run, each sample counted once.

Only ``sum`` and ``cat`` reductions can be split per sample this way; every metric of the package uses
them. Other reductions are refused with an error naming the metric and state.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_sum

from dexar.phase_timing import PhaseTotals

MetricStates = dict[str, torch.Tensor]
"""State name → tensor of one metric (a ``cat`` state is concatenated along dim 0)."""
Contribution = dict[str, dict[str, MetricStates]]
"""Method label → metric name → states: what one sample added to the metrics."""
Rows = dict[str, dict[str, list[str]]]
"""Method label → metric name → row ids one sample produced (see ``Evaluator.rows``)."""
Misses = dict[str, dict[str, str]]
"""Method label → metric name → why one sample produced no row for the metric."""


def _reduction(metric: Metric, name: str) -> str:
    fx = metric._reductions[name]
    if fx is dim_zero_sum:
        return "sum"
    if fx is dim_zero_cat:
        return "cat"
    raise ValueError(
        f"metric {type(metric).__name__} state {name!r} has reduction {getattr(fx, '__name__', fx)!r}; "
        "resume needs 'sum' or 'cat' states"
    )


def check_resumable(metric: Metric, label: str = "") -> None:
    """Raise ``ValueError`` (naming the metric) if a state cannot be split into per-sample contributions."""
    for name in metric._defaults:
        try:
            _reduction(metric, name)
        except ValueError as err:
            raise ValueError(f"{label}: {err}" if label else str(err)) from None


def metric_states(metric: Metric) -> MetricStates:
    """The current states of ``metric`` as plain CPU tensors (``cat`` lists concatenated, possibly empty)."""
    out: MetricStates = {}
    for name in metric._defaults:
        value = getattr(metric, name)
        if _reduction(metric, name) == "cat":
            parts = [v for v in value] if isinstance(value, list) else [value]
            value = torch.cat([p.reshape(p.shape or (1,)) for p in parts]) if parts else torch.empty(0)
        out[name] = value.detach().cpu().clone().contiguous()
    return out


def add_states(metric: Metric, states: Mapping[str, torch.Tensor]) -> None:
    """Add one contribution to ``metric``: ``sum`` states are added, ``cat`` rows appended."""
    for name, value in states.items():
        if name not in metric._defaults:
            raise ValueError(f"metric {type(metric).__name__} has no state {name!r} (stored by another version?)")
        current = getattr(metric, name)
        if _reduction(metric, name) == "cat":
            if value.numel():
                current.append(value.to(device=metric.device, dtype=metric.dtype))
        else:
            setattr(metric, name, current + value.to(device=current.device, dtype=current.dtype))
    metric._update_count += 1
    metric._computed = None


def natural_key(sample_id: str) -> list[Any]:
    """Sort key that orders ``shapes-test-2`` before ``shapes-test-10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", sample_id)]


def fingerprint(settings: Mapping[str, Any]) -> str:
    """Short stable hash of the settings a run's shards depend on (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Progress:
    """What the shards of an earlier attempt of a run hold.

    ``done``, ``fingerprints`` and ``shards`` cover every shard. The rest covers the shards a process
    **owns** (see :func:`owner_rank`), so that summed over the processes of the new attempt each
    sample, failure and second counts once, and each process holds what it held in an uninterrupted
    run with as many processes (same per-rank sums: the same results, bit for bit).

    Attributes:
        done: Ids of samples already handled (explained, failed or unreadable): never recomputed.
        failures: ``(sample_id, message)`` of samples whose explanation raised.
        unreadable: ``(sample_id, reason)`` of samples whose files could not be decoded.
        explained: Ids of the samples explained.
        contributions: Sample id → per-sample metric states (see :data:`Contribution`).
        rows: Sample id → row ids of those states.
        misses: Sample id → method label → metric → why the sample gave the metric no row.
        timing: Measured seconds and images per phase (:mod:`dexar.phase_timing`).
        fingerprints: Settings fingerprints found in the shards.
        shards: Number of shard files read.
    """

    done: set[str] = field(default_factory=set)
    failures: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    explained: set[str] = field(default_factory=set)
    contributions: dict[str, Contribution] = field(default_factory=dict)
    rows: dict[str, Rows] = field(default_factory=dict)
    misses: dict[str, Misses] = field(default_factory=dict)
    timing: PhaseTotals = field(default_factory=PhaseTotals)
    fingerprints: set[str] = field(default_factory=set)
    shards: int = 0


def owner_rank(shard_rank: int, world_size: int) -> int:
    """The process of this attempt that takes over the shards process ``shard_rank`` wrote.

    ``shard_rank % world_size``: with the same number of processes every rank takes back its own
    shards (the sampler gives it the same samples again); with fewer, the extra ranks' shards are
    spread over the others.
    """
    return shard_rank % max(1, world_size)


def sorted_ids(ids: Iterable[str]) -> list[str]:
    """Sample ids in the deterministic order in which contributions are merged."""
    return sorted(ids, key=natural_key)
