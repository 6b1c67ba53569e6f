"""Seconds per image by phase, merged over batches, processes and the attempts of a resumed run.

Phases (laps of :class:`dexar.explain.PhaseClock`): ``generation`` (greedy answers; tokenization only
with ground-truth answers), ``encoding`` (processor and padded batch), ``trace`` (the one trace shared
by every method of the run), ``method/<label>`` (a method's own work on the shared trace and its
explanation objects), ``alone/<label>`` (the method run on its own: a trace of its own needs plus its
work, measured on the first batches of a run, see ``ExplainerModule.time_alone_batches``) and
``evaluation/<label>`` (metric updates).

Each phase keeps its seconds **and the number of images of the batches that ran it**, so a phase
measured on a few batches (``alone/*``) or restored from an earlier attempt divides by its own images,
and an image that was not computed (done by an earlier attempt whose shards hold no timing, failed,
unreadable) is never counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PhaseTotals:
    """Seconds and images per phase.

    Attributes:
        seconds: Phase → total seconds.
        images: Phase → images of the batches whose seconds are in ``seconds``.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)

    def add(self, seconds: Mapping[str, float], images: int) -> None:
        """Add one batch: its laps and the number of images they covered (nothing if ``images`` is 0)."""
        if images <= 0:
            return
        for phase, sec in seconds.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + float(sec)
            self.images[phase] = self.images.get(phase, 0) + int(images)

    def merge(self, other: PhaseTotals) -> PhaseTotals:
        """Add every phase of ``other`` (returns ``self``)."""
        for phase, sec in other.seconds.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + sec
            self.images[phase] = self.images.get(phase, 0) + other.images.get(phase, 0)
        return self

    @classmethod
    def total(cls, parts: Iterable[PhaseTotals]) -> PhaseTotals:
        """The sum of ``parts`` (e.g. every process's totals)."""
        out = cls()
        for part in parts:
            out.merge(part)
        return out

    def per_image(self) -> dict[str, float]:
        """Phase → seconds per image (phases with no image are left out)."""
        return {p: self.seconds[p] / self.images[p] for p in sorted(self.seconds) if self.images.get(p, 0) > 0}

    def to_dict(self) -> dict[str, Any]:
        """``{"seconds": {...}, "images": {...}}`` (JSON)."""
        return {"seconds": dict(self.seconds), "images": dict(self.images)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PhaseTotals:
        """Inverse of :meth:`to_dict` (``None`` or ``{}``: empty)."""
        data = data or {}
        return cls(
            {k: float(v) for k, v in (data.get("seconds") or {}).items()},
            {k: int(v) for k, v in (data.get("images") or {}).items()},
        )


def method_seconds(per_image: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Seconds per image of each method, from per-phase seconds per image.

    Returns:
        Method label → ``alone``: the paper's sec/img, the method run on its own (``generation`` +
        ``encoding`` + ``alone/<label>``), if measured; ``shared``: its cost in this run (``generation`` +
        ``encoding`` + the shared ``trace`` + ``method/<label>``), if the method ran.
    """
    generation = per_image.get("generation", 0.0) + per_image.get("encoding", 0.0)
    out: dict[str, dict[str, float]] = {}
    for phase, seconds in per_image.items():
        kind, _, label = phase.partition("/")
        if kind == "alone":
            out.setdefault(label, {})["alone"] = generation + seconds
        elif kind == "method":
            out.setdefault(label, {})["shared"] = generation + per_image.get("trace", 0.0) + seconds
    return out
