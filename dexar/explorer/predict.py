"""The run explorer of a predict run, written as the run goes: sample pages per batch, the index at the end.

``HeatmapWriter`` calls :func:`write_sample_page` for each overlay sample (dataset index below
``num_overlays``) when its batch is written — on the process that explained it, before the batch's shard,
like the PNG overlays — and :func:`write_predict_index` once on rank 0 after every process finished.
Each page has a sidecar ``samples/<name>.json`` holding its index row (id, dataset index, answer,
thumbnail, per-sample metric values, methods), so the index needs neither the images nor the maps again:

* **DDP**: every rank writes its own samples' pages and sidecars into the shared run directory; rank 0
  lists the sidecars (after a barrier) and writes ``index.html``.
* **Resume**: pages of samples finished by an earlier attempt stay (their batches are not redone); the
  index of the finishing attempt lists them with the new ones. Sidecars of dataset indices at or past
  ``num_overlays`` (an earlier attempt with more overlays) are left out of the index.

Per-sample metric values come from the sample's metric contribution (``PredictOutput.contributions``:
the states of fresh metric copies fed this sample alone). A metric's value is the mean of the finite
entries of its ``values`` state (:class:`metrics.base.SampleMeanMetric`): one entry per sample, or one per
content word with ``localization_target: tokens`` (the sample's figure is then its words' mean);
None when there is none (a skipped, degenerate sample).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dexar.explorer.page import write_explanation_html
from dexar.explorer.payload import ExplanationPayload
from dexar.explorer.run import MetricSpec, run_payload_from_results, safe_name, sample_row, write_run_index

SIDECAR_SUFFIX = ".json"


def page_name(sample_id: str) -> str:
    """A file stem for ``sample_id``, unique without knowing the other ids.

    The id itself when it is a safe, lower-case name; otherwise :func:`~dexar.explorer.run.safe_name`
    plus 8 hex digits of the id's SHA-1 (``a/b`` and ``a_b``, or ``A`` and ``a`` on a case-insensitive
    file system, never share a page).
    """
    name = safe_name(sample_id)
    if name == sample_id and name == name.lower():
        return name
    return f"{name}-{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}"


def contribution_values(contribution: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{label: {metric: value}}`` of one sample's contribution ``{label: {metric: {state: tensor}}}``.

    Metrics without a ``values`` state (no per-sample values) are left out (module docstring).
    """
    out: dict[str, dict[str, Any]] = {}
    for label, by_metric in contribution.items():
        for name, states in by_metric.items():
            if "values" not in states:
                continue
            finite = [float(v) for v in states["values"].reshape(-1).tolist() if math.isfinite(float(v))]
            out.setdefault(label, {})[name] = sum(finite) / len(finite) if finite else None
    return out


def write_sample_page(
    payload: ExplanationPayload,
    explorer_dir: str | Path,
    index: int,
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``samples/<name>.html`` (methods side by side) and its sidecar row; returns the page.

    Args:
        payload: The sample's page (its ``sample_id`` names the files).
        explorer_dir: ``<run dir>/explorer``.
        index: The sample's dataset index (the index lists samples in this order).
        metrics: ``{method: {metric: value}}`` shown and sorted in the index.
    """
    samples_dir = Path(explorer_dir) / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    name = page_name(payload.sample_id or f"sample-{index}")
    page = samples_dir / f"{name}.html"
    # written under temporary names, then renamed: a killed run or a second writer never leaves half a file
    tmp = write_explanation_html(payload, samples_dir / f".{name}.html.{os.getpid()}.tmp", side_by_side=True)
    tmp.replace(page)
    row = {**sample_row(payload, page, metrics or {}), "index": int(index)}
    sidecar = page.with_suffix(SIDECAR_SUFFIX)
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(row, allow_nan=False), encoding="utf-8")
    tmp.replace(sidecar)
    return page


def read_sample_rows(explorer_dir: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The sidecar rows of ``explorer_dir/samples`` whose page exists, by dataset index (below ``limit``)."""
    rows = []
    for sidecar in sorted((Path(explorer_dir) / "samples").glob(f"*{SIDECAR_SUFFIX}")):
        try:
            row = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{sidecar}: unreadable explorer row ({err})") from None
        if not sidecar.with_suffix(".html").is_file() or (limit is not None and row["index"] >= limit):
            continue
        rows.append(row)
    return sorted(rows, key=lambda r: (r["index"], r["id"]))


def write_predict_index(
    run_dir: str | Path,
    metrics: Sequence[MetricSpec],
    limit: int | None = None,
    title: str | None = None,
    results: Mapping[str, Any] | None = None,
) -> Path | None:
    """Write ``<run_dir>/explorer/index.html`` from the sample pages and the run's results; None if no page.

    Args:
        run_dir: The run directory.
        metrics: The per-sample metrics, in column order (:func:`~dexar.explorer.run.metric_specs`).
        limit: List only dataset indices below this (``num_overlays``).
        title: Page title; default: the run directory's name.
        results: The ``results.json`` payload (means, curves, dataset, model), as parsed JSON; default: read
            ``<run_dir>/results.json`` (empty if there is none).
    """
    run_dir = Path(run_dir)
    explorer_dir = run_dir / "explorer"
    rows = read_sample_rows(explorer_dir, limit)
    if not rows:
        return None
    if results is None:
        results_file = run_dir / "results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    run = run_payload_from_results(results, [], list(metrics), title or run_dir.resolve().name)
    return write_run_index(run, rows, explorer_dir)
