"""Metrics: functional code against slow float64 loop references, hand cases, degenerate inputs, classes."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.utilities import dim_zero_cat

import metrics
from metrics import functional as MF


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


# -- slow, obviously correct references (numpy float64, one sample and one threshold at a time) -------


def ref_epg(e, m, v):
    energy = sum(e[i, j] for i in range(e.shape[0]) for j in range(e.shape[1]) if v[i, j])
    inside = sum(e[i, j] for i in range(e.shape[0]) for j in range(e.shape[1]) if v[i, j] and m[i, j])
    return math.nan if energy == 0 else inside / energy


def ref_iou(e, m, v, k):
    vals, inm = e[v], m[v]
    if vals.size == 0:
        return math.nan
    best = 0.0
    for tau in np.linspace(vals.min(), vals.max(), k):
        pred = vals >= tau
        inter, union = int((pred & inm).sum()), int((pred | inm).sum())
        best = max(best, inter / union if union else 0.0)
    return best


def ref_minmax(vals):
    lo, hi = vals.min(), vals.max()
    return np.zeros_like(vals) if hi == lo else (vals - lo) / (hi - lo)


def ref_soft_iou(e, m, v):
    vals, inm = e[v], m[v].astype(np.float64)
    if vals.size == 0:
        return math.nan
    en = ref_minmax(vals)
    num, den = 0.0, 0.0
    for a, b in zip(en, inm, strict=True):
        num += a * b
        den += a + b - a * b
    return math.nan if den == 0 else num / den


def ref_snr(e, m, v, eps=1e-3):
    inside = [float(x) for x, mm, vv in zip(e.ravel(), m.ravel(), v.ravel(), strict=True) if vv and mm]
    outside = [float(x) for x, mm, vv in zip(e.ravel(), m.ravel(), v.ravel(), strict=True) if vv and not mm]
    if not inside or not outside:
        return math.nan
    peak = max(inside + outside)
    if peak == 0:
        return math.nan
    return (sum(inside) / len(inside) / peak) / max(sum(outside) / len(outside) / peak, eps)


def ref_mse(e, m, v):
    vals, inm = e[v], m[v].astype(np.float64)
    if vals.size == 0:
        return math.nan
    en = ref_minmax(vals)
    return sum((a - b) ** 2 for a, b in zip(en, inm, strict=True)) / vals.size


def ref_filler(w, mass, c, eps=MF.DEFAULT_FILLER_EPS, decibels=True):
    shares = [float(x) * float(m) for x, m in zip(w, mass, strict=True)]
    content = [s for s, cc in zip(shares, c, strict=True) if cc]
    filler = [s for s, cc in zip(shares, c, strict=True) if not cc]
    if not content or not filler or max(shares) == 0:
        return math.nan
    peak = max(shares)
    ratio = max(sum(content) / len(content) / peak, eps) / max(sum(filler) / len(filler) / peak, eps)
    return 10 * math.log10(ratio) if decibels else ratio


def ref_trapz(y, x):
    if not all(math.isfinite(float(t)) for t in y):
        return math.nan
    return sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1))


def ref_end_normalized(ppl, original, perturbed):
    """A perplexity curve rescaled so PPL(original) → 0 and PPL(fully perturbed) → 1, clipped; the slow way."""
    values = [float(v) for v in ppl]
    if not all(math.isfinite(v) for v in values) or not values[perturbed] > values[original]:
        return [math.nan] * len(values)
    lo, hi = values[original], values[perturbed]
    return [min(max((v - lo) / (hi - lo), 0.0), 1.0) for v in values]


def ref_pic(ppl, sizes, monotone=True):
    p0, p1, s0, s1 = ppl[0], ppl[-1], sizes[0], sizes[-1]
    if not (s1 > s0 and p1 < p0):
        return math.nan
    points, best = [(0.0, 0.0)], 0.0
    for p, s in zip(ppl, sizes, strict=True):
        x = min(max((s - s0) / (s1 - s0), 0.0), 1.0)
        y = min(max((p0 - p) / (p0 - p1), 0.0), 1.0)
        best = max(best, y)
        points.append((x, best if monotone else y))
    points.append((1.0, 1.0))
    points.sort(key=lambda t: t[0])
    return sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:], strict=False))


def loop(ref, maps, masks, ignore, *args):
    v = np.ones(masks.shape, dtype=bool) if ignore is None else ~ignore.numpy()
    return torch.tensor(
        [ref(maps[i].numpy(), masks[i].numpy(), v[i], *args) for i in range(maps.shape[0])], dtype=torch.float64
    )


def random_batch(seed, n=6, h=7, w=9, with_ignore=True, ties=False):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, h, w, generator=g, dtype=torch.float64)
    if ties:
        maps = (maps * 4).floor() / 4
    maps = maps * torch.rand(n, 1, 1, generator=g, dtype=torch.float64) * 3
    masks = torch.rand(n, h, w, generator=g) < 0.35
    ignore = (torch.rand(n, h, w, generator=g) < 0.15) if with_ignore else None
    return maps, masks, ignore


def close(a, b, tol=1e-12):
    if any(isinstance(x, torch.Tensor) and x.dtype == torch.float32 for x in (a, b)):
        tol = max(tol, 1e-6)
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(a.isnan(), b.isnan()), (a, b)
    assert torch.allclose(a.nan_to_num(), b.nan_to_num(), rtol=tol, atol=tol), (a, b)


LOCALIZATION = {
    "epg": (MF.energy_pointing_game, ref_epg, ()),
    "iou": (MF.best_threshold_iou, ref_iou, (100,)),
    "iou7": (lambda e, m, i: MF.best_threshold_iou(e, m, i, num_thresholds=7), ref_iou, (7,)),
    "soft_iou": (MF.soft_iou, ref_soft_iou, ()),
    "snr": (MF.mask_snr, ref_snr, ()),
    "mse": (MF.mask_mse, ref_mse, ()),
}


# -- functional: random inputs against the references ---------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOCALIZATION))
@pytest.mark.parametrize("seed,with_ignore,ties", [(0, False, False), (1, True, False), (2, True, True)])
def test_localization_matches_loop_reference(name, seed, with_ignore, ties):
    fn, ref, args = LOCALIZATION[name]
    maps, masks, ignore = random_batch(seed, with_ignore=with_ignore, ties=ties)
    close(fn(maps, masks, ignore), loop(ref, maps, masks, ignore, *args))


def test_filler_snr_matches_loop_reference_lists_and_padded():
    g = torch.Generator().manual_seed(3)
    lengths = [5, 1, 8, 3, 6]
    weights = [torch.rand(t, generator=g, dtype=torch.float64) for t in lengths]
    weights[3] = weights[3] * (torch.arange(3) != 0)  # some exact zeros
    contents = [torch.rand(t, generator=g) < 0.5 for t in lengths]
    contents[4] = torch.tensor([True, False, True, False, False, True])
    masses = [torch.rand(t, generator=g, dtype=torch.float64) * 16 for t in lengths]
    masses[0][0] = 0.0  # an empty token map
    for decibels in (True, False):
        rows = zip(weights, masses, contents, strict=True)
        expected = f64([ref_filler(w.tolist(), m.tolist(), c.tolist(), decibels=decibels) for w, m, c in rows])
        close(MF.filler_snr(weights, contents, masses, decibels=decibels), expected)
    padded_w = torch.zeros(len(lengths), 8, dtype=torch.float64)
    padded_m = torch.zeros(len(lengths), 8, dtype=torch.float64)
    padded_c = torch.zeros(len(lengths), 8, dtype=torch.bool)
    valid = torch.zeros(len(lengths), 8, dtype=torch.bool)
    for i, (w, m, c) in enumerate(zip(weights, masses, contents, strict=True)):
        padded_w[i, 8 - len(w) :], padded_m[i, 8 - len(w) :], padded_c[i, 8 - len(w) :] = w, m, c
        valid[i, 8 - len(w) :] = True
    padded_w[~valid], padded_m[~valid] = 7.0, 3.0  # padding must not matter
    close(MF.filler_snr(padded_w, padded_c, padded_m, valid, decibels=False), expected)  # the last: ratios


def test_curve_aucs_match_loop_reference():
    g = torch.Generator().manual_seed(4)
    levels = [0.0, 0.1, 0.25, 0.5, 0.8, 1.0]
    ppl = torch.rand(5, 6, generator=g, dtype=torch.float64) * 20 + 1
    ppl[2, 3] = torch.inf
    x = np.array(levels)
    ppl[0, -1], ppl[1, 0] = ppl[0, 0] + 30, ppl[1, -1] + 30  # one defined deletion and insertion at least
    close(MF.perturbation_auc(ppl, levels), f64([ref_trapz(r.numpy(), x) for r in ppl]))
    deletion = [ref_end_normalized(r, 0, -1) for r in ppl]  # original (level 0) → all mean (level 1)
    insertion = [ref_end_normalized(r, -1, 0) for r in ppl]  # original (level 1) → fully blurred (level 0)
    close(MF.deletion_curve(ppl, levels), f64(deletion))
    close(MF.insertion_curve(ppl, levels), f64(insertion))
    close(MF.deletion_auc(ppl, levels), f64([ref_trapz(c, x) for c in deletion]))
    close(MF.insertion_auc(ppl, levels), f64([ref_trapz(c, x) for c in insertion]))
    assert 0 < int(MF.deletion_auc(ppl, levels).isnan().sum()) < 5  # both defined and undefined rows


@pytest.mark.parametrize("monotone", [True, False])
def test_pic_auc_matches_loop_reference(monotone):
    g = torch.Generator().manual_seed(5)
    ppl = torch.rand(40, 7, generator=g, dtype=torch.float64) * 10 + 1
    sizes = torch.rand(40, 7, generator=g, dtype=torch.float64) * 1000 + 50  # x not monotone in p
    ppl[:, 0] += 10  # obscured image: higher perplexity ...
    ppl[:3, 0] = 0.5  # ... except three undefined samples
    sizes[:, -1] += 2000
    sizes[5, -1] = 10  # original smaller than obscured: undefined
    expected = f64([ref_pic(p.tolist(), s.tolist(), monotone) for p, s in zip(ppl, sizes, strict=True)])
    assert expected.isnan().sum() == 4
    close(MF.pic_auc(ppl, sizes, monotone), expected)


# -- functional: hand-computed cases ------------------------------------------------------------------------
T, F_ = True, False


def t(rows, dtype=torch.float64):
    return torch.tensor([rows], dtype=dtype)


def test_hand_cases_localization():
    e, m = t([[1.0, 2.0], [3.0, 4.0]]), t([[T, F_], [F_, T]], torch.bool)
    close(MF.energy_pointing_game(e, m), [0.5])
    close(MF.energy_pointing_game(e, m, ignore=t([[F_, F_], [F_, T]], torch.bool)), [1 / 6])
    ramp, lower_half = t([[0.0, 1.0], [2.0, 3.0]]), t([[F_, F_], [T, T]], torch.bool)
    close(MF.best_threshold_iou(ramp, lower_half, num_thresholds=4), [1.0])  # τ = 2 selects exactly the mask
    close(MF.best_threshold_iou(ramp, lower_half, num_thresholds=2), [0.5])  # τ ∈ {0, 3}: 2/4 and 1/2
    close(MF.best_threshold_iou(ramp, lower_half, num_thresholds=1), [0.5])  # τ = min: everything
    soft, cross = t([[0.0, 0.5], [1.0, 1.0]]), t([[F_, T], [T, F_]], torch.bool)
    close(MF.soft_iou(soft, cross), [1.5 / 3.0])
    close(MF.soft_iou(soft * 2 + 3, cross), [1.5 / 3.0])  # min-max normalized first
    close(MF.mask_mse(soft, cross), [(0 + 0.25 + 0 + 1) / 4])
    close(MF.mask_snr(t([[4.0, 2.0], [1.0, 1.0]]), t([[T, T], [F_, F_]], torch.bool)), [3.0])
    close(MF.mask_snr(t([[4.0, 2.0], [0.0, 0.0]]), t([[T, T], [F_, F_]], torch.bool)), [0.75 / 1e-3])
    close(MF.mask_snr(t([[4.0, 2.0], [0.0, 0.0]]), t([[T, T], [F_, F_]], torch.bool), eps=0.01), [75.0])


def test_hand_cases_tokens_and_curves():
    # shares λ·mass = [1, 3, 2, 0] → relative [1/3, 1, 2/3, 0]: content 5/6 over filler 1/6 = 5 = 6.9897 dB
    lam, mass = torch.tensor([0.5, 1.0, 2.0, 0.0]), torch.tensor([2.0, 3.0, 1.0, 4.0])
    content = torch.tensor([F_, T, T, F_])
    close(MF.filler_snr([lam], [content], [mass]), [6.989700043360188])
    close(MF.filler_snr([lam], [content], [mass], decibels=False), [5.0])
    # λ = 1 (filler filter off): the shares are the maps' masses, content 2.5 over filler 1 → 3.9794 dB, not 0
    ones = torch.ones(4)
    close(MF.filler_snr([ones], [content], [torch.tensor([1.0, 2.0, 3.0, 1.0])]), [3.979400086720376])
    close(MF.filler_snr([ones], [content], [torch.ones(4)]), [0.0])  # equal shares: 0 dB
    # filler shares all zero: the floor, 10·log10(0.75 / 2.2e-16) = 155.3 dB
    filler_zero = MF.filler_snr([torch.tensor([0.0, 2.0, 1.0])], [torch.tensor([F_, T, T])], [torch.ones(3)])
    close(filler_zero, [10 * math.log10(0.75 / torch.finfo(torch.float64).eps)])
    close(MF.filler_snr([torch.tensor([2.0, 0.0])], [torch.tensor([F_, T])], [torch.ones(2)], eps=1e-3), [-30.0])
    close(MF.perturbation_auc(torch.tensor([1.0, 2.0, 3.0]), [0.0, 0.5, 1.0]), [2.0])
    close(MF.perturbation_auc(torch.ones(1, 10), [i / 10 for i in range(10)]), [0.9])
    # deletion and insertion curves run between their end images: 0 = original, 1 = fully perturbed
    close(MF.deletion_curve(torch.tensor([2.0, 4.0, 6.0]), [0.0, 0.5, 1.0]), [[0.0, 0.5, 1.0]])
    close(MF.deletion_auc(torch.tensor([2.0, 4.0, 6.0]), [0.0, 0.5, 1.0]), [0.5])
    close(MF.deletion_auc(torch.tensor([2.0, 3.0, 6.0]), [0.0, 0.5, 1.0]), [0.25 * 0.25 + 0.25 * 1.25])
    close(MF.deletion_auc(torch.tensor([2.0, 8.0, 6.0]), [0.0, 0.5, 1.0]), [0.75])  # 1.5 clipped to 1
    close(MF.insertion_curve(torch.tensor([6.0, 4.0, 2.0]), [0.0, 0.5, 1.0]), [[1.0, 0.5, 0.0]])
    close(MF.insertion_auc(torch.tensor([6.0, 4.0, 2.0]), [0.0, 0.5, 1.0]), [0.5])
    close(MF.insertion_auc(torch.tensor([6.0, 3.0, 2.0]), [0.0, 0.5, 1.0]), [0.25 * 1.25 + 0.25 * 0.25])
    close(MF.insertion_auc(torch.tensor([6.0, 1.0, 2.0]), [0.0, 0.5, 1.0]), [0.25])  # −0.25 clipped to 0
    close(
        MF.insertion_auc(torch.tensor([11.0, 6.0, 3.0, 1.0]), [0.0, 0.1, 0.5, 1.0]),
        [0.1 * 0.75 + 0.4 * 0.35 + 0.5 * 0.1],
    )
    close(MF.pic_auc(torch.tensor([10.0, 4.0, 2.0]), torch.tensor([100.0, 150.0, 300.0])), [0.75])
    close(MF.pic_auc(torch.tensor([10.0, 1.0, 2.0]), torch.tensor([100.0, 150.0, 300.0])), [0.875])  # y clipped
    ppl, sizes = torch.tensor([10.0, 4.0, 6.0, 2.0]), torch.tensor([100.0, 150.0, 200.0, 300.0])
    close(MF.pic_auc(ppl, sizes), [0.71875])  # running max: y = 0, .75, .75, 1
    close(MF.pic_auc(ppl, sizes, monotone=False), [0.25 * 0.375 + 0.25 * 0.625 + 0.5 * 0.75])
    close(MF.pic_auc(ppl, torch.tensor([100.0, 250.0, 150.0, 300.0])), [0.6875])  # x sorted: .25 before .75
    close(MF.pic_auc(torch.tensor([2.0, 1.0, 3.0]), sizes[:3]), [math.nan])  # PPL(original) ≥ PPL(obscured)
    close(MF.pic_auc(ppl, torch.tensor([300.0, 250.0, 150.0, 100.0])), [math.nan])  # original not larger


# -- functional: degenerate inputs and properties -----------------------------------------------------------
def degenerate_batch():
    """Rows: empty mask, constant map, all-zero map, all-zero map + empty mask, all ignored, full mask."""
    n, h, w = 6, 4, 5
    g = torch.Generator().manual_seed(6)
    maps = torch.rand(n, h, w, generator=g, dtype=torch.float64)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    masks[1:, :2, :3] = True
    maps[1], maps[2], maps[3] = 0.5, 0.0, 0.0
    masks[3] = False
    ignore = torch.zeros(n, h, w, dtype=torch.bool)
    ignore[4] = True
    masks[5] = True
    return maps, masks, ignore


def test_degenerate_inputs_give_documented_values():
    maps, masks, ignore = degenerate_batch()
    area = 6 / 20
    e0 = MF.mask_mse(maps[:1], masks[:1])[0]  # empty mask: mean E'^2
    norm = (maps[0] - maps[0].min()) / (maps[0].max() - maps[0].min())
    close(e0, (norm**2).mean())
    close(MF.energy_pointing_game(maps, masks, ignore), [0.0, area, math.nan, math.nan, math.nan, 1.0])
    close(MF.best_threshold_iou(maps, masks, ignore), [0.0, area, area, 0.0, math.nan, 1.0])
    close(MF.soft_iou(maps, masks, ignore)[:5], [0.0, 0.0, 0.0, math.nan, math.nan])
    close(MF.mask_snr(maps, masks, ignore), [math.nan, 1.0, math.nan, math.nan, math.nan, math.nan])
    close(MF.mask_mse(maps, masks, ignore), [e0, area, area, 0.0, math.nan, MF.mask_mse(maps[5:], masks[5:])[0]])
    # each function agrees with its loop reference on these rows too
    for fn, ref, args in LOCALIZATION.values():
        close(fn(maps, masks, ignore), loop(ref, maps, masks, ignore, *args))


def test_degenerate_token_and_curve_inputs():
    w = [torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]), torch.zeros(3), torch.ones(4), torch.tensor([])]
    c = [torch.tensor([T, T]), torch.tensor([F_, F_]), torch.tensor([T, F_, F_]), torch.tensor([T, F_, T, F_])]
    c.append(torch.tensor([], dtype=torch.bool))
    close(MF.filler_snr(w, c, [torch.ones_like(x) for x in w]), [math.nan, math.nan, math.nan, 0.0, math.nan])
    close(MF.filler_snr(w, c, [torch.zeros_like(x) for x in w]), [math.nan] * 5)  # every map empty: 0/0
    with pytest.raises(ValueError, match="map mass"):
        MF.filler_snr(w, c, [torch.ones(1)] * 5)
    with pytest.raises(ValueError, match="non-negative"):
        MF.filler_snr([torch.ones(2)], [torch.tensor([T, F_])], [-torch.ones(2)])
    close(MF.perturbation_auc(torch.tensor([[1.0, math.nan, 2.0], [1.0, 1.0, 1.0]]), [0, 0.5, 1]), [math.nan, 1.0])
    # equal ends (nothing to normalize), ends the wrong way round (no deterioration / recovery), a non-finite
    # point: undefined, NaN; the classes skip and count them
    ends = torch.tensor([[2.0, 3.0, 2.0], [4.0, 3.0, 2.0], [2.0, math.inf, 6.0], [2.0, 4.0, 6.0]])
    close(MF.deletion_auc(ends, [0, 0.5, 1]), [math.nan, math.nan, math.nan, 0.5])
    close(MF.insertion_auc(ends.flip(1), [0, 0.5, 1]), [math.nan, math.nan, math.nan, 0.5])
    with pytest.raises(ValueError, match="strictly increasing"):
        MF.perturbation_auc(torch.ones(1, 3), [0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="start at 0 and end at 1"):
        MF.insertion_auc(torch.ones(1, 3), [0.0, 0.3, 0.6])
    with pytest.raises(ValueError, match="start at 0 and end at 1"):
        MF.deletion_auc(torch.ones(1, 3), [0.1, 0.3, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        MF.soft_iou(-torch.ones(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool))


def test_map_equal_to_mask_properties():
    _, masks, _ = random_batch(7, with_ignore=False)
    maps = masks.double()
    close(MF.energy_pointing_game(maps, masks), torch.ones(len(masks)))
    close(MF.soft_iou(maps, masks), torch.ones(len(masks)))
    close(MF.best_threshold_iou(maps, masks), torch.ones(len(masks)))
    close(MF.mask_mse(maps, masks), torch.zeros(len(masks)))
    close(MF.mask_snr(maps, masks), torch.full((len(masks),), 1e3))


def test_best_threshold_iou_is_at_least_every_single_threshold():
    maps, masks, ignore = random_batch(8, n=10)
    best = MF.best_threshold_iou(maps, masks, ignore, num_thresholds=25)
    valid = ~ignore
    for i in range(len(maps)):
        vals, inm = maps[i][valid[i]], masks[i][valid[i]]
        for tau in np.linspace(float(vals.min()), float(vals.max()), 25):  # the grid's thresholds
            pred = vals >= tau
            union = int((pred | inm).sum())
            assert best[i] >= (int((pred & inm).sum()) / union if union else 0.0) - 1e-12


def test_webp_size_is_pillow_lossless_webp():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    size = MF.webp_size(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="WEBP", lossless=True, quality=100, method=4)
    assert size == len(buffer.getvalue())
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")), image)
    assert MF.webp_size(torch.from_numpy(image)) == size
    assert MF.webp_size(np.zeros((12, 10, 3), dtype=np.uint8)) < size


# -- metric classes -----------------------------------------------------------------------------------------
LEVELS = [0.0, 0.25, 0.5, 1.0]


def loc_batches(seed):
    maps, masks, ignore = random_batch(seed, n=5)
    dm, dk, di = degenerate_batch()
    return [(maps[:2], masks[:2], ignore[:2]), (dm, dk, di), (maps[2:], masks[2:], None)]


def ppl_batches(seed, n=(3, 2, 4)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in n:
        ppl = torch.rand(k, len(LEVELS), generator=g, dtype=torch.float64) * 5 + 1
        out.append(ppl)
    out[1][0, 2] = math.nan
    return out


def pic_batches(seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in (3, 2, 4):
        ppl = torch.rand(k, len(LEVELS), generator=g, dtype=torch.float64) * 5 + 1
        ppl[:, 0] += 6
        sizes = torch.rand(k, len(LEVELS), generator=g, dtype=torch.float64) * 100 + 10
        sizes[:, -1] += 200
        out.append((ppl, sizes))
    out[1][0][0, 0] = 0.1  # undefined sample
    return out


def filler_batches(seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ([3, 5], [1, 4, 2], [6]):
        w = [torch.rand(n, generator=g, dtype=torch.float64) for n in lengths]
        c = [torch.arange(n) % 2 == 0 for n in lengths]
        m = [torch.rand(n, generator=g, dtype=torch.float64) * 9 for n in lengths]
        out.append((w, c, m))
    return out


CASES = {
    "EnergyPointingGame": (metrics.EnergyPointingGame, lambda: {}, MF.energy_pointing_game, loc_batches),
    "BestThresholdIoU": (metrics.BestThresholdIoU, lambda: {"num_thresholds": 9}, None, loc_batches),
    "SoftIoU": (metrics.SoftIoU, lambda: {}, MF.soft_iou, loc_batches),
    "MaskSNR": (metrics.MaskSNR, lambda: {}, MF.mask_snr, loc_batches),
    "MaskMSE": (metrics.MaskMSE, lambda: {}, MF.mask_mse, loc_batches),
    "FillerSNR": (metrics.FillerSNR, lambda: {}, MF.filler_snr, filler_batches),
    "PerturbationAUC": (
        metrics.PerturbationAUC,
        lambda: {"levels": LEVELS},
        lambda nppl: MF.perturbation_auc(nppl, LEVELS),
        ppl_batches,
    ),
    "NegativePerturbationAUC": (
        metrics.NegativePerturbationAUC,
        lambda: {"levels": LEVELS},
        lambda nppl: MF.perturbation_auc(nppl, LEVELS),
        ppl_batches,
    ),
    "DeletionAUC": (
        metrics.DeletionAUC,
        lambda: {"levels": LEVELS},
        lambda ppl: MF.deletion_auc(ppl, LEVELS),
        ppl_batches,
    ),
    "InsertionAUC": (
        metrics.InsertionAUC,
        lambda: {"levels": LEVELS},
        lambda ppl: MF.insertion_auc(ppl, LEVELS),
        ppl_batches,
    ),
    "PICAUC": (metrics.PICAUC, lambda: {"levels": LEVELS}, MF.pic_auc, pic_batches),
}


def functional_values(name, batches):
    cls, kwargs, fn, _ = CASES[name]
    if fn is None:
        fn = lambda *a: MF.best_threshold_iou(*a, num_thresholds=9)  # noqa: E731
    return torch.cat([fn(*(b if isinstance(b, tuple) else (b,))) for b in batches]).double()


def feed(metric, batches):
    for b in batches:
        metric.update(*(b if isinstance(b, tuple) else (b,)))
    return metric


def expected_mean(values):
    ok = values.isfinite()
    return values[ok].sum() / ok.sum()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_class_equals_functional_over_several_updates(name):
    cls, kwargs, _, make = CASES[name]
    batches = make(10)
    values = functional_values(name, batches)
    metric = feed(cls(**kwargs()), batches)
    assert metric.full_state_update is False and metric.higher_is_better is not None
    assert metric.plot_lower_bound == (None if name == "FillerSNR" else 0.0)  # decibels take either sign
    close(metric.compute(), expected_mean(values))
    close(metric.per_sample(), values)
    assert int(metric.skipped) == metric.num_skipped == int(values.isnan().sum())
    metric.reset()
    assert metric.per_sample().numel() == 0 and metric.compute().isnan()


def test_skips_are_counted_never_averaged():
    metric = metrics.EnergyPointingGame()
    metric.update(torch.zeros(2, 3, 3), torch.ones(2, 3, 3, dtype=torch.bool))
    assert metric.compute().isnan() and metric.num_skipped == 2
    metric.update(torch.ones(1, 3, 3), torch.ones(1, 3, 3, dtype=torch.bool))
    assert float(metric.compute()) == 1.0 and metric.num_skipped == 2 and int(metric.count) == 1


def rank_tensors(metric):
    """The tensors ``Metric._sync_dist`` gathers from one rank, in gather order."""
    out = []
    for attr, fx in metric._reductions.items():
        value = getattr(metric, attr)
        if isinstance(value, list):
            if fx is dim_zero_cat and len(value) > 1:
                value = [dim_zero_cat(value)]
            out += value or [torch.tensor([], dtype=metric.dtype)]
        else:
            out.append(value)
    return out


def two_rank(cls, kwargs, other):
    """A metric on "rank 0" whose sync gathers ``other``'s states as rank 1 (a simulated 2-process run)."""
    holder = {}

    def gather(tensor, group=None):
        return [tensor, next(holder["it"])]

    metric = cls(**kwargs, dist_sync_fn=gather, distributed_available_fn=lambda: True)

    def prime():
        holder["it"] = iter(rank_tensors(other))

    return metric, prime


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_process_reduction_equals_one_process(name):
    cls, kwargs, _, make = CASES[name]
    batches = make(11)
    single = feed(cls(**kwargs()), batches)
    # merge_state
    first, second = feed(cls(**kwargs()), batches[:2]), feed(cls(**kwargs()), batches[2:])
    first.merge_state(second)
    close(first.compute(), single.compute())
    assert int(first.skipped) == int(single.skipped)
    # a simulated DDP sync (torchmetrics' own reduction code, gather replaced by the other rank's states)
    rank1 = feed(cls(**kwargs()), batches[2:])
    rank0, prime = two_rank(cls, kwargs(), rank1)
    feed(rank0, batches[:2])
    prime()
    close(rank0.compute(), single.compute(), tol=1e-14)
    prime()
    close(rank0.per_sample(), single.per_sample())
    prime()
    assert rank0.num_skipped == single.num_skipped
    if hasattr(single, "mean_curve"):
        prime()
        for a, b in zip(rank0.mean_curve(), single.mean_curve(), strict=True):
            close(a, b)
    # a rank that saw no sample contributes nothing
    empty = cls(**kwargs())
    lonely, prime = two_rank(cls, kwargs(), empty)
    feed(lonely, batches)
    prime()
    close(lonely.compute(), single.compute())
    prime()
    close(lonely.per_sample(), single.per_sample())


def test_perturbation_mean_curve_and_bounds():
    batches = ppl_batches(12)
    metric = feed(metrics.PerturbationAUC(levels=LEVELS), batches)
    rows = torch.cat(batches)
    ok = rows.isfinite().all(1)
    levels, curve = metric.mean_curve()
    close(levels, LEVELS)
    close(curve, rows[ok].mean(0))
    assert metrics.NegativePerturbationAUC().higher_is_better is False
    assert metrics.InsertionAUC().higher_is_better is False and metrics.MaskMSE().higher_is_better is False
    assert metrics.PICAUC.plot_upper_bound == 1.0 and metrics.SoftIoU.plot_upper_bound == 1.0
    pic = feed(metrics.PICAUC(levels=LEVELS), pic_batches(13))
    _, x, y = pic.mean_curve()
    xs, ys = zip(*(MF.pic_curve(p, s) for p, s in pic_batches(13)), strict=True)
    xs, ys = torch.cat(xs), torch.cat(ys)
    ok = xs.isfinite().all(1)
    close(x, xs[ok].mean(0))
    close(y, ys[ok].mean(0))
    with pytest.raises(ValueError, match="PIC levels"):
        metrics.PICAUC(levels=[0.1, 1.0])


# -- the model's view: seen pixels only, the unseen mask reported --------------------------------------
def test_unseen_mask_fraction_hand_cases():
    masks = t([[T, T, F_], [T, F_, F_]], torch.bool)
    seen = t([[F_, T, T], [T, T, T]], torch.bool)
    close(MF.unseen_mask_fraction(masks, seen), [1 / 3])
    close(MF.unseen_mask_fraction(masks, seen, ignore=t([[F_, F_, F_], [T, F_, F_]], torch.bool)), [1 / 2])
    close(MF.unseen_mask_fraction(masks, None), [0.0])
    assert MF.unseen_mask_fraction(torch.zeros(1, 2, 3, dtype=torch.bool), seen).isnan().all()


@pytest.mark.parametrize(
    "cls", [metrics.EnergyPointingGame, metrics.BestThresholdIoU, metrics.SoftIoU, metrics.MaskSNR, metrics.MaskMSE]
)
def test_localization_classes_score_seen_pixels_only(cls):
    """``seen`` acts as ``ignore`` of the unseen pixels, on top of the dataset's own ignore mask."""
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 6, 8, dtype=torch.float64, generator=gen)
    masks = torch.rand(4, 6, 8, generator=gen) > 0.6
    ignore = torch.rand(4, 6, 8, generator=gen) > 0.8
    seen = torch.zeros(4, 6, 8, dtype=torch.bool)
    seen[:, :, 2:6] = True
    maps = maps * seen  # placed maps are zero where the model saw nothing
    with_seen, with_ignore, everything = cls(), cls(), cls()
    with_seen.update(maps, masks, ignore, seen=seen)
    with_ignore.update(maps, masks, ignore | ~seen)
    everything.update(maps, masks, ignore)
    close(with_seen.per_sample(), with_ignore.per_sample())
    same = torch.allclose(with_seen.per_sample(), everything.per_sample(), equal_nan=True)
    assert same == (cls is metrics.EnergyPointingGame)  # EPG: a zero map outside adds no energy anyway


def test_unseen_mask_fraction_metric_ignores_the_maps():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :, :2] = True
    masks[1, 1:3, 1:3] = True
    seen = torch.zeros(2, 4, 4, dtype=torch.bool)
    seen[:, :, 1:] = True
    metric = metrics.UnseenMaskFraction()
    metric.update(torch.rand(2, 4, 4), masks, seen=seen)
    close(metric.per_sample(), [0.5, 0.0])
    assert metric.input_kind == "localization" and metric.reports_unseen_mask


@pytest.mark.parametrize("cls", [metrics.DeletionAUC, metrics.InsertionAUC])
def test_end_normalized_aucs_lie_in_unit_interval_and_match_their_mean_curve(cls):
    """Any curve, monotone or not, gives an AUC in [0, 1]; the plotted mean curve's area is the mean AUC."""
    g = torch.Generator().manual_seed(14)
    levels = [i / 10 for i in range(11)]
    ppl = torch.exp(torch.randn(200, 11, generator=g, dtype=torch.float64) * 2)  # wild, non-monotone curves
    metric = cls(levels=levels)
    metric.update(ppl[:120])
    metric.update(ppl[120:])
    values = metric.per_sample()
    ok = values.isfinite()
    assert 50 < int(ok.sum()) < 150 and metric.num_skipped == int((~ok).sum())  # ends the wrong way round
    assert (values[ok] >= 0).all() and (values[ok] <= 1).all()
    assert float(values[ok].min()) < 0.3 and float(values[ok].max()) > 0.7
    grid, curve = metric.mean_curve()
    close(torch.trapezoid(curve, grid), metric.compute())
    ends = (0.0, 1.0) if cls is metrics.DeletionAUC else (1.0, 0.0)
    close(curve[[0, -1]], f64(ends))
    assert cls.plot_upper_bound == 1.0 and cls.higher_is_better is (cls is metrics.DeletionAUC)
    with pytest.raises(ValueError, match="start at 0 and end at 1"):
        cls(levels=[0.0, 0.5, 0.9])
