"""``dexar report``: rebuild the paper's tables from finished runs, with the published numbers beside ours.

Runs are found under the given paths: every ``results.json`` (written by predict) with the ``variant.json``
beside it (written by ``train_eval.py`` for configs with an ``experiment`` section: table, attributes,
grid variant) and ``timing.json`` (seconds per image), or — for runs that only exist as W&B offline runs —
every ``wandb/offline-run-*`` directory (the logged CLI config holds the experiment and variant, the
history the ``<method>/<metric>`` values). Each result is placed by its attributes (``model``, ``dataset``,
grid axes, ``method``) into the rows and column groups of its table (:data:`TABLES`); a cell shows
``ours (paper)`` where the paper reports the same setting, and only ours elsewhere (e.g. on Shapes).
``experiment.attrs.method_attrs`` (``{label: {attribute: value}}``) overrides attributes per method label,
so settings run side by side in one run can fill different cells (e.g. table 8's filler on/off columns).
Runs of no paper table (no ``variant.json``, e.g. the default run) go to one more table, a row per run
directory and method, a column per metric they report.

sec/img is the paper's: each method run on its own (``alone`` in ``timing.json``, see
:mod:`dexar.phase_timing`); ``shared sec/img`` is our own column, the method's cost in the run (the
trace shared by all methods of the run plus its own work). A method the model cannot run reads
``n/a (<reason>)``.

Outputs: ``report.md`` (all tables), ``<table>.csv`` (same layout, raw keys), and PNGs of the mean
perturbation curves and an overlay gallery (see :mod:`dexar.report_plots`). Under each table, links to the
HTML explorer of each of its runs that has one (``<run>/explorer/index.html``, written by predict),
relative to the report's directory.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dexar.paper_numbers import PAPER
from dexar.phase_timing import method_seconds
from dexar.report_names import display


@dataclass(frozen=True)
class TableSpec:
    """Layout of one paper table.

    Attributes:
        key: Table id (``experiment.table`` of its configs).
        title: Caption.
        rows: Run attributes forming a row, e.g. ``("model", "method")``.
        groups: Run attributes forming a column group, e.g. ``("dataset",)``.
        metrics: ``(metric, header, scale)``; ours are multiplied by ``scale`` (100 where the paper prints %).
    """

    key: str
    title: str
    rows: tuple[str, ...]
    groups: tuple[str, ...]
    metrics: tuple[tuple[str, str, float], ...]


_PERT = (("pos_auc", "Pos. ↑", 1.0), ("neg_auc", "Neg. ↓", 1.0))
_SEC = (("sec_per_img", "sec/img", 1.0), ("shared_sec_per_img", "shared sec/img", 1.0))
"""The paper's sec/img (the method alone) and ours beside it (its share of a run with every method)."""
OTHER_RUNS = "runs"
"""Table key of the runs of no paper table (one row per run directory and method)."""
TABLES: dict[str, TableSpec] = {
    t.key: t
    for t in (
        TableSpec(
            "table1",
            "Table 1: perturbation AUC (ImageNet, VQAv2) and sec/img",
            ("model", "method"),
            ("dataset",),
            (*_PERT, *_SEC),
        ),
        TableSpec("table1b", "Florence-2 / PaliGemma: perturbation AUC", ("model", "method"), ("dataset",), _PERT),
        TableSpec(
            "table2",
            "Table 2: localization on PascalVOC (%)",
            ("model", "method"),
            (),
            (("soft_iou", "soft-IoU ↑", 100.0), ("iou", "IoU ↑", 100.0), ("epg", "EPG ↑", 100.0)),
        ),
        TableSpec(
            "table3",
            "Table 3: head-filter ablation (mask SNR, MSE)",
            ("head_filter",),
            ("model",),
            (("snr", "SNR ↑", 1.0), ("mse", "MSE ↓", 1.0)),
        ),
        TableSpec(
            "table4",
            "Table 4: head × filler-word filtering (filler SNR in dB, mask MSE, EPG %)",
            ("head", "filler"),
            ("model",),
            (("filler_snr", "SNR dB ↑", 1.0), ("mse", "MSE ↓", 1.0), ("epg", "EPG ↑", 100.0)),
        ),
        TableSpec(
            "table5",
            "Table 5: ReLU × intermediate layers (IoU %)",
            ("relu", "layers"),
            ("model",),
            (("iou", "IoU ↑", 100.0),),
        ),
        TableSpec(
            "table6",
            "Table 6: all perturbation metrics and sec/img",
            ("model", "method"),
            (),
            (
                *_PERT,
                ("pic_auc", "IC ↑", 1.0),
                ("insertion_auc", "Insert. ↓", 1.0),
                ("deletion_auc", "Del. ↑", 1.0),
                *_SEC,
            ),
        ),
        TableSpec("table7", "Table 7: TAM vs DEX-AR (perturbation AUC)", ("model", "method"), (), _PERT),
        TableSpec(
            "table8",
            "Table 8: filler SNR (dB) by head filter; columns: corruption (ImageNet-C severity 5), filler filter ✓/✗",
            ("method",),
            ("corruption", "filler"),
            (("filler_snr", "SNR dB ↑", 1.0),),
        ),
    )
}


@dataclass(frozen=True)
class NotApplicable:
    """A cell of a method the model cannot run (``n/a`` in ``results.json``), with the reason."""

    reason: str

    def __str__(self) -> str:
        return f"n/a ({self.reason})"


Cell = float | NotApplicable


@dataclass
class Run:
    """One finished run.

    Attributes:
        path: Run directory (or W&B offline run directory).
        table: Paper table the run feeds (``None``: not a paper run).
        attrs: ``experiment.attrs`` plus the grid variant.
        results: Method label → metric → ``{"value", "count", ...}``.
        curves: Method label → curve metric → ``{"levels", "y"[, "x"]}``.
        seconds_per_image: Timing phases (``trace``, ``generation``, ``method/<label>``, ...).
        mtime: Modification time of the results (newest wins when two runs fill one cell).
        method_attrs: Method label → attributes replacing ``attrs`` (and ``method``) for its results.
    """

    path: Path
    table: str | None
    attrs: dict[str, str]
    results: dict[str, dict[str, dict[str, Any]]]
    curves: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    seconds_per_image: dict[str, float] = field(default_factory=dict)
    mtime: float = 0.0
    method_attrs: dict[str, dict[str, str]] = field(default_factory=dict)

    def values(self) -> Iterable[tuple[str, str, Cell]]:
        """``(method label, metric, value)`` of every result, and each method's times.

        Times (if measured): ``sec_per_img`` (the method alone, the paper's) and ``shared_sec_per_img``
        (its cost in this run). A ``null`` value (no valid sample) is NaN; a method the model cannot run gives
        :class:`NotApplicable` for its metrics and times.
        """
        seconds = method_seconds(self.seconds_per_image)
        for label, group in self.results.items():
            reason = next((s["n/a"] for s in group.values() if s.get("n/a")), None)
            for metric, stats in group.items():
                value = stats.get("value")
                yield label, metric, NotApplicable(reason) if reason else float("nan" if value is None else value)
            if reason:
                yield label, "sec_per_img", NotApplicable(reason)
                yield label, "shared_sec_per_img", NotApplicable(reason)
            for key, name in (("alone", "sec_per_img"), ("shared", "shared_sec_per_img")):
                if key in seconds.get(label, {}):
                    yield label, name, seconds[label][key]


def _attrs(record: dict[str, Any]) -> dict[str, str]:
    out = {str(k): _label(v) for k, v in (record.get("attrs") or {}).items() if k != "method_attrs"}
    out.update({str(k): str(v) for k, v in (record.get("variant") or {}).items()})
    return out


def _method_attrs(record: dict[str, Any]) -> dict[str, dict[str, str]]:
    given = (record.get("attrs") or {}).get("method_attrs") or {}
    return {str(label): {str(k): _label(v) for k, v in attrs.items()} for label, attrs in given.items()}


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def read_results_dir(path: Path, name: str | None = None) -> Run:
    """A run from ``results.json`` (+ ``variant.json``, ``timing.json``) in ``path``.

    Without ``variant.json`` (a run of no paper table) the run goes to the :data:`OTHER_RUNS` table
    as attribute ``run`` = ``name`` (default: the directory name).
    """
    try:
        payload = json.loads((path / "results.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / 'results.json'}: unreadable ({err})") from None
    variant = json.loads((path / "variant.json").read_text()) if (path / "variant.json").is_file() else {}
    timing = json.loads((path / "timing.json").read_text()) if (path / "timing.json").is_file() else {}
    return Run(
        path=path,
        table=variant.get("table") or OTHER_RUNS,
        attrs=_attrs(variant) if variant else {"run": name or path.name},
        results=payload.get("results", {}),
        curves=payload.get("curves", {}),
        seconds_per_image=timing.get("seconds_per_image", {}),
        mtime=(path / "results.json").stat().st_mtime,
        method_attrs=_method_attrs(variant),
    )


def read_wandb_dir(path: Path) -> Run:
    """A run from a W&B offline run directory (``offline-run-*``): CLI config and logged metrics."""
    from callbacks.wandb_records import read_run

    logged = read_run(path)
    cli = logged["config"].get("cli", {})
    cli = cli.get("value", cli) if isinstance(cli, dict) else {}
    experiment = cli.get("experiment") or {}
    flat = {k: v for row in logged["history"] for k, v in row.items()}
    flat.update(logged["summary"])
    results: dict[str, dict[str, dict[str, Any]]] = {}
    timing: dict[str, float] = {}
    for key, value in flat.items():
        if not isinstance(value, int | float) or key.startswith("_") or "/" not in key:
            continue
        head, name = key.split("/", 1)
        if head == "time_per_image":
            timing[name] = float(value)
        elif "/" not in name:
            results.setdefault(head, {})[name] = {"value": float(value)}
    return Run(
        path=path,
        table=experiment.get("table") or OTHER_RUNS,
        attrs=_attrs({"attrs": experiment.get("attrs"), "variant": cli.get("variant")})
        if experiment
        else {"run": path.name},
        results=results,
        seconds_per_image=timing,
        mtime=path.stat().st_mtime,
        method_attrs=_method_attrs(experiment),
    )


def collect(paths: Sequence[str | Path]) -> list[Run]:
    """Every finished run under ``paths``: ``results.json`` dirs, and W&B offline runs of dirs without one."""
    runs: list[Run] = []
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such run directory")
        result_dirs = {p.parent for p in root.rglob("results.json")}
        runs += [read_results_dir(d, _run_name(root, d)) for d in sorted(result_dirs)]
        for wandb_dir in sorted(root.rglob("offline-run-*")):
            owner = wandb_dir.parent.parent if wandb_dir.parent.name == "wandb" else wandb_dir.parent
            if owner not in result_dirs and any(wandb_dir.glob("run-*.wandb")):
                runs.append(read_wandb_dir(wandb_dir))
    return runs


def _run_name(root: Path, run_dir: Path) -> str:
    """How a run of no paper table is named in the report: its directory relative to the given path."""
    relative = run_dir.relative_to(root).as_posix()
    return root.resolve().name if relative == "." else relative


def other_runs_spec(runs: Sequence[Run]) -> TableSpec:
    """The table of the runs of no paper table: a row per run and method, a column per metric found."""
    names = dict.fromkeys(m for r in runs if r.table == OTHER_RUNS for _, m, _ in r.values())
    sec = [m for m, _, _ in _SEC]
    metrics = tuple((m, m, 1.0) for m in names if m not in sec) + tuple(t for t in _SEC if t[0] in names)
    return TableSpec(OTHER_RUNS, "Runs of no paper table", ("run", "method"), (), metrics)


@dataclass
class Table:
    """A filled table: ``cells[(row, group, metric)] = ours`` (scaled, or ``n/a``) and the paper's numbers."""

    spec: TableSpec
    rows: list[tuple[str, ...]]
    groups: list[tuple[str, ...]]
    cells: dict[tuple[tuple[str, ...], tuple[str, ...], str], Cell]
    paper: dict[tuple[tuple[str, ...], tuple[str, ...], str], float]
    runs: int


def _ordered(found: Iterable[tuple[str, ...]], preferred: Iterable[tuple[str, ...]]) -> list[tuple[str, ...]]:
    found = list(dict.fromkeys(found))
    first = [k for k in dict.fromkeys(preferred) if k in found]
    return first + [k for k in found if k not in first]


def build_table(spec: TableSpec, runs: Sequence[Run]) -> Table:
    """Place every run of ``spec.key`` into rows × column groups (newest run wins a cell)."""
    cells: dict[tuple[tuple[str, ...], tuple[str, ...], str], float] = {}
    scale = {m: s for m, _, s in spec.metrics}
    used = 0
    for run in sorted((r for r in runs if r.table == spec.key), key=lambda r: r.mtime):
        placed = False
        for label, metric, value in run.values():
            if metric not in scale:
                continue
            attrs = {**run.attrs, "method": label, **run.method_attrs.get(label, {})}
            if not all(k in attrs for k in spec.rows + spec.groups):
                continue
            row = tuple(attrs[k] for k in spec.rows)
            group = tuple(attrs[k] for k in spec.groups)
            cells[(row, group, metric)] = value if isinstance(value, NotApplicable) else value * scale[metric]
            placed = True
        used += placed
    paper = PAPER.get(spec.key, {})
    rows = _ordered([k[0] for k in cells], [k[0] for k in paper])
    groups = _ordered([k[1] for k in cells], [k[1] for k in paper])
    return Table(spec, rows, groups, cells, paper, used)


def format_value(value: Cell | None) -> str:
    """Two decimals as in the paper (three below 1, where two hide the differences).

    ``None`` (no run) is empty; a method the model cannot run reads ``n/a (<reason>)``.
    """
    if value is None:
        return ""
    if isinstance(value, NotApplicable):
        return str(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def _columns(table: Table) -> list[tuple[tuple[str, ...], str, str]]:
    return [(g, m, h) for g in table.groups for m, h, _ in table.spec.metrics]


def to_markdown(table: Table) -> str:
    """The table in the paper's layout; cells ``ours (paper)`` where the paper has the setting."""
    spec = table.spec
    cols = _columns(table)
    head = [a.replace("_", " ") for a in spec.rows] + [
        (" ".join(display(v) for v in g) + " " if g else "") + h for g, _, h in cols
    ]
    lines = [f"### {spec.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    previous: tuple[str, ...] = ()
    for row in table.rows:
        shown = [display(v) if previous[: i + 1] != row[: i + 1] else "" for i, v in enumerate(row)]
        previous = row
        cells = []
        for g, m, _ in cols:
            ours, paper = table.cells.get((row, g, m)), table.paper.get((row, g, m))
            text = format_value(ours) if ours is not None else "—"
            cells.append(f"{text} ({paper:.2f})" if paper is not None else text)
        lines.append("| " + " | ".join(shown + cells) + " |")
    lines += [
        "",
        f"ours (paper) · {table.runs} run(s)"
        + (" · paper numbers only where the setting matches" if table.paper else ""),
    ]
    return "\n".join(lines)


def write_csv(table: Table, path: Path) -> None:
    """The table as CSV: row attributes, then ``<group> <metric>`` (full precision) and ``... (paper)`` columns."""
    cols = _columns(table)
    names = [" ".join([*g, m]) for g, m, _ in cols]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*table.spec.rows, *[c for n in names for c in (n, f"{n} (paper)")]])
        for row in table.rows:
            values = []
            for g, m, _ in cols:
                ours, paper = table.cells.get((row, g, m)), table.paper.get((row, g, m))
                text = "" if ours is None else "n/a" if isinstance(ours, NotApplicable) else repr(ours)
                values += [text, "" if paper is None else f"{paper:.2f}"]
            writer.writerow([*row, *values])


def explorer_links(runs: Sequence[Run], out: Path) -> str:
    """Markdown links to the explorer (``explorer/index.html``) of each run that has one, relative to ``out``."""
    links = []
    for run in sorted(runs, key=lambda r: str(r.path)):
        index = run.path / "explorer" / "index.html"
        if index.is_file():
            target = Path(os.path.relpath(index.resolve(), out.resolve())).as_posix()
            name = run.attrs.get("run") or " · ".join(f"{k}={v}" for k, v in sorted(run.attrs.items())) or run.path.name
            links.append(f"[{name}]({target.replace(' ', '%20')})")
    return "Explorers (open in a browser): " + " · ".join(links) if links else ""


def report(paths: Sequence[str | Path], out: str | Path, gallery_samples: int = 2) -> str:
    """Build every table with runs under ``paths``; write Markdown, CSVs and PNGs to ``out``; return the Markdown."""
    from dexar.report_plots import draw_curves, draw_gallery

    runs = collect(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for spec in [*TABLES.values(), other_runs_spec(runs)]:
        table = build_table(spec, runs)
        if not table.cells:
            continue
        write_csv(table, out / f"{spec.key}.csv")
        parts.append(to_markdown(table))
        mine = [r for r in runs if r.table == spec.key]
        figures = draw_curves(spec, mine, out) + draw_gallery(spec, mine, out, gallery_samples)
        if figures:
            parts.append(" ".join(f"![{p.stem}]({p.name})" for p in figures))
        links = explorer_links(mine, out)
        if links:
            parts.append(links)
    unknown = sorted({str(r.table) for r in runs if r.table not in TABLES and r.table != OTHER_RUNS})
    if unknown:
        parts.append(f"run(s) of unknown table(s) {', '.join(unknown)} were skipped (known: {', '.join(TABLES)}).")
    text = "\n\n".join(parts) if parts else "no runs found"
    (out / "report.md").write_text(text + "\n")
    return text
