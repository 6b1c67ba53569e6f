"""An explanation page as W&B media (``wandb.Html``), e.g. a cell of the per-sample table."""

from __future__ import annotations

from typing import Any

from dexar.explorer.page import render_explanation_html
from dexar.explorer.payload import ExplanationPayload


def wandb_html(payload: ExplanationPayload, side_by_side: bool = True, **sizes: int) -> Any:
    """The self-contained page of ``payload`` as a ``wandb.Html`` object.

    W&B's own stylesheet is not injected (``inject=False``: it would be the page's only network
    request). With ``side_by_side`` (and several methods) the page opens with the methods side by
    side, so two runs' tables can be compared word by word.
    """
    import wandb

    page = render_explanation_html(payload, side_by_side=side_by_side, **sizes)
    return wandb.Html(page, inject=False, data_is_not_path=True)
