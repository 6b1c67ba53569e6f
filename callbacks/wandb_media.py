"""``WandbMedia``: perturbation curves, heatmap overlays and a per-sample table for Weights & Biases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from PIL import Image


class WandbMedia(Callback):
    """Logs what scalars cannot show, at the end of predict (after the module computed its metrics).

    * one ``wandb.Table`` and line plot per method and curve metric (mean curve over valid samples);
    * the overlays ``HeatmapWriter`` wrote for the first samples, captioned with the answer: sequence maps
      under ``overlays/<method>/sequence``, per-word strips under ``overlays/<method>/words``, per-token
      (piece) strips under ``overlays/<method>/tokens`` (each list padded to one size) and a ``words`` table
      (one row per word: its pieces and weight) — read from disk, so every rank's samples are included;
    * a per-sample table: sample id (or ``id#word``), method, and each metric's value; for the samples
      ``HeatmapWriter`` wrote an explorer page for (the overlay samples), the page as ``wandb.Html`` in
      column ``explanation`` of the sample's first row (every method side by side: hover the same words
      in two runs' tables to compare them).

    Metric accessors are collective under DDP, so every rank runs them; only rank 0 logs. Without a
    ``WandbLogger`` the callback does nothing.

    Args:
        max_overlays: Overlays logged per method.
    """

    def __init__(self, max_overlays: int = 16) -> None:
        self.max_overlays = max_overlays

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = trainer.logger if isinstance(trainer.logger, WandbLogger) else None
        groups = getattr(pl_module, "metric_sets", {})
        curves = _curves(groups)
        rows = _per_sample_rows(pl_module, groups, trainer.world_size)
        if logger is None or not trainer.is_global_zero:
            return
        import wandb

        payload: dict[str, Any] = {}
        for (label, name), (columns, data) in curves.items():
            table = wandb.Table(columns=columns, data=data)
            payload[f"curves/{label}/{name}"] = wandb.plot.line(table, columns[0], columns[-1], title=f"{label} {name}")
            payload[f"curve_tables/{label}/{name}"] = table
        pages = _explorer_pages(Path(trainer.default_root_dir))
        if rows or pages:
            metric_names = sorted({k for r in rows for k in r if k not in ("sample", "method")})
            data = [[r["sample"], r["method"], *[r.get(m) for m in metric_names]] for r in rows]
            columns = ["sample", "method", *metric_names]
            if pages:
                data = _with_pages(data, pages, wandb)
                columns.append("explanation")
            payload["per_sample"] = wandb.Table(columns=columns, data=data)
        payload.update(self._overlays(Path(trainer.default_root_dir), wandb))
        if payload:
            logger.experiment.log(payload)
        run = logger.experiment
        if getattr(run.settings, "mode", "") == "offline" or getattr(run.settings, "_offline", False):
            print(f"W&B run saved offline in {Path(run.dir).parent}; upload it with: wandb sync {Path(run.dir).parent}")

    def _overlays(self, run_dir: Path, wandb: Any) -> dict[str, Any]:
        """``overlays/<method>/{sequence,words,tokens}`` (one image size per list, W&B needs it) and ``words``.

        ``words`` is a table with one row per explained word (sample, method, word, its pieces, word
        weight = max λ of its pieces; :class:`dexar.Explanation`'s word view), from each overlay's JSON.
        """
        out: dict[str, Any] = {}
        word_rows: list[list[Any]] = []
        for method_dir in sorted((run_dir / "overlays").glob("*")):
            found: dict[str, list[tuple[Image.Image, str]]] = {"sequence": [], "words": [], "tokens": []}
            for sample_dir in sorted(method_dir.iterdir())[: self.max_overlays]:
                meta = json.loads((sample_dir / "explanation.json").read_text())
                caption = f"{meta['sample_id']}: {meta['answer']}"
                word_rows += _word_rows(meta, method_dir.name)
                for kind, images in found.items():
                    if (sample_dir / f"{kind}.png").is_file():
                        images.append((Image.open(sample_dir / f"{kind}.png").convert("RGB"), caption))
            for kind, images in found.items():
                if images:
                    padded = same_size([image for image, _ in images])
                    logged = [wandb.Image(image, caption=c) for image, (_, c) in zip(padded, images, strict=True)]
                    out[f"overlays/{method_dir.name}/{kind}"] = logged
        if word_rows:
            out["words"] = wandb.Table(columns=["sample", "method", "word", "pieces", "weight"], data=word_rows)
        return out


def _word_rows(meta: dict[str, Any], method: str) -> list[list[Any]]:
    """One table row per word of an overlay's ``explanation.json`` (none when it predates the word view)."""
    words, weights, tokens = meta.get("words") or [], meta.get("word_weights") or [], meta.get("tokens") or []
    return [
        [meta.get("sample_id"), method, w["text"], " ".join(tokens[w["start"] : w["end"]]), float(weight)]
        for w, weight in zip(words, weights, strict=True)
    ]


def _explorer_pages(run_dir: Path) -> dict[str, str]:
    """Sample id → text of its explorer page (``explorer/samples``, see :mod:`dexar.explorer.predict`)."""
    from dexar.explorer.predict import read_sample_rows

    explorer = run_dir / "explorer"
    return {r["id"]: (explorer / r["href"]).read_text(encoding="utf-8") for r in read_sample_rows(explorer)}


def _with_pages(data: list[list[Any]], pages: dict[str, str], wandb: Any) -> list[list[Any]]:
    """Rows + an ``explanation`` cell: the sample's page as ``wandb.Html`` in its first row, else None.

    A page whose sample has no row (no per-sample metric) gets a row of its own.
    """
    left = dict(pages)
    out = []
    for row in data:
        key = _page_of(row[0], left)
        out.append([*row, wandb.Html(left.pop(key), inject=False, data_is_not_path=True) if key else None])
    width = len(data[0]) if data else 2
    for sample_id, text in left.items():
        out.append([sample_id, *[None] * (width - 1), wandb.Html(text, inject=False, data_is_not_path=True)])
    return out


def _page_of(row_id: str, pages: dict[str, str]) -> str | None:
    """The page key of a table row id (``id`` or ``id#token``) if that sample still needs its page."""
    if row_id in pages:
        return row_id
    head, sep, tail = row_id.rpartition("#")
    return head if sep and tail.isdigit() and head in pages else None


def same_size(images: list[Image.Image]) -> list[Image.Image]:
    """Pad every image (top-left, white) to the largest width and height among them; pixels are not rescaled."""
    width, height = max(i.width for i in images), max(i.height for i in images)
    out = []
    for image in images:
        canvas = Image.new("RGB", (width, height), "white")
        canvas.paste(image, (0, 0))
        out.append(canvas)
    return out


def _curves(groups: Any) -> dict[tuple[str, str], tuple[list[str], list[list[float]]]]:
    """Mean curves of every curve metric (collective: call on every rank)."""
    out = {}
    for label, group in groups.items():
        for name, metric in group.items():
            if not hasattr(metric, "mean_curve"):
                continue
            curve = metric.mean_curve()
            if len(curve) == 3:  # PIC: levels, x, y
                levels, x, y = curve
                out[(label, name)] = (["level", "normalized_size", "normalized_ppl_gain"], _rows(levels, x, y))
            else:
                levels, y = curve
                out[(label, name)] = (["level", "normalized_ppl"], _rows(levels, y))
    return out


def _rows(*columns: torch.Tensor) -> list[list[float]]:
    return [[float(c[i]) for c in columns] for i in range(len(columns[0]))]


def _per_sample_rows(pl_module: Any, groups: Any, world_size: int) -> list[dict[str, Any]]:
    """Per-sample metric values with their row ids (collective: call on every rank)."""
    evaluator = getattr(pl_module, "evaluator", None)
    if evaluator is None:
        return []
    ids = evaluator.rows
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, ids)
        ids = {
            label: {name: [i for part in gathered for i in part[label][name]] for name in group}
            for label, group in ids.items()
        }
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for label, group in groups.items():
        for name, metric in group.items():
            if not hasattr(metric, "per_sample"):
                continue
            values = metric.per_sample().tolist()
            for row_id, value in zip(ids.get(label, {}).get(name, []), values, strict=False):
                rows.setdefault((row_id, label), {"sample": row_id, "method": label})[name] = value
    return list(rows.values())
