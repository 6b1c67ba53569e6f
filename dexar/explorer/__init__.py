"""Self-contained HTML explorers: one page per explained image, one index per run, W&B HTML media.

* :func:`write_explanation_html` — ``explanation.html`` from an :class:`ExplanationPayload`;
* :func:`write_run_explorer` — ``<run dir>/explorer/index.html`` + one page per sample
  (:func:`run_payload_from_results` and :func:`metric_specs` read ``results.json`` and the metrics);
* :func:`write_sample_page`, :func:`write_predict_index` — the same explorer written by predict as it runs
  (a page per overlay sample at its batch, the index at the end; DDP and resume, see :mod:`dexar.explorer.predict`);
* :func:`wandb_html` — the per-sample page as a ``wandb.Html``;
* :func:`payload_from_explanations` — a payload from ``Explanation`` objects, maps placed by their geometry.

Pages need no network at view time: CSS, JS, the image and the maps are inlined (data URIs).
"""

from dexar.explorer.adapter import group_pieces, payload_from_explanations
from dexar.explorer.page import render_explanation_html, write_explanation_html
from dexar.explorer.payload import ExplanationPayload, MethodView, PieceView, WordView
from dexar.explorer.predict import write_predict_index, write_sample_page
from dexar.explorer.run import (
    MetricSpec,
    RunPayload,
    RunSample,
    metric_specs,
    run_payload_from_results,
    write_run_explorer,
)
from dexar.explorer.wandb_html import wandb_html

__all__ = [
    "ExplanationPayload",
    "MethodView",
    "MetricSpec",
    "PieceView",
    "RunPayload",
    "RunSample",
    "WordView",
    "group_pieces",
    "metric_specs",
    "payload_from_explanations",
    "render_explanation_html",
    "run_payload_from_results",
    "wandb_html",
    "write_explanation_html",
    "write_predict_index",
    "write_run_explorer",
    "write_sample_page",
]
