"""Perturbation curves of many samples and methods at once, every distinct image scored once, in full forwards.

:func:`dexar.perturbation.perturbation_curves` scores one sample and one map: its ~30 distinct images
fill two forwards of 16 at best, and the original, fully obscured and fully blurred images are scored
again for every method. :func:`pooled_curves` takes every (sample, method) request of a batch and:

* ranks each map once (:func:`dexar.perturbation.rank_pixels`: the same quantized, batch-independent
  order) and keeps, per request, each pixel's position in that order;
* registers each distinct image once: the end images of a sample (original, all-mean, all-blurred)
  are shared by every method of the sample (requests with the same ``group``), the partly perturbed
  ones belong to their request;
* builds each forward's images on the device in one vectorized step (an image is the original with
  the pixels whose rank lies in ``[lo, hi)`` replaced by its fill), bitwise the images of
  :func:`dexar.perturbation.perturb`;
* scores them in forwards of ``max_batch`` images pooled over requests and samples. Rows of one forward
  share their prompt and answer lengths and image shape (a forward never pads, so each row is computed
  as if alone, for every family's padding side); at most one forward per such class is not full;
* encodes PIC's lossless WebP images once per distinct image: on an accelerator in a thread pool while
  the device runs the forwards; on the CPU in the main thread, between forwards (the forwards already
  use every core: encoding threads beside them oversubscribe the cores and slow the forwards; the
  README gives the figures of ``benchmarks/evaluation.py``).

Results are those of :func:`~dexar.perturbation.perturbation_curves` per request (tested against it,
the slow reference, to 1e-6 in the metrics). A request that cannot be scored (a NaN map, an empty answer,
a failing forward) gets its exception instead of curves; the others are unaffected.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from dexar.adapters.base import VLMAdapter
from dexar.perturbation import (
    DEFAULT_BLUR_SIGMA,
    DEFAULT_MAX_BATCH,
    RANK_LEVELS,
    PerturbationCurve,
    _as_chw,
    _fills,
    _image_key,
    _levels_by_mode,
    level_counts,
    perturbation_curves,
    rank_pixels,
    rows_perplexity,
    to_uint8,
    webp_size,
)

_FILL_INDEX = {"mean": 0, "blur": 1}


@dataclass
class CurveRequest:
    """The curves one sample and one map need.

    Attributes:
        group: The sample's identity (e.g. its id). Requests of one group must share ``pixel_values``,
            ``prompt_ids`` and ``answer_ids``: their end images are built, scored and encoded once.
        pixel_values: ``(C, H, W)`` or ``(1, C, H, W)`` processor output of the sample.
        prompt_ids: Prompt token ids (template and image placeholders included).
        answer_ids: Answer token ids.
        heatmap: ``(h, w)`` explanation map.
        levels: Mode → level grid (modes of :data:`dexar.perturbation.MODES`).
    """

    group: Hashable
    pixel_values: torch.Tensor
    prompt_ids: Sequence[int]
    answer_ids: Sequence[int]
    heatmap: torch.Tensor
    levels: Mapping[str, Sequence[float]]


@dataclass
class _Slot:
    """One distinct image: the original of ``group`` with the pixels ranked in ``[lo, hi)`` replaced by ``fill``."""

    group: int
    rank_row: int
    lo: int
    hi: int
    fill: int
    length: tuple
    encode: bool = False


def pooled_curves(
    adapter: VLMAdapter,
    requests: Mapping[Hashable, CurveRequest],
    max_batch: int = DEFAULT_MAX_BATCH,
    replacement: float | Sequence[float] | torch.Tensor = 0.0,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    rank_levels: int | None = RANK_LEVELS,
    workers: int | None = None,
) -> dict[Hashable, dict[str, PerturbationCurve] | Exception]:
    """Every request's curves (or the exception that stopped it), images pooled into full forwards.

    Args:
        adapter: Adapter of the model.
        requests: Name → :class:`CurveRequest`.
        max_batch: Images per forward.
        replacement: Dataset mean in ``pixel_values`` space (scalar or per channel).
        blur_sigma: σ in pixels of the insertion blur.
        rank_levels: Quantization levels of each map before ranking.
        workers: Threads encoding PIC's WebP images; ``0``: in the main thread. Default: ``0`` for a
            model on the CPU, else the CPU count, at most 4.

    Returns:
        Name → mode → :class:`~dexar.perturbation.PerturbationCurve`, or the request's exception.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    pool = _Pool(replacement, blur_sigma, rank_levels)
    results: dict[Hashable, dict[str, PerturbationCurve] | Exception] = {}
    for name, request in requests.items():
        try:
            pool.add(name, request)
        except Exception as err:  # noqa: BLE001 - the request fails, the batch goes on
            results[name] = err
    if not pool.slots:
        return results
    needs_webp = any(s.encode for s in pool.slots)
    if workers is None:
        workers = 0 if next(adapter.model.parameters()).device.type == "cpu" else min(4, os.cpu_count() or 1)
    executor = ThreadPoolExecutor(workers) if needs_webp and workers > 0 else None
    try:
        ppl, sizes, broken = pool.score(adapter, max_batch, executor)
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
    for name, entry in pool.entries.items():
        if name in broken:  # a failing forward: score the request alone, so only a bad request fails
            results[name] = _alone(adapter, requests[name], max_batch, replacement, blur_sigma, rank_levels)
            continue
        results[name] = _curves(entry, ppl, sizes)
    return results


def reference_curves(
    adapter: VLMAdapter,
    request: CurveRequest,
    max_batch: int = DEFAULT_MAX_BATCH,
    replacement: float | Sequence[float] | torch.Tensor = 0.0,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    rank_levels: int | None = RANK_LEVELS,
) -> dict[str, PerturbationCurve]:
    """One request's curves on their own (:func:`~dexar.perturbation.perturbation_curves`): the slow reference."""
    return perturbation_curves(
        adapter,
        request.pixel_values,
        request.prompt_ids,
        request.answer_ids,
        request.heatmap,
        modes=tuple(request.levels),
        levels=request.levels,
        max_batch=max_batch,
        replacement=replacement,
        blur_sigma=blur_sigma,
        rank_levels=rank_levels,
    )


def _alone(adapter, request, max_batch, replacement, blur_sigma, rank_levels):
    try:
        return reference_curves(adapter, request, max_batch, replacement, blur_sigma, rank_levels)
    except Exception as err:  # noqa: BLE001
        return err


def _curves(entry, ppl: torch.Tensor, sizes: dict[int, int]) -> dict[str, PerturbationCurve]:
    grids, slots_by_mode, original = entry
    curves = {}
    for mode, slots in slots_by_mode.items():
        curves[mode] = PerturbationCurve(
            mode=mode,
            levels=torch.tensor(grids[mode], dtype=torch.float64),
            ppl=ppl[torch.tensor(slots)],
            ppl_original=float(ppl[original]),
            webp_sizes=torch.tensor([sizes[s] for s in slots], dtype=torch.float64) if mode == "pic" else None,
        )
    return curves


class _Pool:
    """The distinct images of every request, and how to build and score them."""

    def __init__(self, replacement, blur_sigma: float, rank_levels: int | None) -> None:
        self.replacement, self.blur_sigma, self.rank_levels = replacement, blur_sigma, rank_levels
        self.groups: dict[Hashable, int] = {}
        self.originals: list[torch.Tensor] = []
        self.fills: list[list[torch.Tensor]] = []
        self.texts: list[tuple[list[int], list[int]]] = []
        self.ranks: list[torch.Tensor] = []
        self.slots: list[_Slot] = []
        self.index: dict[tuple, int] = {}
        self.entries: dict[Hashable, tuple] = {}

    def add(self, name: Hashable, request: CurveRequest) -> None:
        """Rank the request's map and register its images (end images shared within its group)."""
        if not request.answer_ids:
            raise ValueError("the answer must hold at least one token to have a perplexity")
        original = _as_chw(request.pixel_values)
        grids = _levels_by_mode(tuple(request.levels), request.levels)
        order = rank_pixels(request.heatmap.to(original.device), tuple(original.shape[-2:]), self.rank_levels)
        g = self._group(request, original, grids)
        n = order.numel()
        rank = torch.empty(n, dtype=torch.int32, device=order.device)
        rank[order] = torch.arange(n, dtype=torch.int32, device=order.device)
        self.ranks.append(rank)
        row = len(self.ranks) - 1
        length = (len(request.prompt_ids), len(request.answer_ids), *original.shape, original.dtype)
        slots_by_mode = {}
        for mode, grid in grids.items():
            keys = [_image_key(mode, k, n) for k in level_counts(grid, n)]
            slots_by_mode[mode] = [self._slot(key, g, row, n, length, encode=mode == "pic") for key in keys]
        self.entries[name] = (grids, slots_by_mode, self._slot(("original",), g, row, n, length))

    def _group(self, request: CurveRequest, original: torch.Tensor, grids: dict[str, list[float]]) -> int:
        text = (list(request.prompt_ids), list(request.answer_ids))
        g = self.groups.get(request.group)
        if g is None:
            g = self.groups[request.group] = len(self.originals)
            self.originals.append(original)
            self.fills.append([])
            self.texts.append(text)
        elif self.texts[g] != text or not torch.equal(self.originals[g], original):
            raise ValueError(f"requests of group {request.group!r} differ in pixel values, prompt or answer")
        if not self.fills[g] or ("insertion" in grids and len(self.fills[g]) < 2):
            fills = _fills(original, tuple(grids), self.replacement, self.blur_sigma)
            self.fills[g] = [fills["mean"], fills.get("blur", fills["mean"])]
        return g

    def _slot(self, key: tuple, group: int, row: int, n: int, length: tuple, encode: bool = False) -> int:
        shared = key[0] == "original" or key[1] == "all"
        ident = (("group", group) if shared else ("row", row)) + key
        index = self.index.get(ident)
        if index is None:
            if key[0] == "original":
                lo, hi, fill = 0, 0, 0
            elif key[1] == "all":
                lo, hi, fill = 0, n, _FILL_INDEX[key[0]]
            else:
                _, side, replaced = key
                lo, hi = (0, replaced) if side == "top" else (n - replaced, n)
                fill = _FILL_INDEX[key[0]]
            index = self.index[ident] = len(self.slots)
            self.slots.append(_Slot(group, row, lo, hi, fill, length))
        self.slots[index].encode |= encode
        return index

    def build(self, indices: list[int]) -> torch.Tensor:
        """The ``(K, C, H, W)`` images of ``indices``, in one vectorized step."""
        slots = [self.slots[i] for i in indices]
        device = self.originals[0].device
        rank = torch.stack([self.ranks[s.rank_row] for s in slots])
        lo = torch.tensor([s.lo for s in slots], device=device, dtype=torch.int32)[:, None]
        hi = torch.tensor([s.hi for s in slots], device=device, dtype=torch.int32)[:, None]
        originals = torch.stack([self.originals[s.group] for s in slots])
        fills = torch.stack([self.fills[s.group][s.fill] for s in slots])
        mask = (rank >= lo) & (rank < hi)
        return torch.where(mask.view(len(slots), 1, *originals.shape[-2:]), fills, originals)

    def score(
        self, adapter: VLMAdapter, max_batch: int, executor: Executor | None
    ) -> tuple[torch.Tensor, dict[int, int], set[Hashable]]:
        """Perplexity of every slot, WebP bytes of the slots PIC needs, and the requests a forward failed."""
        by_length: dict[tuple, list[int]] = {}
        for i, slot in enumerate(self.slots):
            by_length.setdefault(slot.length, []).append(i)
        ppl = torch.full((len(self.slots),), torch.nan, dtype=torch.float64)
        futures: dict[int, Future] = {}
        sizes: dict[int, int] = {}
        failed: set[int] = set()
        processor = adapter.processor
        with torch.inference_mode():
            for indices in by_length.values():
                for start in range(0, len(indices), max_batch):
                    chunk = indices[start : start + max_batch]
                    images = self.build(chunk)
                    for j, i in enumerate(chunk):
                        if self.slots[i].encode and executor is not None:
                            futures[i] = executor.submit(_webp_bytes, images[j], processor)
                        elif self.slots[i].encode:
                            sizes[i] = _webp_bytes(images[j], processor)
                    prompts = [self.texts[self.slots[i].group][0] for i in chunk]
                    answers = [self.texts[self.slots[i].group][1] for i in chunk]
                    try:
                        ppl[chunk] = rows_perplexity(adapter, prompts, answers, images)
                    except torch.OutOfMemoryError:
                        raise
                    except Exception:  # noqa: BLE001 - its requests are rescored alone
                        failed.update(chunk)
        sizes |= {i: f.result() for i, f in futures.items()}
        broken = {
            name
            for name, (_, slots_by_mode, original) in self.entries.items()
            if original in failed or any(s in failed for slots in slots_by_mode.values() for s in slots)
        }
        return ppl, sizes, broken


def _webp_bytes(image: torch.Tensor, processor) -> int:
    return webp_size(to_uint8(image, processor))
