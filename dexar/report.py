"""``dexar report``: rebuild the paper's tables from finished runs, with the published numbers beside ours.

Runs are found under the given paths: every ``results.json`` (written by predict) with the ``variant.json``
beside it (written by ``train_eval.py`` for configs with an ``experiment`` section: table, attributes,
grid variant) and ``timing.json`` (seconds per image), or — for runs that only exist as W&B offline runs —
every ``wandb/offline-run-*`` directory (the logged CLI config holds the experiment and variant, the
history the ``<method>/<metric>`` values). Each result is placed by its attributes (``model``, ``dataset``,
grid axes, ``method``) into the rows and column groups of its table (:data:`TABLES`); a cell shows
``ours (paper)`` where the paper reports the same setting, and only ours elsewhere (e.g. on Shapes).

Outputs: ``report.md`` (all tables), ``<table>.csv`` (same layout, raw keys), and PNGs of the mean
perturbation curves and an overlay gallery (see :mod:`dexar.report_plots`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dexar.paper_numbers import PAPER
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
TABLES: dict[str, TableSpec] = {
    t.key: t
    for t in (
        TableSpec(
            "table1",
            "Table 1: perturbation AUC (ImageNet, VQAv2) and sec/img",
            ("model", "method"),
            ("dataset",),
            (*_PERT, ("sec_per_img", "sec/img", 1.0)),
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
            "Table 4: head × filler-word filtering (filler SNR, mask MSE, EPG %)",
            ("head", "filler"),
            ("model",),
            (("filler_snr", "SNR ↑", 1.0), ("mse", "MSE ↓", 1.0), ("epg", "EPG ↑", 100.0)),
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
                ("sec_per_img", "sec/img", 1.0),
            ),
        ),
        TableSpec("table7", "Table 7: TAM vs DEX-AR (perturbation AUC)", ("model", "method"), (), _PERT),
        TableSpec(
            "table8",
            "Table 8: filler SNR on ImageNet-C (severity 5)",
            ("method",),
            ("corruption",),
            (("filler_snr", "SNR ↑", 1.0),),
        ),
    )
}


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
    """

    path: Path
    table: str | None
    attrs: dict[str, str]
    results: dict[str, dict[str, dict[str, Any]]]
    curves: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    seconds_per_image: dict[str, float] = field(default_factory=dict)
    mtime: float = 0.0

    def values(self) -> Iterable[tuple[str, str, float]]:
        """``(method label, metric, value)`` of every result, plus ``sec_per_img`` per method if timed."""
        for label, group in self.results.items():
            for metric, stats in group.items():
                yield label, metric, float(stats["value"])
            if f"method/{label}" in self.seconds_per_image:
                t = self.seconds_per_image
                yield label, "sec_per_img", t.get("trace", 0.0) + t.get("generation", 0.0) + t[f"method/{label}"]


def _attrs(record: dict[str, Any]) -> dict[str, str]:
    out = {str(k): _label(v) for k, v in (record.get("attrs") or {}).items()}
    out.update({str(k): str(v) for k, v in (record.get("variant") or {}).items()})
    return out


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def read_results_dir(path: Path) -> Run:
    """A run from ``results.json`` (+ ``variant.json``, ``timing.json``) in ``path``."""
    try:
        payload = json.loads((path / "results.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / 'results.json'}: unreadable ({err})") from None
    variant = json.loads((path / "variant.json").read_text()) if (path / "variant.json").is_file() else {}
    timing = json.loads((path / "timing.json").read_text()) if (path / "timing.json").is_file() else {}
    return Run(
        path=path,
        table=variant.get("table"),
        attrs=_attrs(variant),
        results=payload.get("results", {}),
        curves=payload.get("curves", {}),
        seconds_per_image=timing.get("seconds_per_image", {}),
        mtime=(path / "results.json").stat().st_mtime,
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
        table=experiment.get("table"),
        attrs=_attrs({"attrs": experiment.get("attrs"), "variant": cli.get("variant")}),
        results=results,
        seconds_per_image=timing,
        mtime=path.stat().st_mtime,
    )


def collect(paths: Sequence[str | Path]) -> list[Run]:
    """Every finished run under ``paths``: ``results.json`` dirs, and W&B offline runs of dirs without one."""
    runs: list[Run] = []
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such run directory")
        result_dirs = {p.parent for p in root.rglob("results.json")}
        runs += [read_results_dir(d) for d in sorted(result_dirs)]
        for wandb_dir in sorted(root.rglob("offline-run-*")):
            owner = wandb_dir.parent.parent if wandb_dir.parent.name == "wandb" else wandb_dir.parent
            if owner not in result_dirs and any(wandb_dir.glob("run-*.wandb")):
                runs.append(read_wandb_dir(wandb_dir))
    return runs


@dataclass
class Table:
    """A filled table: ``cells[(row, group, metric)] = ours`` (scaled) and the paper's numbers."""

    spec: TableSpec
    rows: list[tuple[str, ...]]
    groups: list[tuple[str, ...]]
    cells: dict[tuple[tuple[str, ...], tuple[str, ...], str], float]
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
            attrs = {**run.attrs, "method": label}
            if not all(k in attrs for k in spec.rows + spec.groups):
                continue
            row = tuple(attrs[k] for k in spec.rows)
            group = tuple(attrs[k] for k in spec.groups)
            cells[(row, group, metric)] = value * scale[metric]
            placed = True
        used += placed
    paper = PAPER.get(spec.key, {})
    rows = _ordered([k[0] for k in cells], [k[0] for k in paper])
    groups = _ordered([k[1] for k in cells], [k[1] for k in paper])
    return Table(spec, rows, groups, cells, paper, used)


def format_value(value: float | None) -> str:
    """Two decimals as in the paper (three below 1, where two hide the differences); empty for ``None``."""
    if value is None:
        return ""
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
                values += ["" if ours is None else repr(ours), "" if paper is None else f"{paper:.2f}"]
            writer.writerow([*row, *values])


def report(paths: Sequence[str | Path], out: str | Path, gallery_samples: int = 2) -> str:
    """Build every table with runs under ``paths``; write Markdown, CSVs and PNGs to ``out``; return the Markdown."""
    from dexar.report_plots import draw_curves, draw_gallery

    runs = collect(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for spec in TABLES.values():
        table = build_table(spec, runs)
        if not table.cells:
            continue
        write_csv(table, out / f"{spec.key}.csv")
        parts.append(to_markdown(table))
        mine = [r for r in runs if r.table == spec.key]
        figures = draw_curves(spec, mine, out) + draw_gallery(spec, mine, out, gallery_samples)
        if figures:
            parts.append(" ".join(f"![{p.stem}]({p.name})" for p in figures))
    skipped = [r for r in runs if r.table not in TABLES]
    if skipped:
        parts.append(f"{len(skipped)} run(s) without a paper table (no variant.json / experiment.table) were skipped.")
    text = "\n\n".join(parts) if parts else "no paper runs found"
    (out / "report.md").write_text(text + "\n")
    return text
