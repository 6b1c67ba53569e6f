"""Shared state handling of the metric classes: per-sample values, a mean over valid samples, skips."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

T = TypeVar("T")


class SampleMeanMetric(Metric):
    """Mean over samples of a per-sample value computed by a function of :mod:`metrics.functional`.

    States (all float64, so that one process and several give the same mean to ~1e-15):

    * ``total``, ``count`` (``dist_reduce_fx="sum"``): sum and number of the valid (finite) values;
      ``compute()`` returns ``total / count`` (NaN only when no sample was valid).
    * ``skipped`` (sum): samples whose value was NaN (degenerate input), never averaged in.
    * ``values`` (``"cat"``): every per-sample value in update order, NaN for skipped samples, so a
      per-sample table lines up with the samples. After a sync the ranks' values are concatenated in
      rank order.

    :meth:`per_sample` (and the curve accessors of subclasses) read synced states: under DDP they are
    collective calls, like ``compute()``, and must run on every rank. Call ``set_dtype`` to change the
    state dtype (e.g. float32 on MPS).
    """

    full_state_update = False
    is_differentiable = False
    plot_lower_bound: float | None = 0.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        zero = torch.tensor(0.0, dtype=torch.float64)
        self.add_state("total", zero.clone(), dist_reduce_fx="sum")
        self.add_state("count", zero.clone(), dist_reduce_fx="sum")
        self.add_state("skipped", zero.clone(), dist_reduce_fx="sum")
        self.add_state("values", [], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)  # also the dtype of an empty rank's placeholder in a "cat" sync

    def _add_values(self, values: torch.Tensor) -> torch.Tensor:
        """Record per-sample values; returns the ``(N,)`` mask of valid (finite) ones."""
        values = values.detach().to(device=self.device, dtype=self.dtype).reshape(-1)
        ok = torch.isfinite(values)
        values = torch.where(ok, values, torch.nan)
        self.values.append(values)
        self.total += torch.where(ok, values, 0.0).sum()
        self.count += ok.sum()
        self.skipped += (~ok).sum()
        return ok

    def compute(self) -> torch.Tensor:
        """Mean of the valid per-sample values (NaN if there was none; see ``skipped``)."""
        if self.count <= 0:
            return torch.tensor(torch.nan, dtype=self.dtype, device=self.device)
        return self.total / self.count

    def _synced(self, read: Callable[[], T]) -> T:
        """Run ``read`` on states synced across processes (a no-op outside DDP or inside compute)."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            process_group=self.process_group,
            should_sync=self._to_sync and not self._is_synced,
        ):
            return read()

    def per_sample(self) -> torch.Tensor:
        """``(num_samples,)`` per-sample values (NaN where skipped), across processes."""

        def read() -> torch.Tensor:
            if isinstance(self.values, list) and not self.values:
                return torch.empty(0, dtype=self.dtype, device=self.device)
            return dim_zero_cat(self.values)

        return self._synced(read)

    @property
    def num_skipped(self) -> int:
        """Number of skipped (degenerate) samples, across processes."""
        return int(self._synced(lambda: self.skipped.clone()))


class CurveMeanMetric(SampleMeanMetric):
    """A :class:`SampleMeanMetric` over curves on a fixed level grid, keeping per-level sums too.

    Args:
        levels: The ``(L,)`` level grid of every curve.
        curves: Names of the ``(L,)`` sum states (``dist_reduce_fx="sum"``) of per-level means.

    """

    def __init__(self, levels: Sequence[float], curves: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.levels = torch.tensor([float(p) for p in levels], dtype=torch.float64)
        if self.levels.ndim != 1 or self.levels.numel() < 2:
            raise ValueError("a curve metric needs at least two levels")
        self._curve_names = tuple(curves)
        for name in self._curve_names:
            self.add_state(name, torch.zeros(self.levels.numel(), dtype=torch.float64), dist_reduce_fx="sum")

    def _add_curves(self, values: torch.Tensor, **curves: torch.Tensor) -> None:
        """Record per-sample values and add the valid samples' ``(N, L)`` curves to the sums."""
        ok = self._add_values(values)
        for name, curve in curves.items():
            curve = curve.detach().to(device=self.device, dtype=self.dtype).reshape(ok.numel(), -1)
            if curve.shape[1] != self.levels.numel():
                raise ValueError(f"curves have {curve.shape[1]} levels, the metric was built for {self.levels.numel()}")
            setattr(self, name, getattr(self, name) + torch.where(ok[:, None], curve, 0.0).sum(0))

    def mean_curve(self) -> tuple[torch.Tensor, ...]:
        """``(levels, *mean curves)``: per level, the mean of each curve state over valid samples, across processes."""
        return (self.levels, *self._mean_curves())

    def _mean_curves(self) -> tuple[torch.Tensor, ...]:
        def read() -> tuple[torch.Tensor, ...]:
            count = self.count.clamp(min=1) if self.count > 0 else torch.tensor(torch.nan, dtype=self.dtype)
            return tuple((getattr(self, name) / count).cpu() for name in self._curve_names)

        return self._synced(read)
