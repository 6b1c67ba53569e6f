"""Feed evaluation metrics from explanations and their samples (localization, filler, perturbation).

``dexar`` does not import ``metrics``: metric objects arrive from the caller and declare what they
consume with an ``input_kind`` class attribute; :data:`FEEDERS` maps each kind (the part before ``:``)
to the function that feeds its metrics:

* ``localization`` — ``update(maps, masks, ignore, seen=seen)`` with maps placed on the mask's pixels
  through the model's view (:meth:`dexar.Explanation.upsample`: zero where the model saw nothing) and
  ``seen`` the pixels it saw (metrics score those only); the map is the sequence map against the union
  of the sample's masks (``target="sequence"``, the paper's PascalVOC protocol) or each content word's
  map against the mask of the object it names (``target="tokens"``: scored on the explanation's words,
  :attr:`dexar.Explanation.word_maps`, since datasets label words; a one-piece word is its token). How
  much of a mask lies outside the view is a metric of its own (``metrics.UnseenMaskFraction``); without
  it the evaluator warns once per method when a mask reaches outside the view;
* ``filler`` — ``update([word_weights], [content_mask], [map_mass])`` on the explanation's words
  (PascalVOC-QA labels words: content/filler per word, word weight = max λ of its pieces, the mass of
  each word's min-max map; an explained end-of-sequence token is a filler word);
* ``perturbation:<mode>`` (mode in :data:`dexar.perturbation.MODES`) — curves of the ground-truth
  answer's perplexity over the metric's ``levels``, all modes of one sample and method scored together;
  each metric maps its mode's :class:`~dexar.perturbation.PerturbationCurve` to its own ``update``
  (``update_curve(curve)``), so a new mode needs no change here.
  Perturbation ranks and edits ``pixel_values``, the model's own view (e.g. LLaVA-1.5's center crop),
  on which the grid lies exactly for every family that supports it (LLaVA, PaliGemma, Florence-2: the
  grid spans the whole view), so the map is stretched over that view, never over the original image.

Perturbation is the cost of evaluation. :meth:`Evaluator.score` scores every method's and every
sample's perturbed images of a batch together (:func:`dexar.pipeline.pooled_perturbation.pooled_curves`: full
forwards, shared end images once per sample, WebP encodes overlapping the forwards);
``EvaluationSettings(pooled=False)`` keeps the slow reference, one
:func:`~dexar.perturbation.perturbation_curves` call per sample and method (the same values, tested
to 1e-6). A (sample, method) that cannot be scored (a NaN map, an empty answer) raises from
:meth:`Evaluator.update_one`, so the caller can count it and go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from dexar.adapters.base import VLMAdapter
from dexar.explanation import Explanation
from dexar.labels import sample_token_labels
from dexar.perturbation import DEFAULT_BLUR_SIGMA, MODES, RANK_LEVELS, PerturbationCurve
from dexar.pipeline.pooled_perturbation import CurveRequest, pooled_curves, reference_curves
from dexar.schema import Sample

LOCALIZATION_TARGETS = ("sequence", "tokens")

log = logging.getLogger(__name__)


Feed = Callable[["Evaluator", str, list[str], Sample, Explanation, "dict[str, PerturbationCurve] | None"], None]
"""``feed(evaluator, label, metric_names, sample, explanation, curves)``: update those metrics with one sample."""

FEEDERS: dict[str, Feed] = {}
"""Input kind (before ``:``) → its feeder, in the order a sample's metrics are updated."""

KIND_MODES: dict[str, tuple[str, ...]] = {"perturbation": MODES}
"""Kinds written ``<kind>:<mode>`` and their modes."""


def feeder(kind: str) -> Callable[[Feed], Feed]:
    """Register the function that feeds the metrics of input kind ``kind``."""

    def register(feed: Feed) -> Feed:
        FEEDERS[kind] = feed
        return feed

    return register


def known_kinds() -> tuple[str, ...]:
    """Every valid ``input_kind``: plain kinds and ``<kind>:<mode>`` ones."""
    return tuple(k2 for k in FEEDERS for k2 in ([f"{k}:{m}" for m in KIND_MODES[k]] if k in KIND_MODES else [k]))


def metric_kind(name: str, metric: Any) -> str:
    """The ``input_kind`` of a metric, with a clear error for metrics that declare none."""
    kind = getattr(metric, "input_kind", None)
    known = known_kinds()
    if kind not in known:
        raise ValueError(f"metric {name!r} ({type(metric).__name__}) has input_kind {kind!r}; expected one of {known}")
    return kind


def _family(kind: str) -> str:
    return kind.split(":", 1)[0]


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
        pooled: Score a batch's perturbed images together (:meth:`Evaluator.score`); ``False``: the
            reference path, one sample and method at a time.
    """

    localization_target: str = "sequence"
    max_batch: int = 16
    replacement: float = 0.0
    blur_sigma: float = DEFAULT_BLUR_SIGMA
    rank_levels: int | None = RANK_LEVELS
    pooled: bool = True

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
            (one per sample, or ``<id>#<word index>`` per content word with ``target="tokens"``), to align
            per-sample values with samples.
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
        self._warned_unseen: set[str] = set()

    def update(self, samples: list[Sample], explanations: Mapping[str, list[Explanation]]) -> None:
        """Update every metric of every method with a batch's explanations (raises on the first failure)."""
        by_id = {s.id: s for s in samples}
        scored = self.score(samples, explanations)
        for label, exps in explanations.items():
            if label not in self.metrics:
                continue
            for exp in exps:
                self.update_one(label, by_id[exp.sample_id], exp, scored.get((label, exp.sample_id)))

    def score(
        self, samples: list[Sample], explanations: Mapping[str, list[Explanation]]
    ) -> dict[tuple[str, str], dict[str, PerturbationCurve] | Exception]:
        """Perturbation curves of every (method, sample) of a batch that needs them, pooled.

        Returns:
            ``(label, sample_id)`` → mode → curve, or the exception that stopped that pair; empty with
            ``pooled=False`` (:meth:`update_one` then scores each pair on its own).
        """
        if not self.settings.pooled:
            return {}
        by_id = {s.id: s for s in samples}
        requests: dict[tuple[str, str], CurveRequest] = {}
        out: dict[tuple[str, str], dict[str, PerturbationCurve] | Exception] = {}
        for label, exps in explanations.items():
            modes = self._perturbation_modes(label)
            for exp in exps:
                sample = by_id[exp.sample_id]
                if not modes or sample.answer is None:
                    continue
                try:
                    requests[(label, sample.id)] = self._request(label, sample, exp, modes)
                except Exception as err:  # noqa: BLE001 - counted per sample by the caller
                    out[(label, sample.id)] = err
        out.update(
            pooled_curves(
                self.adapter,
                requests,
                max_batch=self.settings.max_batch,
                replacement=self.settings.replacement,
                blur_sigma=self.settings.blur_sigma,
                rank_levels=self.settings.rank_levels,
            )
        )
        return out

    def _perturbation_modes(self, label: str) -> dict[str, str]:
        """Metric name → perturbation mode of a method's perturbation metrics."""
        kinds = self.kinds.get(label, {})
        return {n: k.split(":", 1)[1] for n, k in kinds.items() if k.startswith("perturbation:")}

    def _request(self, label: str, sample: Sample, exp: Explanation, modes: dict[str, str]) -> CurveRequest:
        group = self.metrics[label]
        device = next(self.adapter.model.parameters()).device
        return CurveRequest(
            group=sample.id,
            pixel_values=exp.inputs["pixel_values"].to(device),
            prompt_ids=self.adapter.explained_prompt_ids(exp.inputs, exp.answer_positions),
            answer_ids=self.adapter.tokenize_answer(sample.answer),
            heatmap=exp.sequence_map,
            levels={mode: [float(x) for x in group[name].levels] for name, mode in modes.items()},
        )

    def update_one(
        self,
        label: str,
        sample: Sample,
        exp: Explanation,
        curves: dict[str, PerturbationCurve] | Exception | None = None,
    ) -> None:
        """Update one method's metrics with one sample's explanation.

        Args:
            label: Method label.
            sample: The explained sample.
            exp: Its explanation by the method.
            curves: Its perturbation curves from :meth:`score` (an exception there is raised here);
                ``None``: computed here, on their own (the reference path).
        """
        if isinstance(curves, Exception):
            raise curves
        kinds = self.kinds[label]
        for kind, feed in FEEDERS.items():
            names = [n for n, k in kinds.items() if _family(k) == kind]
            if names:
                feed(self, label, names, sample, exp, curves)

    def word_labels(self, sample: Sample, exp: Explanation) -> list[int | None] | None:
        """Per explained word: ``None`` for a filler word, else the mask index of the content word (-1: none).

        ``None`` overall when the explained tokens are not the ground truth's: labels exist for the
        ground-truth answer only. Datasets label words (``Sample.word_is_content``, PascalVOC-QA's
        per-word mask), so metrics score the explanation's words (:attr:`Explanation.words`): a word is
        content when its pieces are (``p`` + ``otted`` + ``plant``: one content word ``potted``, one
        ``plant``). An end-of-sequence token explained after the answer (``keep_eos``; PascalVOC-QA's
        appendix answer ends in ``[EOS]``) is a filler word.
        """
        if sample.word_is_content is None or sample.answer is None:
            return None
        labels = sample_token_labels(sample, self.adapter.tokenizer, context=self.adapter.format_prompt(sample.prompt))
        content, mask_index = list(labels.is_content), list(labels.mask_index)
        if exp.token_ids == [*labels.ids, self.adapter.tokenizer.eos_token_id]:
            content, mask_index = [*content, False], [*mask_index, -1]
        elif exp.token_ids != labels.ids:
            return None
        out: list[int | None] = []
        for word in exp.word_list:
            picks = [t for t in word.pieces if content[t]]
            out.append(next((mask_index[t] for t in picks if mask_index[t] >= 0), -1) if picks else None)
        return out

    def _localization_inputs(self, sample: Sample, exp: Explanation):
        """Placed maps, masks, ignore and seen masks ``(N, H, W)`` and row ids (``None`` maps: nothing to score)."""
        size = tuple(sample.masks.shape[-2:])
        geometry = exp.placement(size)
        seen = geometry.seen(size)
        ignore = torch.from_numpy(sample.ignore_mask) if sample.ignore_mask is not None else None
        if self.settings.localization_target == "sequence":
            up = geometry.place(exp.sequence_map[None].double(), size).clamp(min=0)
            mask = torch.from_numpy(sample.union_mask)[None]
            return up, mask, (ignore[None] if ignore is not None else None), seen[None], [sample.id]
        if sample.word_mask_index is None:
            return None, None, None, None, []
        labels = self.word_labels(sample, exp)
        picks = [w for w, k in enumerate(labels or []) if k is not None and k >= 0]
        if not picks:
            return None, None, None, None, []
        up = geometry.place(exp.word_maps[picks].double(), size).clamp(min=0)
        masks = torch.from_numpy(sample.masks[[labels[w] for w in picks]])
        ig = ignore[None].expand(len(picks), -1, -1) if ignore is not None else None
        return up, masks, ig, seen[None].expand(len(picks), -1, -1), [f"{sample.id}#{w}" for w in picks]

    def _warn_unseen(
        self,
        label: str,
        metrics: list[Any],
        sample_id: str,
        masks: torch.Tensor,
        ignore: torch.Tensor | None,
        seen: torch.Tensor,
    ) -> None:
        """Warn once per method when a mask reaches outside the view and no metric reports it."""
        if label in self._warned_unseen or any(getattr(m, "reports_unseen_mask", False) for m in metrics):
            return
        inside = masks.bool() if ignore is None else masks.bool() & ~ignore.bool()
        total = int(inside.sum())
        unseen = int((inside & ~seen).sum())
        if unseen:
            self._warned_unseen.add(label)
            log.warning(
                "%s: %.1f%% of sample %s's mask pixels lie outside the model's view and are not scored; "
                "add metrics.UnseenMaskFraction to report this per sample",
                label,
                100.0 * unseen / total,
                sample_id,
            )


@feeder("localization")
def _feed_localization(ev: Evaluator, label: str, names: list[str], sample: Sample, exp: Explanation, _curves) -> None:
    """Placed maps against the sample's masks (sequence or per-token target), seen pixels only."""
    if sample.masks is None:
        return
    group = ev.metrics[label]
    maps, masks, ignore, seen, ids = ev._localization_inputs(sample, exp)
    if maps is not None:
        for name in names:
            group[name].update(maps, masks, ignore, seen=seen)
            ev.rows[label][name] += ids
        ev._warn_unseen(label, [group[n] for n in names], sample.id, masks, ignore, seen)


@feeder("filler")
def _feed_filler(ev: Evaluator, label: str, names: list[str], sample: Sample, exp: Explanation, _curves) -> None:
    """Word weights, content/filler labels of the ground-truth answer's words and each word map's mass."""
    if sample.word_is_content is None or sample.answer is None:
        return
    labels = ev.word_labels(sample, exp)
    if labels is not None:
        content = torch.tensor([m is not None for m in labels])
        word_maps, word_weights = exp.word_view()
        mass = word_maps.double().flatten(1).sum(1)  # Σ_pixels of each word's min-max map
        for name in names:
            ev.metrics[label][name].update([word_weights.double()], [content], [mass])
            ev.rows[label][name].append(sample.id)


@feeder("perturbation")
def _feed_perturbation(
    ev: Evaluator,
    label: str,
    names: list[str],
    sample: Sample,
    exp: Explanation,
    curves: dict[str, PerturbationCurve] | None,
) -> None:
    """Each metric's mode curve (pooled by :meth:`Evaluator.score`, else scored here) to its ``update_curve``."""
    if sample.answer is None:
        return
    modes = ev._perturbation_modes(label)
    if curves is None:
        settings = ev.settings
        curves = reference_curves(
            ev.adapter,
            ev._request(label, sample, exp, modes),
            settings.max_batch,
            settings.replacement,
            settings.blur_sigma,
            settings.rank_levels,
        )
    for name in names:
        ev.metrics[label][name].update_curve(curves[modes[name]])
        ev.rows[label][name].append(sample.id)
