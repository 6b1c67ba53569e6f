"""``ExplainerModule``: a LightningModule whose ``predict_step`` explains a batch of samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from dexar.explain import ANSWER_SOURCES, Explainer
from dexar.explanation import Explanation
from dexar.loading import load_model
from dexar.methods import build_method
from dexar.schema import Sample
from dexar.shapes_model import SHAPES_CHECKPOINT

log = logging.getLogger(__name__)


@dataclass
class PredictOutput:
    """What ``predict_step`` returns for one batch.

    Attributes:
        explanations: Per method label, one :class:`Explanation` per explained sample (no images).
        sample_ids: Ids of the explained samples, in order.
        failures: ``(sample_id, error message)`` of samples that could not be explained.

    """

    explanations: dict[str, list[Explanation]]
    sample_ids: list[str]
    failures: list[tuple[str, str]] = field(default_factory=list)


class ExplainerModule(L.LightningModule):
    """Explains every predict batch with one or more methods (one shared trace per batch).

    Run it with ``Trainer(inference_mode=False)``: the explanation needs gradients.

    Args:
        model: Checkpoint directory or cached hub id (default: the bundled Shapes model).
        methods: Method label → options. The label is the registry name unless the options hold
            ``method: NAME`` (so several variants of one method can run side by side).
        dtype: Model dtype (``float32``, ``bfloat16``, ``float16``, ``float64``).
        answer_source: ``generate`` explains the model's greedy answer; ``ground_truth``
            teacher-forces the dataset's answer.
        max_new_tokens: Generation budget.
        keep_eos: Explain the end-of-sequence token too.

    """

    def __init__(
        self,
        model: str = SHAPES_CHECKPOINT,
        methods: dict[str, dict[str, Any]] | None = None,
        dtype: str = "float32",
        answer_source: str = "generate",
        max_new_tokens: int = 32,
        keep_eos: bool = False,
    ) -> None:
        super().__init__()
        if answer_source not in ANSWER_SOURCES:
            raise ValueError(f"model.answer_source must be one of {ANSWER_SOURCES}, got {answer_source!r}")
        self.save_hyperparameters()
        self.method_specs = {label: dict(opts or {}) for label, opts in (methods or {"dexar": {}}).items()}
        self.methods = {
            label: build_method(opts.pop("method", label), **opts)
            for label, opts in ((k, dict(v)) for k, v in self.method_specs.items())
        }
        self.vlm: torch.nn.Module | None = None
        self.explainer: Explainer | None = None
        self.failed: list[tuple[str, str]] = []

    def configure_model(self) -> None:
        """Load the VLM once per process, on this process's device."""
        if self.vlm is not None:
            return
        vlm, processor = load_model(self.hparams.model, dtype=self.hparams.dtype, device=self.device)
        for p in vlm.parameters():
            p.requires_grad_(False)
        self.vlm = vlm
        self.explainer = Explainer(vlm, processor, self.methods)

    def _explain(self, samples: list[Sample]) -> dict[str, list[Explanation]]:
        assert self.explainer is not None
        hp = self.hparams
        with torch.enable_grad():
            return self.explainer.explain_samples(
                samples, hp.answer_source, hp.max_new_tokens, hp.keep_eos, keep_images=False
            )

    def predict_step(self, batch: list[Sample], batch_idx: int, dataloader_idx: int = 0) -> PredictOutput:
        self.configure_model()
        try:
            return PredictOutput(self._explain(batch), [s.id for s in batch])
        except Exception as err:  # one bad sample must not kill the run: retry one by one
            log.warning("batch %d failed (%s); explaining its samples one by one", batch_idx, err)
        merged: dict[str, list[Explanation]] = {label: [] for label in self.methods}
        ids, failures = [], []
        for sample in batch:
            try:
                single = self._explain([sample])
            except Exception as err:
                failures.append((sample.id, f"{type(err).__name__}: {err}"))
                log.warning("sample %s skipped: %s", sample.id, err)
                continue
            ids.append(sample.id)
            for label, exps in single.items():
                merged[label] += exps
        self.failed += failures
        return PredictOutput(merged, ids, failures)
