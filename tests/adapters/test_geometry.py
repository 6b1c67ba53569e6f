"""Maps on the pixels the model saw: each family's grid mapped back through its processor's real geometry.

The reference never uses :mod:`dexar.adapters.geometry`: every original pixel is painted with its own
coordinates, the family's real image processor (configured as its hub checkpoint's, resampling
switched to NEAREST and normalisation off so that values are copied, not mixed) makes the model's
view, and decoding the view tells which original pixels each image token shows. Image sizes are
chosen so that every view pixel shows one original pixel and every original pixel it keeps is
shown (scales 1 and 1/2), which makes the reference exact.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    Idefics3ImageProcessorPil,
    LlavaImageProcessorPil,
    LlavaNextImageProcessorPil,
    Qwen2VLImageProcessorPil,
    SiglipImageProcessorPil,
)

from dexar.adapters import get_adapter
from dexar.adapters.geometry import MapGeometry, ProcessorView
from dexar.testing.florence2 import random_florence2
from dexar.testing.idefics3 import random_idefics3
from dexar.testing.llava import random_llava
from dexar.testing.llava_next import random_llava_next
from dexar.testing.paligemma import random_paligemma
from dexar.testing.qwen2_vl import random_qwen2_vl

HUB_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
"""``llava-hf/llava-v1.6-*`` grid pinpoints."""


# -- the reference: pixels that carry their own coordinates -----------------------------------------
def coordinate_image(height: int, width: int) -> Image.Image:
    """R, G: low bytes of x, y; B: a 'real pixel' flag (128) and the high bits (padding decodes as not real)."""
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs & 255, ys & 255, 128 | (xs >> 8) | ((ys >> 8) << 3)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def decode(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ys, xs, real)`` of a raw ``(3, h, w)`` view of a :func:`coordinate_image`."""
    r, g, b = view.round().long()
    real = b >= 128
    b = b & 127
    return g + ((b >> 3) << 8), r + ((b & 7) << 8), real


def raw(image_processor):
    """The same processor with values copied (NEAREST, no rescale, no normalisation)."""
    out = copy.deepcopy(image_processor)
    out.resample = Image.NEAREST
    out.do_rescale = False
    out.do_normalize = False
    return out


def shown_pixels(cells: dict, size: tuple[int, int]) -> tuple[torch.Tensor, dict, dict]:
    """Union of real decoded pixels, and per map row / column the original rows / columns they show."""
    seen = torch.zeros(size, dtype=torch.bool)
    rows: dict[int, set[int]] = {}
    cols: dict[int, set[int]] = {}
    for (r, c), view in cells.items():
        ys, xs, real = decode(view)
        seen[ys[real], xs[real]] = True
        rows.setdefault(r, set()).update(ys[real].tolist())
        cols.setdefault(c, set()).update(xs[real].tolist())
    return seen, rows, cols


def assert_matches_reference(geometry: MapGeometry, cells: dict, grid: tuple[int, int]) -> None:
    """``seen`` == the pixels the tokens show; a one-hot map row/column placed ≥ 0.5 exactly where its tokens look.

    Rows and columns checked: the three at each end and every fifth one between (all of a small grid).
    """
    seen_ref, rows, cols = shown_pixels(cells, geometry.image_size)
    assert torch.equal(geometry.seen(), seen_ref)
    y_any, x_any = (int(i[0]) for i in torch.nonzero(seen_ref)[:1].T)
    for axis, shown in ((0, rows), (1, cols)):
        n = grid[axis]
        picks = sorted({*range(min(3, n)), *range(max(0, n - 3), n), *range(0, n, 5)} & set(shown))
        onehot = torch.zeros(len(picks), *grid, dtype=torch.float64)
        for k, index in enumerate(picks):
            onehot[(k, index) if axis == 0 else (k, slice(None), index)] = 1.0
        placed = geometry.place(onehot)
        line = placed[:, :, x_any] if axis == 0 else placed[:, y_any, :]
        for k, index in enumerate(picks):
            assert set(torch.nonzero(line[k] >= 0.5)[:, 0].tolist()) == shown[index], (axis, index)


def even_cells(view: torch.Tensor, grid: tuple[int, int]) -> dict:
    """Token ``(r, c)`` of a grid spanning the whole view → its view pixels."""
    gh, gw = grid
    ph, pw = view.shape[-2] // gh, view.shape[-1] // gw
    assert (ph * gh, pw * gw) == tuple(view.shape[-2:])
    return {(r, c): view[:, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] for r in range(gh) for c in range(gw)}


# -- single-view families ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava15():
    """LLaVA-1.5's geometry: 336-pixel CLIP, patch 14 (24×24 tokens), shortest edge 336 + center crop 336."""
    model, processor = random_llava(hidden=32, layers=1, heads=2, grid=24, patch=14, dtype=torch.float32, seed=0)
    hub = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert hub.do_center_crop
    processor.image_processor = hub
    return model, processor


def checked_geometry(model, processor, size: tuple[int, int], cells_of) -> MapGeometry:
    """The adapter's geometry of a coordinate image of ``size``, checked against ``cells_of(adapter, image)``."""
    adapter = get_adapter(model, processor)
    image = coordinate_image(*size)
    cells, grid = cells_of(adapter, image)
    geometry = adapter.map_geometry(image)
    assert_matches_reference(geometry, cells, grid)
    return geometry


def single_view_cells(adapter, image: Image.Image) -> tuple[dict, tuple[int, int]]:
    processor = copy.copy(adapter.processor)
    processor.image_processor = raw(adapter.processor.image_processor)
    view = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    grid = adapter.image_grid({"pixel_values": view[None]})
    return even_cells(view, grid), grid


# (height, width): 2:1 at scale 1, an odd margin (the crop's floor), 1:2 at scale 1 and upscaled by 2
LLAVA_SIZES = [(336, 672), (336, 673), (672, 336), (336, 168)]


@pytest.mark.parametrize("size", LLAVA_SIZES)
def test_llava15_grid_is_the_center_crop(llava15, size):
    geometry = checked_geometry(*llava15, size, single_view_cells)
    seen = geometry.seen()
    short = min(size)
    assert int(seen.sum()) == short * short  # the 336-pixel crop of a 336-pixel short side (scale 1 or 2)
    wide = size[1] > size[0]
    margin = (slice(None), slice(0, (size[1] - short) // 2)) if wide else (slice(0, (size[0] - short) // 2),)
    assert not seen[margin].any()
    placed = geometry.place(torch.ones(24, 24, dtype=torch.float64))
    assert torch.equal(placed > 0, seen) and placed[margin].abs().max() == 0


def test_shapes_processor_crops_non_square_images():
    """The bundled model's CLIPImageProcessor (shortest edge 64 + center crop 64): a 2:1 image shows its centre."""
    from dexar import SHAPES_CHECKPOINT, load_model

    model, processor = load_model(SHAPES_CHECKPOINT)
    assert get_adapter(model, processor).view.crop == (64, 64)
    for size in [(64, 128), (128, 64), (32, 64)]:
        checked_geometry(model, processor, size, single_view_cells)


@pytest.fixture(scope="module")
def paligemma():
    """PaliGemma-3B-224's geometry: SigLIP 224 px, patch 14 (16×16), plain resize to 224×224."""
    model, processor = random_paligemma(grid=16, patch=14, layers=1, vision_layers=0, dtype=torch.float32)
    processor.image_processor = SiglipImageProcessorPil(size={"height": 224, "width": 224})
    return model, processor


@pytest.mark.parametrize("size", [(112, 224), (224, 112), (224, 448)])
def test_paligemma_grid_is_the_whole_image(paligemma, size):
    model, processor = paligemma
    adapter = get_adapter(model, processor)
    image = coordinate_image(*size)
    geometry = adapter.map_geometry(image)
    assert geometry.seen().all()
    if max(size) <= 224:  # up-scaled: every pixel is shown, the reference is exact
        cells, grid = single_view_cells(adapter, image)
        assert_matches_reference(geometry, cells, grid)
    maps = torch.rand(3, 16, 16, dtype=torch.float64)
    stretched = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    assert torch.allclose(geometry.place(maps), stretched, atol=1e-12)  # a plain resize: the stretch is right


@pytest.mark.parametrize("size", [(384, 768), (768, 384)])
def test_florence2_grid_is_the_whole_image(size):
    """Florence-2's processor (CLIPImageProcessor, 768×768, no center crop)."""
    model, processor = random_florence2(dtype=torch.float32)
    processor.image_processor = CLIPImageProcessorPil(
        size={"height": 768, "width": 768}, crop_size={"height": 768, "width": 768}, do_center_crop=False
    )
    assert get_adapter(model, processor).image_grid({"pixel_values": torch.zeros(1, 3, 768, 768)}) == (96, 96)
    assert checked_geometry(model, processor, size, single_view_cells).seen().all()  # tiny DaViT: strides 4, 2


# -- dynamic resolution and tiles -------------------------------------------------------------------
@pytest.mark.parametrize("size", [(56, 112), (112, 56)])
def test_qwen2_vl_grid_is_the_whole_image(size):
    """Qwen2-VL's processor (patch 14, merge 2, the hub's min/max pixels): smart_resize keeps the whole image."""
    model, processor = random_qwen2_vl(patch=14, merge=2, layers=1, dtype=torch.float32)
    hub = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor.image_processor = raw(hub)
    adapter = get_adapter(model, processor)
    image = coordinate_image(*size)
    prompt_ids, image_inputs = adapter.encode_prompts([image], ["describe"])
    batch = adapter.build_batch(prompt_ids, [[0]], image_inputs)
    view = adapter.pixel_view(batch, 0)
    assert_matches_reference(adapter.map_geometry(image), even_cells(view, batch.image_grid), batch.image_grid)


@pytest.fixture(scope="module")
def llava_next_hub():
    """LLaVA-v1.6's geometry: 336-pixel tiles of 24×24 tokens, the hub pinpoints, shortest edge 336 + crop 336."""
    model, processor = random_llava_next(tile=336, patch=14, layers=1, dtype=torch.float32)
    model.config.image_grid_pinpoints = HUB_PINPOINTS
    processor.image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=HUB_PINPOINTS
    )
    return model, processor


def tile_cells(adapter, image: Image.Image) -> tuple[dict, tuple[int, int]]:
    """LLaVA-NeXT: full-map cell ``(R, C)`` → the view pixels of the tile token it holds (from the model's packing)."""
    layout = adapter.layout((image.height, image.width))
    tiles = raw(adapter.processor.image_processor)(images=[image], return_tensors="pt")["pixel_values"][0]
    g, (top, left), pixels = layout.side, layout.offset, adapter.view.tile // layout.side
    cells = {}
    for r, c in itertools.product(range(layout.grid[0]), range(layout.grid[1])):
        (tile_row, row), (tile_col, col) = divmod(r + top, g), divmod(c + left, g)
        tile = tiles[1 + tile_row * layout.per_row + tile_col]
        cells[(r, c)] = tile[:, row * pixels : (row + 1) * pixels, col * pixels : (col + 1) * pixels]
    return cells, layout.grid


# 320 px high: unpad keeps token rows that stop 6 px short of the image (a sliver seen only by the
# global view); 330 px: the kept rows reach 3 px into the padding
@pytest.mark.parametrize("size", [(320, 672), (672, 320), (330, 672), (672, 330)])
def test_llava_next_grid_is_the_kept_tiles(llava_next_hub, size):
    geometry = checked_geometry(*llava_next_hub, size, tile_cells)
    long_axis = int(np.argmax(size))
    short = 1 - long_axis
    seen_lines = geometry.seen().any(long_axis)
    if min(size) == 320:
        assert seen_lines[:6].sum() == 0 and seen_lines[-6:].sum() == 0 and seen_lines[6:-6].all()
    else:
        assert seen_lines.all() and geometry.box[short] == -3.0


def test_llava_next_global_view_shares_follow_the_canvas(llava_next_hub):
    """A global-view token's share lands on the cells its box covers (in the kept grid's frame), by area."""
    model, processor = llava_next_hub
    adapter = get_adapter(model, processor)
    layout = adapter.layout((320, 672))
    cell_map = adapter.cell_map(layout)
    g = layout.side
    # global token (0, 0) shows canvas rows 8 + [0, 320/24) = [8, 21.33) and columns [0, 28); the kept
    # grid starts at canvas row 14: rows 14..21.33 of the first cell row, columns 0..28 of cells 0 and 1
    column = cell_map[:, 0].view(layout.grid)
    height = 320 / 24
    assert float(column[0, 0]) == pytest.approx((21 + 1 / 3 - 14) * 14 / (height * 28), abs=1e-12)
    assert float(column[0, 1]) == pytest.approx(float(column[0, 0]), abs=1e-12)
    assert float(column.sum()) == pytest.approx((21 + 1 / 3 - 14) / height, abs=1e-12)  # the sliver's share: unseen
    middle = cell_map[:, (g // 2) * g + g // 2]
    assert float(middle.sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("size", [(364, 728), (728, 364)])
def test_idefics3_grid_is_the_whole_image(size):
    """Idefics3-8B's geometry: longest edge 4·364, 364-pixel tiles, patch 14, pixel shuffle 2 (13×13 tokens a tile)."""
    model, processor = random_idefics3(tile=364, patch=14, max_side=1456, layers=1, dtype=torch.float32)
    hub = Idefics3ImageProcessorPil(size={"longest_edge": 1456}, max_image_size={"longest_edge": 364})
    adapter = get_adapter(model, processor)
    image = coordinate_image(*size)
    out = raw(hub)(images=[[image]], return_row_col_info=True, return_tensors="pt")
    rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
    tiles, m = out["pixel_values"][0], adapter.side
    pixels = 364 // m
    cells = {}
    for r, c in itertools.product(range(rows * m), range(cols * m)):
        tile = tiles[(r // m) * cols + c // m]
        cells[(r, c)] = tile[:, (r % m) * pixels : (r % m + 1) * pixels, (c % m) * pixels : (c % m + 1) * pixels]
    assert (rows, cols) == ((2, 4) if size[1] > size[0] else (4, 2))
    assert_matches_reference(adapter.map_geometry(image), cells, (rows * m, cols * m))


# -- the processor steps on their own ------------------------------------------------------------------
@pytest.mark.parametrize(
    "size",
    [{"shortest_edge": 336}, {"height": 224, "width": 300}, {"shortest_edge": 100, "longest_edge": 150}],
)
def test_resize_sizes_are_the_processors(size):
    """The resized size, for many image sizes, is the real processor's (its own rounding)."""
    processor = CLIPImageProcessorPil(size=size, do_center_crop=False, do_normalize=False)
    view = ProcessorView.of(processor)
    rng = np.random.default_rng(0)
    for height, width in rng.integers(20, 700, size=(25, 2)):
        image = Image.new("RGB", (int(width), int(height)))
        expected = tuple(processor(images=[image], return_tensors="np")["pixel_values"][0].shape[-2:])
        assert view.view_size((int(height), int(width))) == expected


@pytest.mark.parametrize("size", [(30, 50), (31, 47), (50, 30)])
def test_center_crop_larger_than_the_image_pads(size):
    """shortest edge 60, crop 64: the crop pads (PIL backend: the larger half before the content)."""
    processor = CLIPImageProcessorPil(size={"shortest_edge": 60}, crop_size={"height": 64, "width": 64})
    view = ProcessorView.of(processor)
    image = coordinate_image(*size)
    pixels = raw(processor)(images=[image], return_tensors="pt")["pixel_values"][0]
    geometry = view.geometry(size)
    if size == (31, 47):  # scale 60/31: the reference is not exact, the padded rows and columns are
        _, _, real = decode(pixels)
        assert torch.nonzero(real.any(1))[0, 0] == 2 and geometry.box[0] == pytest.approx(-2 * 31 / 60)
        return
    assert_matches_reference(geometry, even_cells(pixels, (8, 8)), (8, 8))
    short = int(np.argmin(size))  # the short side is padded (all of it is seen), the long one cropped
    assert geometry.seen().any(1 - short).all() and geometry.box[short] < 0
    assert not geometry.seen().any(short).all()


@pytest.mark.parametrize("size", [(168, 336), (336, 168)])
def test_llava_pad_to_square_keeps_the_whole_image(size):
    """LlavaImageProcessor(do_pad=True) pads to a square (mean colour) before resize and crop: nothing is cut."""
    processor = LlavaImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True
    )
    geometry = ProcessorView.of(processor).geometry(size)
    image = coordinate_image(*size)
    pixels = raw(processor)(images=[image], return_tensors="pt")["pixel_values"][0]
    assert_matches_reference(geometry, even_cells(pixels, (24, 24)), (24, 24))
    assert geometry.seen().all()


def test_unknown_processor_is_refused_at_setup():
    from dexar.adapters import DexarInputError

    model, processor = random_llava(grid=2, patch=8)
    processor.image_processor = Qwen2VLImageProcessorPil()
    with pytest.raises(DexarInputError, match="geometry is not known"):
        get_adapter(model, processor)


# -- MapGeometry against a naive per-pixel computation ---------------------------------------------------
def naive_place(maps: torch.Tensor, image_size, box, size) -> torch.Tensor:
    """Pixel by pixel: the centre in original coordinates, outside the box or image → 0, else bilinear by hand."""
    (height, width), (y0, x0, y1, x1) = image_size, box
    h, w = maps.shape[-2:]
    out = torch.zeros(*maps.shape[:-2], *size, dtype=torch.float64)
    for i, j in itertools.product(range(size[0]), range(size[1])):
        y, x = (i + 0.5) * height / size[0], (j + 0.5) * width / size[1]
        if not (max(y0, 0) <= y < min(y1, height) and max(x0, 0) <= x < min(x1, width)):
            continue
        u = min(max((y - y0) / (y1 - y0) * h - 0.5, 0.0), h - 1)
        v = min(max((x - x0) / (x1 - x0) * w - 0.5, 0.0), w - 1)
        r0, c0 = int(u), int(v)
        r1, c1 = min(r0 + 1, h - 1), min(c0 + 1, w - 1)
        a, b = u - r0, v - c0
        out[..., i, j] = (
            (1 - a) * (1 - b) * maps[..., r0, c0]
            + (1 - a) * b * maps[..., r0, c1]
            + a * (1 - b) * maps[..., r1, c0]
            + a * b * maps[..., r1, c1]
        )
    return out


@pytest.mark.parametrize(
    "box,size",
    [
        ((0.0, 0.0, 30.0, 40.0), (30, 40)),  # the whole image
        ((0.0, 7.5, 30.0, 32.5), (30, 40)),  # a center crop
        ((-4.0, 0.0, 34.0, 40.0), (15, 20)),  # padding above and below, drawn at half size
        ((3.2, -1.7, 21.9, 38.4), (45, 33)),  # anything
    ],
)
def test_place_matches_a_naive_per_pixel_computation(box, size):
    maps = torch.rand(2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    geometry = MapGeometry((30, 40), box)
    expected = naive_place(maps, (30, 40), box, size)
    assert torch.allclose(geometry.place(maps, size), expected, atol=1e-12)
    assert torch.equal(geometry.seen(size), (expected[0] != 0) | naive_seen((30, 40), box, size))


def naive_seen(image_size, box, size) -> torch.Tensor:
    (height, width), (y0, x0, y1, x1) = image_size, box
    out = torch.zeros(size, dtype=torch.bool)
    for i, j in itertools.product(range(size[0]), range(size[1])):
        y, x = (i + 0.5) * height / size[0], (j + 0.5) * width / size[1]
        out[i, j] = max(y0, 0) <= y < min(y1, height) and max(x0, 0) <= x < min(x1, width)
    return out


def test_whole_image_placement_is_the_bilinear_stretch():
    maps = torch.rand(3, 4, 7, dtype=torch.float64)
    geometry = MapGeometry.whole((37, 53))
    for size in [(37, 53), (5, 3), (100, 10)]:
        expected = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
        assert torch.allclose(geometry.place(maps, size), expected, atol=1e-12)
        assert geometry.seen(size).all()


def test_placed_maps_stay_placed():
    """Placing twice at the image's size changes nothing; ``seen`` follows the maps' size."""
    geometry = MapGeometry((30, 60), (0.0, 15.0, 30.0, 45.0))
    maps = torch.rand(4, 4, dtype=torch.float64)
    once = geometry.place(maps)
    placed = geometry.on_image()
    assert torch.allclose(placed.place(once), once, atol=1e-12)
    assert torch.equal(placed.seen(), geometry.seen())
    assert placed.seen((15, 30)).sum() == 15 * 15
    assert placed.to_dict()["seen_box"] == [0.0, 15.0, 30.0, 45.0]
    assert MapGeometry.from_dict(placed.to_dict()) == placed
    assert torch.equal(MapGeometry.from_dict(geometry.to_dict()).place(maps), once)
