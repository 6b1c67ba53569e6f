"""``ResultsWriter``: ``results.json`` and ``results.csv`` in the run directory, the metrics to the logger."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from dexar.pipeline import jsonsafe


class ResultsWriter(Callback):
    """Rank 0 writes the module's ``summary`` (:attr:`ExplainerModule.summary`) when predict ends.

    The module computes the summary in ``on_predict_epoch_end`` (synced over processes, resumed shards
    included); Lightning calls every callback's ``on_predict_end`` after that, so the summary is complete
    here whatever this callback's place in the list. Nothing reads the file back during the run:
    ``HeatmapWriter`` builds the explorer index from the same summary. ``train_eval.py`` installs this
    callback first in every ``predict`` run (configs need not list it).

    ``results.json`` is strict JSON: a value with no valid sample (NaN) is ``null``, beside its ``count``,
    ``skipped`` and ``reason``; ``not_applicable`` lists the methods the model cannot run. ``results.csv``
    writes ``n/a`` for those and keeps the reason in ``note``. The logger gets ``<method>/<metric>`` and
    the sample counts; the table is printed.

    Args:
        output_dir: Where the files go; default: the trainer's ``default_root_dir``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        summary = getattr(pl_module, "summary", None)
        if summary is None or not trainer.is_global_zero:
            return
        run_dir = Path(self.output_dir or trainer.default_root_dir)
        rows = result_rows(summary)
        write_results(run_dir, summary, rows)
        numeric = [r for r in rows if isinstance(r["value"], float)]
        if trainer.logger is not None and rows:
            trainer.logger.log_metrics({f"{r['method']}/{r['metric']}": r["value"] for r in numeric})
            counts = ("failed_samples", "unreadable_samples", "evaluation_failed_samples")
            trainer.logger.log_metrics({k: float(summary[k]) for k in counts})
        print_results(run_dir, summary, rows)


def result_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method and metric: the lines of ``results.csv`` (``n/a`` for a method the model cannot run)."""
    return [
        {
            "dataset": summary["dataset"],
            "model": summary["model"],
            "method": label,
            "metric": name,
            "value": "n/a" if stats.get("n/a") else stats["value"],
            "count": stats["count"],
            "skipped": stats["skipped"],
            "note": stats.get("n/a") or stats.get("reason", ""),
        }
        for label, group in summary["results"].items()
        for name, stats in group.items()
    ]


def write_results(run_dir: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``results.json`` (atomically: a reader never sees half a file) and ``results.csv`` in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".results.json.{os.getpid()}.tmp"
    tmp.write_text(jsonsafe.dumps(summary, indent=2))
    os.replace(tmp, run_dir / "results.json")
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["dataset", "model", "method", "metric"])
        writer.writeheader()
        writer.writerows(rows)


def print_results(run_dir: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The results table, then where the files are and how many samples failed."""
    if rows:
        width = max(len(r["method"]) for r in rows) + 2
        print(f"{'method':<{width}}{'metric':<24}{'value':>10}{'count':>8}{'skipped':>9}")
        for r in rows:
            value = f"{r['value']:>10.4f}" if isinstance(r["value"], float) else f"{r['value']:>10}"
            print(f"{r['method']:<{width}}{r['metric']:<24}{value}{r['count']:>8}{r['skipped']:>9}")
    evaluation = ""
    if summary["evaluation_failed_samples"]:
        per_method = ", ".join(f"{label}: {n}" for label, n in summary["evaluation_failures"].items())
        evaluation = f", {summary['evaluation_failed_samples']} failed evaluation ({per_method})"
    print(
        f"results: {run_dir / 'results.json'}, {run_dir / 'results.csv'} "
        f"({summary['failed_samples']} samples failed, {summary['unreadable_samples']} unreadable{evaluation})"
    )
