"""Feed evaluation metrics from explanations and their samples (localization, filler, perturbation).

``dexar`` does not import ``metrics``: metric objects arrive from the caller and declare what they
consume with an ``input_kind`` class attribute:

* ``localization`` — ``update(maps, masks, ignore)`` with maps upsampled to the mask's size; the map is
  the sequence map against the union of the sample's masks (``target="sequence"``, the paper's
  PascalVOC protocol) or each content token's map against the mask of the object it names
  (``target="tokens"``);
* ``filler`` — ``update([token_weights], [content_mask])`` with per-token content labels;
* ``perturbation:<mode>`` (mode in :data:`dexar.perturbation.MODES`) — curves of the ground-truth
  answer's perplexity over the metric's ``levels``, all modes of one sample and method scored together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dexar.adapters.base import VLMAdapter
from dexar.explanation import Explanation
from dexar.labels import sample_token_labels
from dexar.perturbation import DEFAULT_BLUR_SIGMA, MODES, RANK_LEVELS, perturbation_curves
from dexar.schema import Sample

LOCALIZATION_TARGETS = ("sequence", "tokens")


def metric_kind(name: str, metric: Any) -> str:
    """The ``input_kind`` of a metric, with a clear error for metrics that declare none."""
    kind = getattr(metric, "input_kind", None)
    known = ("localization", "filler") + tuple(f"perturbation:{m}" for m in MODES)
    if kind not in known:
        raise ValueError(f"metric {name!r} ({type(metric).__name__}) has input_kind {kind!r}; expected one of {known}")
    return kind


@dataclass
class EvaluationSettings:
    """How metrics are fed.

    Attributes:
        localization_target: ``sequence`` or ``tokens`` (see module docstring).
        max_batch: Perturbed images per forward.
        replacement: Replacement value of perturbed pixels in ``pixel_values`` space (0 = dataset mean
            after mean/std normalization).
        blur_sigma: σ in pixels of the insertion blur.
        rank_levels: Quantization levels of a map before its pixels are ranked
            (:func:`dexar.perturbation.rank_pixels`; ``None``: unquantized).
    """

    localization_target: str = "sequence"
    max_batch: int = 16
    replacement: float = 0.0
    blur_sigma: float = DEFAULT_BLUR_SIGMA
    rank_levels: int | None = RANK_LEVELS

    def __post_init__(self) -> None:
        if self.localization_target not in LOCALIZATION_TARGETS:
            raise ValueError(
                f"localization_target must be one of {LOCALIZATION_TARGETS}, got {self.localization_target!r}"
            )


@dataclass
class Evaluator:
    """Updates each method's metrics from its explanations.

    Attributes:
        adapter: Adapter of the explained model (perturbation forwards, tokenization).
        metrics: Method label → metric name → metric object.
        settings: :class:`EvaluationSettings`.
        rows: Method label → metric name → ids of the rows each metric received, in update order
            (one per sample, or one per content token with ``target="tokens"``), to align per-sample
            values with samples.
    """

    adapter: VLMAdapter
    metrics: Mapping[str, Mapping[str, Any]]
    settings: EvaluationSettings = field(default_factory=EvaluationSettings)
    rows: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kinds = {
            label: {name: metric_kind(name, m) for name, m in group.items()} for label, group in self.metrics.items()
        }
        self.rows = {label: {name: [] for name in group} for label, group in self.metrics.items()}
        if any(k.startswith("perturbation:") for kinds in self.kinds.values() for k in kinds.values()):
            self.adapter.check_pixel_perturbation()  # fail at setup, not mid-run
        self.curves: dict[str, dict[str, dict[str, list[float]]]] = {}

    def update(self, samples: list[Sample], explanations: Mapping[str, list[Explanation]]) -> None:
        """Update every metric of every method with a batch's explanations."""
        by_id = {s.id: s for s in samples}
        for label, exps in explanations.items():
            if label not in self.metrics:
                continue
            for exp in exps:
                self._update_one(label, by_id[exp.sample_id], exp)

    def _update_one(self, label: str, sample: Sample, exp: Explanation) -> None:
        kinds = self.kinds[label]
        group = self.metrics[label]
        loc = [n for n, k in kinds.items() if k == "localization"]
        if loc and sample.masks is not None:
            maps, masks, ignore, ids = self._localization_inputs(sample, exp)
            if maps is not None:
                for name in loc:
                    group[name].update(maps, masks, ignore)
                    self.rows[label][name] += ids
        fill = [n for n, k in kinds.items() if k == "filler"]
        if fill and sample.word_is_content is not None and sample.answer is not None:
            labels = sample_token_labels(
                sample, self.adapter.tokenizer, context=self.adapter.format_prompt(sample.prompt)
            )
            if labels.ids == exp.token_ids:  # filler labels exist for the ground-truth answer only
                content = torch.tensor(labels.is_content)
                for name in fill:
                    group[name].update([exp.token_weights.double()], [content])
                    self.rows[label][name].append(sample.id)
        pert = {n: k.split(":", 1)[1] for n, k in kinds.items() if k.startswith("perturbation:")}
        if pert and sample.answer is not None:
            self._perturbation(label, sample, exp, pert)

    def _localization_inputs(self, sample: Sample, exp: Explanation):
        size = tuple(sample.masks.shape[-2:])
        ignore = torch.from_numpy(sample.ignore_mask) if sample.ignore_mask is not None else None
        if self.settings.localization_target == "sequence":
            up = F.interpolate(exp.sequence_map[None, None].double(), size=size, mode="bilinear", align_corners=False)
            mask = torch.from_numpy(sample.union_mask)[None]
            return up[0].clamp(min=0), mask, (ignore[None] if ignore is not None else None), [sample.id]
        if sample.word_mask_index is None:
            return None, None, None, []
        labels = sample_token_labels(sample, self.adapter.tokenizer, context=self.adapter.format_prompt(sample.prompt))
        if labels.ids != exp.token_ids:
            return None, None, None, []
        picks = [t for t, k in enumerate(labels.mask_index) if k >= 0]
        if not picks:
            return None, None, None, []
        maps = exp.token_maps[picks][:, None].double()
        up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0].clamp(min=0)
        masks = torch.from_numpy(sample.masks[[labels.mask_index[t] for t in picks]])
        ig = ignore[None].expand(len(picks), -1, -1) if ignore is not None else None
        return up, masks, ig, [f"{sample.id}#{t}" for t in picks]

    def _perturbation(self, label: str, sample: Sample, exp: Explanation, modes: dict[str, str]) -> None:
        group = self.metrics[label]
        answer_ids = self.adapter.tokenize_answer(sample.answer)
        prompt_ids = self.adapter.explained_prompt_ids(exp.inputs, exp.answer_positions)
        levels = {mode: [float(x) for x in group[name].levels] for name, mode in modes.items()}
        device = next(self.adapter.model.parameters()).device
        curves = perturbation_curves(
            self.adapter,
            exp.inputs["pixel_values"].to(device),
            prompt_ids,
            answer_ids,
            exp.sequence_map,
            modes=tuple(levels),
            levels=levels,
            max_batch=self.settings.max_batch,
            replacement=self.settings.replacement,
            blur_sigma=self.settings.blur_sigma,
            rank_levels=self.settings.rank_levels,
        )
        for name, mode in modes.items():
            curve = curves[mode]
            metric = group[name]
            if mode in ("positive", "negative"):
                metric.update(curve.nppl[None])
            elif mode == "pic":
                metric.update(curve.ppl[None], curve.webp_sizes[None])
            else:  # deletion, insertion: both end images are on the curve
                metric.update(curve.ppl[None])
            self.rows[label][name].append(sample.id)
