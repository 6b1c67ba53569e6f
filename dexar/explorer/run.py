"""The run explorer: ``<run dir>/explorer/index.html`` plus one page per sample in ``explorer/samples/``.

**Why an index plus per-sample pages, not one file.** Every per-sample page is needed on its own
anyway — it is the ``explanation.html`` of ``dexar explain`` and the ``wandb.Html`` cell of the W&B
table — so the index reuses exactly those pages in an ``<iframe>`` (one renderer, one thing to test).
The index itself holds only the sample list (ids, answers, 56-px thumbnails, metric values) and the
mean curves, so it opens in constant time whatever the number of samples, and a sample's maps are
decoded only when it is opened; one file would grow by every sample's maps (tens of kB each) and
parse them all before showing anything. The cost: the folder must stay together (it does: it lives
in the run directory), and each page carries its own copy of the ~25 kB script and style.

**Size budget** (checked by the tests on synthetic runs, 24×24 grids, 320×240 images):
see :data:`SIZE_BUDGET`.

Per-sample metric values and sorting: each :class:`MetricSpec` says whether higher is better, so the
list can sort "worst first" (lowest EPG first, highest negative-perturbation AUC first, ...).
Missing or non-finite values sort last in either direction.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dexar.explorer.curves import curve_svg, method_colour
from dexar.explorer.encode import thumbnail_uri
from dexar.explorer.page import CSP, asset, fill, shell, write_explanation_html
from dexar.explorer.payload import ExplanationPayload

SIZE_BUDGET = {
    "page_fixed": 96 * 1024,
    "page_per_method": 24 * 1024,
    "index_fixed": 64 * 1024,
    "index_per_sample": 4 * 1024,
}
"""Bytes: a sample page ≤ ``page_fixed + methods × page_per_method`` (the fixed part is the script,
style and image — ≤ 512 px, PNG or JPEG — the per-method part the maps of up to 16 words of 24×24
grids as 8-bit PNGs); the index ≤ ``index_fixed + samples × index_per_sample`` (list row,
thumbnail, metric values; the curves are in the fixed part). 100 samples × 3 methods: ≤ 16.8 MB of
sample pages, each opened alone, and an index ≤ 464 kB."""


@dataclass
class MetricSpec:
    """A per-sample metric of the run.

    Attributes:
        name: Key in :attr:`RunSample.metrics` and in the curves (``epg``, ``pos_auc``, ...).
        higher_is_better: Direction (``torchmetrics``' ``higher_is_better``); None if unknown.
        label: Display name; default: ``name``.
    """

    name: str
    higher_is_better: bool | None = None
    label: str | None = None


@dataclass
class RunSample:
    """One overlay sample of a run: its explanation payload and its metric values.

    Attributes:
        payload: What its page shows (every method of the run).
        metrics: ``{method: {metric: value}}``; missing or None for metrics not computed.
    """

    payload: ExplanationPayload
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)


@dataclass
class RunPayload:
    """What the run explorer shows.

    Attributes:
        samples: The overlay samples, in dataset order.
        metrics: The metrics with per-sample values, in display order.
        curves: Mean curves as in ``results.json``: ``{method: {metric: {"levels", "y"} or
            {"levels", "x", "y"}}}`` (PIC has ``x``).
        means: Mean metric values ``{method: {metric: value}}`` (``results.json``'s ``value``).
        title: Page title (e.g. the run directory's name).
        details: Short facts shown under the title (``{"dataset": ..., "model": ...}``).
    """

    samples: list[RunSample]
    metrics: list[MetricSpec] = field(default_factory=list)
    curves: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    means: dict[str, dict[str, float | None]] = field(default_factory=dict)
    title: str = "dexar run"
    details: dict[str, str] = field(default_factory=dict)


def metric_specs(metric_sets: Mapping[str, Mapping[str, Any]]) -> list[MetricSpec]:
    """The per-sample metrics of ``{method: {name: metric}}`` (e.g. ``ExplainerModule.metric_sets``).

    A metric counts when it has ``per_sample``; its direction is its ``higher_is_better``. First-seen
    order; a name seen with two directions gets None (unknown).
    """
    specs: dict[str, MetricSpec] = {}
    for group in metric_sets.values():
        for name, metric in group.items():
            if not hasattr(metric, "per_sample"):
                continue
            direction = getattr(metric, "higher_is_better", None)
            if name in specs and specs[name].higher_is_better != direction:
                specs[name].higher_is_better = None
            specs.setdefault(name, MetricSpec(name, direction))
    return list(specs.values())


def run_payload_from_results(
    results: Mapping[str, Any], samples: list[RunSample], metrics: list[MetricSpec], title: str = "dexar run"
) -> RunPayload:
    """A :class:`RunPayload` from the ``results.json`` predict writes (means, curves, dataset, model)."""
    means = {
        method: {name: stats.get("value") for name, stats in by_metric.items()}
        for method, by_metric in results.get("results", {}).items()
    }
    details = {key: str(results[key]) for key in ("dataset", "model") if results.get(key) is not None}
    for key in ("failed_samples", "unreadable_samples"):
        if results.get(key):
            details[key.replace("_", " ")] = str(results[key])
    return RunPayload(samples, metrics, dict(results.get("curves", {})), means, title, details)


def safe_name(sample_id: str) -> str:
    """A file-name stem for a sample id (letters, digits, ``-_.``; others become ``_``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in sample_id).strip(".") or "sample"


def unique_names(ids: list[str]) -> list[str]:
    """:func:`safe_name` of each id, made unique with ``-2``, ``-3``, ... (case-insensitively)."""
    seen: set[str] = set()
    out = []
    for sample_id in ids:
        base = safe_name(sample_id)
        name, n = base, 1
        while name.lower() in seen:
            n += 1
            name = f"{base}-{n}"
        seen.add(name.lower())
        out.append(name)
    return out


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _metric_label(name: str, specs: Mapping[str, MetricSpec]) -> str:
    """``label ↑`` / ``label ↓`` of a metric (its name when it has no spec)."""
    spec = specs.get(name)
    return ((spec.label if spec and spec.label else None) or name) + _arrow(spec)


def _arrow(spec: MetricSpec | None) -> str:
    if spec is None or spec.higher_is_better is None:
        return ""
    return " ↑" if spec.higher_is_better else " ↓"


def means_table(run: RunPayload, methods: list[str], labels: Mapping[str, str]) -> str:
    """HTML table of the mean metric values: a row per method, a column per metric."""
    names = [s.name for s in run.metrics] or sorted({k for v in run.means.values() for k in v})
    specs = {s.name: s for s in run.metrics}
    if not run.means or not names:
        return ""
    head = "".join(f'<th scope="col">{html.escape(_metric_label(n, specs))}</th>' for n in names)
    rows = []
    for i, method in enumerate(methods):
        cells = []
        for n in names:
            value = _number(run.means.get(method, {}).get(n))
            cells.append(f"<td>{'–' if value is None else f'{value:.4g}'}</td>")
        dot = f'<span class="dx-dot" style="background:{method_colour(i)}" aria-hidden="true"></span>'
        rows.append(f'<tr><th scope="row">{dot}{html.escape(labels.get(method, method))}</th>{"".join(cells)}</tr>')
    return (
        '<table class="dx-means"><caption>Mean over the run</caption>'
        f'<thead><tr><th scope="col">Method</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def curves_html(run: RunPayload, methods: list[str], labels: Mapping[str, str]) -> str:
    """One inline SVG chart per curve metric, a line per method."""
    specs = {s.name: s for s in run.metrics}
    metric_names: list[str] = []
    for by_metric in run.curves.values():
        metric_names += [n for n in by_metric if n not in metric_names]
    colours = {labels.get(m, m): method_colour(i) for i, m in enumerate(methods)}
    charts = []
    for name in metric_names:
        series = {}
        for method in methods:
            curve = run.curves.get(method, {}).get(name)
            if curve:
                x = curve.get("x", curve.get("levels"))
                series[labels.get(method, method)] = (x, curve["y"])
        title = _metric_label(name, specs)
        pic = any("x" in run.curves.get(m, {}).get(name, {}) for m in methods)
        charts.append(
            curve_svg(
                title,
                series,
                colours,
                x_label="normalized size" if pic else "fraction perturbed",
                y_label="normalized PPL gain" if pic else "normalized PPL",
            )
        )
    return "".join(f'<figure class="dx-chart-box">{c}</figure>' for c in charts if c)


def legend_html(methods: list[str], labels: Mapping[str, str]) -> str:
    """Method colour legend of the curves."""
    items = "".join(
        f'<li><span class="dx-dot" style="background:{method_colour(i)}" aria-hidden="true"></span>'
        f"{html.escape(labels.get(m, m))}</li>"
        for i, m in enumerate(methods)
    )
    return f'<ul class="dx-chart-legend" aria-label="Methods">{items}</ul>'


def sample_row(payload: ExplanationPayload, page: Path, metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The index's entry of one sample page: id, answer, link, thumbnail, metric values, methods."""
    return {
        "id": payload.sample_id or page.stem,
        "answer": payload.answer,
        "href": f"samples/{page.name}",
        "thumb": thumbnail_uri(payload.image),
        "metrics": {m: {k: _number(v) for k, v in by_metric.items()} for m, by_metric in metrics.items()},
        "methods": [{"name": m.name, "label": m.label or m.name} for m in payload.methods],
    }


def write_run_explorer(run: RunPayload, run_dir: str | Path, **sizes: int) -> Path:
    """Write ``<run_dir>/explorer/index.html`` and ``explorer/samples/<id>.html``; returns the index.

    Sample pages open with the methods side by side. Pages of samples no longer in ``run`` (an
    earlier write) are removed, so the folder always matches its index.
    """
    if not run.samples:
        raise ValueError("write_run_explorer: the run has no samples to show")
    out = Path(run_dir) / "explorer"
    samples_dir = out / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    ids = [s.payload.sample_id or f"sample-{i}" for i, s in enumerate(run.samples)]
    names = unique_names(ids)
    rows = []
    for sample, sample_id, name in zip(run.samples, ids, names, strict=True):
        page = write_explanation_html(sample.payload, samples_dir / f"{name}.html", side_by_side=True, **sizes)
        rows.append({**sample_row(sample.payload, page, sample.metrics), "id": sample_id})
    for stale in set(samples_dir.glob("*.html")) - {samples_dir / f"{n}.html" for n in names}:
        stale.unlink()
    return write_run_index(run, rows, out)


def write_run_index(run: RunPayload, rows: list[dict[str, Any]], out: str | Path) -> Path:
    """Write ``out/index.html``: the sample list ``rows`` (:func:`sample_row`) and ``run``'s summary.

    ``run.samples`` is not read (the pages exist already): methods come from the rows, in first-seen
    order; the metrics, curves, means, title and details from ``run``.
    """
    if not rows:
        raise ValueError("write_run_index: the run has no samples to show")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels: dict[str, str] = {}
    for row in rows:
        for m in row.get("methods", []):
            labels.setdefault(m["name"], m["label"])
    for method in [*run.curves, *run.means]:  # methods with curves but no sample page
        labels.setdefault(method, method)
    methods = list(labels)
    data = {
        "title": run.title,
        "methods": [{"name": m, "label": labels[m]} for m in methods],
        "metrics": [
            {"name": s.name, "label": s.label or s.name, "higher_is_better": s.higher_is_better} for s in run.metrics
        ],
        "samples": [{k: v for k, v in row.items() if k != "methods"} for row in rows],
    }
    details = " · ".join(html.escape(f"{k}: {v}") for k, v in run.details.items())
    counts = f"{len(rows)} samples · {len(methods)} method{'s' if len(methods) != 1 else ''}"
    curves = curves_html(run, methods, labels)
    body = fill(
        asset("index-body.html"),
        title=html.escape(run.title),
        details=" · ".join(x for x in (details, counts) if x),
        means=means_table(run, methods, labels),
        curves=f'<div class="dx-curves">{legend_html(methods, labels)}<div class="dx-charts">{curves}</div></div>'
        if curves
        else "",
    )
    css = asset("explorer.css") + asset("run.css")
    index = shell(run.title, body, "dx-run-data", data, css, asset("run.js"), csp=f"{CSP}; frame-src file: 'self'")
    path = out / "index.html"
    path.write_text(index, encoding="utf-8")
    return path
