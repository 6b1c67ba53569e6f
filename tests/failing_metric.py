"""A perturbation metric that raises on chosen calls of one process: injects an evaluation failure."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from metrics import PerturbationAUC


class FailingAUC(PerturbationAUC):
    """:class:`metrics.PerturbationAUC` whose ``fail_call``-th update on process ``fail_rank`` raises.

    Calls are counted per metric object (the module evaluates each method into its own copy), so
    each method's evaluation of the same (first) sample of that process fails.
    """

    def __init__(self, fail_rank: int = 0, fail_call: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_rank, self.fail_call, self.calls = fail_rank, fail_call, 0

    def update(self, nppl: torch.Tensor) -> None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == self.fail_rank:
            self.calls += 1
            if self.calls == self.fail_call:
                raise RuntimeError("injected evaluation failure")
        super().update(nppl)
