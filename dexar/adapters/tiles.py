"""Geometry of tiled images: where each image token sits in the original image, and the merge into one map.

A tiling adapter (LLaVA-NeXT anyres, Idefics3 / SmolVLM image splitting) gives every image token a
box in normalised original-image coordinates ``[y0, x0, y1, x1] ⊂ [0, 1]²`` (tokens that show no
image region, such as LLaVA-NeXT's row-end ``image_newline``, have none). :func:`box_cell_map` turns
the boxes into the linear map ``(h·w, V)`` from token values to the cells of one full-image grid:

* a token's value is spread over the cells its box overlaps, in proportion to the overlap area
  (each column sums to the share of its box inside the grid: 1 when the grid covers the box, so
  Σ cells = Σ tokens; a box reaching past the grid, like a LLaVA-NeXT global-view token over the
  sliver ``unpad_image`` trims, keeps only its share inside);
* cells add what they receive from every token: a tile token (one cell, weight 1) and the
  global-view token whose box covers it (a share ``overlap / box area``), and overlapping tiles,
  if a family had them, would add in the same way.
"""

from __future__ import annotations

import torch


def box_cell_map(boxes: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(h·w, V)`` area-proportional map from token boxes to the cells of an ``h × w`` grid (row-major).

    Args:
        boxes: ``(V, 4)`` ``[y0, x0, y1, x1]`` in the grid's frame (``[0, 1]²`` is the grid; a box may
            reach past it).
        valid: ``(V,)`` False for tokens without an image region (their column is zero).
        grid: ``(h, w)`` cells of the full-image map.

    Returns:
        float64 matrix whose valid columns each sum to the share of their box inside the grid.

    """
    h, w = grid
    boxes = boxes.to(torch.float64)
    rows = _overlap(boxes[:, 0], boxes[:, 2], h)  # (V, h)
    cols = _overlap(boxes[:, 1], boxes[:, 3], w)  # (V, w)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    weights = rows[:, :, None] * cols[:, None, :] / area.clamp(min=1e-300)[:, None, None]  # (V, h, w)
    weights = weights * valid[:, None, None]
    return weights.reshape(len(boxes), h * w).T.contiguous()


def _overlap(lo: torch.Tensor, hi: torch.Tensor, cells: int) -> torch.Tensor:
    """Length of ``[lo, hi) ∩ [k/cells, (k+1)/cells)`` for every interval and cell: ``(V, cells)``."""
    edges = torch.arange(cells + 1, dtype=torch.float64) / cells
    start = torch.maximum(lo[:, None], edges[None, :-1])
    stop = torch.minimum(hi[:, None], edges[None, 1:])
    return (stop - start).clamp(min=0)


def grid_boxes(rows: torch.Tensor, cols: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes ``(V, 4)`` of cells ``(rows, cols)`` of a ``height × width`` grid spanning the whole image."""
    rows = rows.to(torch.float64)
    cols = cols.to(torch.float64)
    return torch.stack([rows / height, cols / width, (rows + 1) / height, (cols + 1) / width], dim=-1)
