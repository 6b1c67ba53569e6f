"""Cross-process helpers whose collectives have the same shape on every rank, whatever each rank did."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` outside a process group.

    A collective: under DDP every rank must call it. Unlike a tensor reduction it needs no agreement
    on sizes, so a rank that had nothing to do (e.g. all its samples done by an earlier attempt) can
    take part with an empty value.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
