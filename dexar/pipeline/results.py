"""``results.json`` / ``results.csv``: a finished run's metric values, counts and curves, written by a callback.

:class:`ResultsWriter` is attached by :meth:`dexar.pipeline.module.ExplainerModule.configure_callbacks`, so a
run writes its results whether it comes from the CLI or a bare ``Trainer``. It runs at ``on_predict_end``
(after every callback's ``on_predict_epoch_end`` and the module's, which computes the synced results), on
rank 0, before the module fails a run that evaluated nothing.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning as L

from dexar.pipeline import jsonsafe
from dexar.pipeline.coverage import zero_count_lines


class ResultsWriter(L.Callback):
    """Rank 0, at the end of predict: :func:`report_results` of the module's results, then why counts are 0."""

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = getattr(pl_module, "results", None)
        if not trainer.is_global_zero or results is None:
            return
        report_results(
            trainer,
            pl_module,
            results,
            pl_module.num_failed,
            pl_module.num_unreadable,
            pl_module.curves,
            pl_module.not_applicable,
            pl_module.num_evaluation_failed,
            pl_module.evaluation_failures,
        )
        for line in zero_count_lines(getattr(pl_module, "zero_count_reasons", {})):
            print(line)


def report_results(
    trainer: L.Trainer,
    module: L.LightningModule,
    results: dict,
    num_failed: int,
    num_unreadable: int = 0,
    curves: dict | None = None,
    not_applicable: dict[str, str] | None = None,
    num_evaluation_failed: int = 0,
    evaluation_failures: dict[str, int] | None = None,
) -> None:
    """Rank 0: log metrics through the logger, write ``results.json`` / ``results.csv``, print a table.

    ``failed_samples`` counts samples whose explanation raised; ``unreadable_samples`` those whose
    files could not be decoded (dropped by the datamodule's collate); ``evaluation_failed_samples``
    those whose evaluation raised for some method (``evaluation_failures``: per method), all summed
    over ranks.
    ``results.json`` is strict JSON: a value with no valid sample (NaN) is ``null``, beside its
    ``count``, ``skipped`` and ``reason``; ``not_applicable`` lists the methods the model cannot run.
    ``results.csv`` writes ``n/a`` for those and keeps the reason in ``note``.
    """
    run_dir = Path(trainer.default_root_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    datamodule = getattr(trainer, "datamodule", None)
    dataset = type(datamodule).__name__ if datamodule is not None else "dataloader"
    model = str(module.hparams.model)
    rows = [
        {
            "dataset": dataset,
            "model": model,
            "method": label,
            "metric": name,
            "value": "n/a" if stats.get("n/a") else stats["value"],
            "count": stats["count"],
            "skipped": stats["skipped"],
            "note": stats.get("n/a") or stats.get("reason", ""),
        }
        for label, group in results.items()
        for name, stats in group.items()
    ]
    payload = {
        "dataset": dataset,
        "model": model,
        "failed_samples": num_failed,
        "unreadable_samples": num_unreadable,
        "evaluation_failed_samples": num_evaluation_failed,
        "evaluation_failures": evaluation_failures or {},
        "not_applicable": not_applicable or {},
        "results": results,
        "curves": curves or {},
    }
    tmp = run_dir / f".results.json.{os.getpid()}.tmp"  # atomic: a reader never sees half a file
    tmp.write_text(jsonsafe.dumps(payload, indent=2))
    os.replace(tmp, run_dir / "results.json")
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["dataset", "model", "method", "metric"])
        writer.writeheader()
        writer.writerows(rows)
    numeric = [r for r in rows if isinstance(r["value"], float)]
    if trainer.logger is not None and rows:
        trainer.logger.log_metrics({f"{r['method']}/{r['metric']}": r["value"] for r in numeric})
        counts = {"failed_samples": num_failed, "unreadable_samples": num_unreadable}
        counts["evaluation_failed_samples"] = num_evaluation_failed
        trainer.logger.log_metrics({k: float(v) for k, v in counts.items()})
    if rows:
        width = max(len(r["method"]) for r in rows) + 2
        print(f"{'method':<{width}}{'metric':<24}{'value':>10}{'count':>8}{'skipped':>9}")
        for r in rows:
            value = f"{r['value']:>10.4f}" if isinstance(r["value"], float) else f"{r['value']:>10}"
            print(f"{r['method']:<{width}}{r['metric']:<24}{value}{r['count']:>8}{r['skipped']:>9}")
    evaluation = ""
    if num_evaluation_failed:
        per_method = ", ".join(f"{label}: {n}" for label, n in (evaluation_failures or {}).items())
        evaluation = f", {num_evaluation_failed} failed evaluation ({per_method})"
    print(
        f"results: {run_dir / 'results.json'}, {run_dir / 'results.csv'} "
        f"({num_failed} samples failed, {num_unreadable} unreadable{evaluation})"
    )
