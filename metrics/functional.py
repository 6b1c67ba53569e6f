"""Pure tensor implementations of the evaluation metrics (batched over a leading sample dim).

Paper section 4 and appendix F. Shapes: maps ``(N, H, W)`` ≥ 0, masks ``(N, H, W)`` bool, optional
``ignore`` ``(N, H, W)`` bool (pixels excluded from every metric, e.g. VOC's boundary label 255); the
*valid* pixels of a sample are those not ignored. Every function returns ``(N,)`` values.

The model's view: pixels the model never saw (e.g. outside LLaVA-1.5's center crop) carry no map and
cannot be scored; :func:`outside_view` adds them to ``ignore`` (what the metric classes do with their
``seen`` argument) and :func:`unseen_mask_fraction` reports how much of each mask they hold.

Rule for degenerate inputs: a value is NaN exactly when the formula is undefined (0/0, or a mean over
an empty set: no valid pixel, no token of a kind, an all-zero map where a ratio needs energy, a curve
with non-finite values). Every other case gets the formula's value; each docstring lists its cases.
The metric classes count NaN samples as *skipped* and never average them in.

Min-max normalization (soft-IoU, MSE) is taken over a sample's valid pixels; a constant map (all
zero included) carries no localization and becomes all zeros, as :func:`dexar.methods.minmax` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dexar.perturbation import webp_size

__all__ = [
    "best_threshold_iou",
    "deletion_auc",
    "deletion_curve",
    "energy_pointing_game",
    "filler_snr",
    "insertion_auc",
    "insertion_curve",
    "mask_mse",
    "mask_snr",
    "normalize_between_ends",
    "normalized_perplexity",
    "perturbation_auc",
    "pic_auc",
    "pic_curve",
    "outside_view",
    "soft_iou",
    "unseen_mask_fraction",
    "webp_size",
]

DEFAULT_SNR_EPS = 1e-3
DEFAULT_FILLER_EPS = float(torch.finfo(torch.float64).eps)  # see filler_snr


# -- helpers ------------------------------------------------------------------------------------------
def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _as_bool(x: torch.Tensor, name: str) -> torch.Tensor:
    """A boolean copy of a bool tensor or a numeric tensor of zeros and ones."""
    if x.dtype != torch.bool and not ((x == 0) | (x == 1)).all():
        raise ValueError(f"{name} must be boolean (or hold only 0 and 1)")
    return x.bool()


def _valid_pixels(
    maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and values; return ``(masks ∧ valid, valid)`` as bool ``(N, H, W)``."""
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be (N, H, W)")
    if not torch.isfinite(maps).all():
        raise ValueError("maps hold NaN or infinite values")
    if (maps < 0).any():
        raise ValueError("maps must be non-negative")
    valid = torch.ones_like(masks, dtype=torch.bool) if ignore is None else ~_as_bool(ignore, "ignore")
    if valid.shape != maps.shape:
        raise ValueError(f"ignore {tuple(valid.shape)} must have the shape of maps {tuple(maps.shape)}")
    return _as_bool(masks, "masks") & valid, valid


def _valid_minmax(maps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Min-max normalize each map over its valid pixels (constant → zeros); invalid pixels → 0."""
    work = maps.to(_work_dtype(maps))
    lo = torch.where(valid, work, torch.inf).flatten(1).amin(1)[:, None, None]
    hi = torch.where(valid, work, -torch.inf).flatten(1).amax(1)[:, None, None]
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    norm = torch.where(ok, (work - lo) / torch.where(ok, span, 1.0), 0.0)
    return torch.where(valid, norm, 0.0)


def _nan_where(condition: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.where(condition, torch.nan, values)


# -- localization -------------------------------------------------------------------------------------
def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Energy Pointing Game: the share of a map's energy inside the mask, ``Σ(E⊙M) / ΣE``.

    Sums run over valid pixels. Cases: all-zero map (no energy) → NaN; empty mask → 0 (none of the
    energy points into it).

    Args:
        maps: ``(N, H, W)`` non-negative maps.
        masks: ``(N, H, W)`` boolean masks.
        ignore: ``(N, H, W)`` pixels excluded from both sums.

    Returns:
        ``(N,)`` values in [0, 1]; NaN where a map has no energy (all zero) so callers can count
        and skip those samples explicitly instead of averaging them in.

    """
    masks, valid = _valid_pixels(maps, masks, ignore)
    energy = (maps * valid).flatten(1).sum(1)
    inside = (maps * masks).flatten(1).sum(1)
    return torch.where(energy > 0, inside / energy.clamp(min=torch.finfo(maps.dtype).tiny), torch.nan)


def best_threshold_iou(
    maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None = None, num_thresholds: int = 100
) -> torch.Tensor:
    """Best-threshold IoU: ``max_τ |{E ≥ τ} ∩ M| / |{E ≥ τ} ∪ M|`` over valid pixels.

    The thresholds are ``num_thresholds`` equally spaced values spanning each map's own range over its
    valid pixels, both ends included: ``τ_k = lerp(min E, max E, k / (K − 1))`` (``K = 1``: the minimum
    only). Exact and memory-light: pixels are sorted once, the counts come from a binary search.

    Cases: the lowest threshold selects every valid pixel, so the value is at least
    ``|M| / |valid|``; a constant (or all-zero) map gives exactly that; an empty mask → 0; no valid
    pixel → NaN.

    Returns:
        ``(N,)`` values in [0, 1].

    """
    if num_thresholds < 1:
        raise ValueError(f"num_thresholds must be >= 1, got {num_thresholds}")
    masks, valid = _valid_pixels(maps, masks, ignore)
    work = maps.to(_work_dtype(maps))
    # Invalid pixels sort first (value −1 < every τ ≥ 0) and are never selected nor in M.
    values = torch.where(valid, work, -1.0).flatten(1)
    sorted_values, order = torch.sort(values, dim=1)
    in_mask = masks.flatten(1).gather(1, order).to(work.dtype)
    n_valid = valid.flatten(1).sum(1)
    lo = torch.where(valid, work, torch.inf).flatten(1).amin(1)
    hi = torch.where(valid, work, -torch.inf).flatten(1).amax(1)
    fractions = torch.linspace(0.0, 1.0, num_thresholds, dtype=work.dtype, device=work.device)
    has_valid = n_valid > 0
    lo, hi = torch.where(has_valid, lo, 0.0), torch.where(has_valid, hi, 0.0)
    taus = torch.lerp(lo[:, None].expand(-1, num_thresholds), hi[:, None].expand(-1, num_thresholds), fractions)
    first = torch.searchsorted(sorted_values.contiguous(), taus.contiguous(), side="left")  # (N, K)
    total = values.shape[1]
    selected = (total - first).to(work.dtype)
    suffix = torch.cat([torch.zeros_like(in_mask[:, :1]), in_mask.cumsum(1)], dim=1)  # (N, P + 1)
    mask_total = suffix[:, -1:]
    inter = mask_total - suffix.gather(1, first)
    union = selected + mask_total - inter
    iou = inter / union.clamp(min=1.0)
    return _nan_where(~has_valid, iou.amax(1))


def soft_iou(maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Soft IoU: ``Σ(E⊙M) / Σ(E + M − E⊙M)`` over valid pixels, E min-max normalized to [0, 1].

    Cases: a map equal to its mask → 1; a constant or all-zero map normalizes to zeros → 0 (with a
    non-empty mask); empty mask → ``0 / ΣE`` = 0 unless E is also all zero (0/0) → NaN; no valid
    pixel → NaN.

    Returns:
        ``(N,)`` values in [0, 1].

    """
    masks, valid = _valid_pixels(maps, masks, ignore)
    e = _valid_minmax(maps, valid)
    m = masks.to(e.dtype)
    inter = (e * m).flatten(1).sum(1)
    denominator = (e + m - e * m).flatten(1).sum(1)
    return _nan_where(denominator <= 0, inter / denominator.clamp(min=torch.finfo(e.dtype).tiny))


def mask_snr(
    maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None = None, eps: float = DEFAULT_SNR_EPS
) -> torch.Tensor:
    """Mask signal-to-noise ratio: mean of E inside M over mean of E outside M (valid pixels).

    ``SNR = mean_{M}(E') / max(mean_{¬M}(E'), eps)`` with ``E' = E / max E``: the ratio is
    scale-invariant, so dividing by the peak only makes ``eps`` relative to it. A map that is zero
    outside the mask (a perfect map) would divide by zero; it scores ``mean_M(E') / eps``, at most
    ``1 / eps`` (1000 by default) instead of infinity.

    Cases: empty mask or a mask covering every valid pixel (a mean over an empty set) → NaN;
    all-zero map (0/0) → NaN; a constant non-zero map → 1.

    Returns:
        ``(N,)`` non-negative values.

    """
    masks, valid = _valid_pixels(maps, masks, ignore)
    work = maps.to(_work_dtype(maps))
    outside = valid & ~masks
    n_in, n_out = masks.flatten(1).sum(1), outside.flatten(1).sum(1)
    peak = torch.where(valid, work, 0.0).flatten(1).amax(1)
    e = work / torch.where(peak > 0, peak, 1.0)[:, None, None]
    mean_in = (e * masks).flatten(1).sum(1) / n_in.clamp(min=1)
    mean_out = (e * outside).flatten(1).sum(1) / n_out.clamp(min=1)
    snr = mean_in / mean_out.clamp(min=eps)
    return _nan_where((n_in == 0) | (n_out == 0) | (peak <= 0), snr)


def outside_view(ignore: torch.Tensor | None, seen: torch.Tensor | None) -> torch.Tensor | None:
    """``ignore ∪ ¬seen``: the pixels a localization metric must not score (``None`` when neither is given)."""
    if seen is None:
        return ignore
    unseen = ~_as_bool(seen, "seen")
    return unseen if ignore is None else _as_bool(ignore, "ignore") | unseen


def unseen_mask_fraction(
    masks: torch.Tensor, seen: torch.Tensor | None, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Share of each mask the model never saw: ``|M ∧ ¬S| / |M|`` over the non-ignored pixels.

    The localization metrics score seen pixels only, so this is the part of the object they cannot
    credit or miss (LLaVA-1.5's center crop of a 2:1 image hides the outer quarters).

    Cases: ``seen=None`` (the whole image was seen) → 0; empty mask → NaN.

    Args:
        masks: ``(N, H, W)`` boolean masks.
        seen: ``(N, H, W)`` bool, the pixels the model saw.
        ignore: ``(N, H, W)`` pixels excluded from both counts.

    Returns:
        ``(N,)`` values in [0, 1].

    """
    masks = _as_bool(masks, "masks")
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got {tuple(masks.shape)}")
    if ignore is not None:
        masks = masks & ~_as_bool(ignore, "ignore")
    unseen = torch.zeros_like(masks) if seen is None else masks & ~_as_bool(seen, "seen")
    total = masks.flatten(1).sum(1)
    fraction = unseen.flatten(1).sum(1).double() / total.clamp(min=1)
    return _nan_where(total == 0, fraction)


def mask_mse(maps: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error to the mask: ``mean((E' − M)²)`` over valid pixels, E' min-max normalized.

    Normalizing puts E' on the mask's [0, 1] scale (method maps already are, up to upsampling).
    Cases: a constant or all-zero map → E' = 0, so the value is the mask's area fraction; empty mask →
    ``mean(E'²)``; no valid pixel → NaN.

    Returns:
        ``(N,)`` values in [0, 1].

    """
    masks, valid = _valid_pixels(maps, masks, ignore)
    e = _valid_minmax(maps, valid)
    squared = ((e - masks.to(e.dtype)) ** 2) * valid
    n_valid = valid.flatten(1).sum(1)
    return _nan_where(n_valid == 0, squared.flatten(1).sum(1) / n_valid.clamp(min=1))


# -- tokens -------------------------------------------------------------------------------------------
def _pad_tokens(
    token_weights: torch.Tensor | Sequence[torch.Tensor],
    content_mask: torch.Tensor | Sequence[torch.Tensor],
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N, T)`` weights, content flags and validity from lists of 1-D tensors or padded tensors."""
    if isinstance(token_weights, torch.Tensor):
        if token_weights.ndim != 2 or not isinstance(content_mask, torch.Tensor):
            raise ValueError("padded token_weights must be (N, T) with an (N, T) content_mask")
        if content_mask.shape != token_weights.shape:
            raise ValueError(f"content_mask {tuple(content_mask.shape)} != token_weights {tuple(token_weights.shape)}")
        keep = torch.ones_like(token_weights, dtype=torch.bool) if valid is None else _as_bool(valid, "valid")
        if keep.shape != token_weights.shape:
            raise ValueError(f"valid {tuple(keep.shape)} != token_weights {tuple(token_weights.shape)}")
        return token_weights, _as_bool(content_mask, "content_mask"), keep
    if valid is not None:
        raise ValueError("valid is only for padded tensors; lists already have one length per sample")
    weights, contents = list(token_weights), list(content_mask)
    if len(weights) != len(contents):
        raise ValueError(f"{len(weights)} token_weights but {len(contents)} content masks")
    for w, c in zip(weights, contents, strict=True):
        if w.ndim != 1 or c.shape != w.shape:
            raise ValueError(
                f"each sample needs 1-D weights and a content mask of the same length, got {w.shape}, {c.shape}"
            )
    n, t = len(weights), max((w.numel() for w in weights), default=0)
    dtype = weights[0].dtype if weights else torch.float32
    padded_w = torch.zeros(n, t, dtype=dtype)
    padded_c = torch.zeros(n, t, dtype=torch.bool)
    keep = torch.zeros(n, t, dtype=torch.bool)
    for i, (w, c) in enumerate(zip(weights, contents, strict=True)):
        padded_w[i, : w.numel()] = w.detach().cpu()
        padded_c[i, : w.numel()] = _as_bool(c, "content_mask").cpu()
        keep[i, : w.numel()] = True
    return padded_w, padded_c, keep


def _token_shares(
    token_weights: torch.Tensor | Sequence[torch.Tensor], map_mass: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor | list[torch.Tensor]:
    """``λ_t · mass(E_t)`` per token, in float64, in the layout of ``token_weights``."""
    if isinstance(token_weights, torch.Tensor):
        if not isinstance(map_mass, torch.Tensor) or map_mass.shape != token_weights.shape:
            shape = tuple(map_mass.shape) if isinstance(map_mass, torch.Tensor) else "a list"
            raise ValueError(f"map_mass {shape} must match token_weights {tuple(token_weights.shape)}")
        return token_weights.double() * map_mass.double()
    weights, masses = list(token_weights), list(map_mass)
    if len(weights) != len(masses):
        raise ValueError(f"{len(weights)} token_weights but {len(masses)} map masses")
    for w, m in zip(weights, masses, strict=True):
        if m.shape != w.shape:
            raise ValueError(f"each sample needs one map mass per token weight, got {tuple(m.shape)}, {tuple(w.shape)}")
    return [w.double() * m.double() for w, m in zip(weights, masses, strict=True)]


def filler_snr(
    token_weights: torch.Tensor | Sequence[torch.Tensor],
    content_mask: torch.Tensor | Sequence[torch.Tensor],
    map_mass: torch.Tensor | Sequence[torch.Tensor],
    valid: torch.Tensor | None = None,
    eps: float = DEFAULT_FILLER_EPS,
    decibels: bool = True,
) -> torch.Tensor:
    """Filler signal-to-noise ratio (paper section 4.4, table 4; appendix L, table 8), per sample.

    Each token's share of the sequence map as it enters eq. 6, ``E = MinMax(Σ_t λ_t E_t)``, is
    ``s_t = λ_t · Σ_pixels E_t`` with ``E_t`` the token's *min-max normalised* map (``map_mass``). After
    the min-max, not before: eq. 6 sums the normalised maps, so the raw gradient scale of a token never
    reaches the sequence map; ``s_t`` is exactly what the token adds to it. With the filler filter off
    (``λ_t = 1``) the SNR is the ratio of the normalised maps' masses, which depends on the head filter
    and is not 1 in general: the paper reports 9.16 and 16.84 with the filler filter off (table 4).

    ``SNR = 10 · log10(max(mean_content(s'), eps) / max(mean_filler(s'), eps))`` in decibels, with
    ``s' = s / max_t s`` (the ratio is scale-invariant; the peak only makes ``eps`` relative);
    ``decibels=False`` gives the plain ratio of the floored means.

    Why decibels (the reading that reproduces the paper's tables): table 8 prints negative SNRs
    (top-p rows, e.g. −16.82, −15.02), which no ratio of non-negative shares gives, while a logarithm
    gives them whenever filler tokens outweigh content ones; one metric, one reading for both tables.
    In dB, table 8's max + filler-filter row (62.72–153.53) brackets table 4's max + filler-filter
    cell (96.12), and its avg row (1.48–9.44) and last top-p row (−3.76–2.33) sit near table 4's
    unfiltered 9.16; keeping table 4 as plain ratios would put its 96.12 four to thirteen orders of
    magnitude below table 8's ratios for the same setting (10^6.3–10^15.4). Table 4's cells are then
    ratios of 8.2, 48, 8.5·10^8 and 4.1·10^9: the filler filter's ReLU sends most filler λ_t to
    exactly 0, and samples whose filler shares are all 0 score at the floor and lift the filtered
    means, as in table 8. The floor: a sample
    reaching 153.53 dB needs ``eps ≤ 10^-15.35 ≈ 4.5e-16`` of the peak share; the default, float64's
    machine epsilon 2.2e-16, caps a perfect filter at 156.5 dB, consistent with the paper's largest
    value (the paper does not state its floor). Samples are averaged in dB (mean of per-sample values).

    Cases: no content token or no filler token (mean over an empty set) → NaN; all shares zero (0/0)
    → NaN; equal shares → 0 dB (ratio 1); filler shares all zero → ``10·log10(mean_content(s') / eps)``;
    content shares all zero → ``10·log10(eps / mean_filler(s'))``.

    Args:
        token_weights: A list of ``(T_i,)`` λ per sample, or padded ``(N, T)``.
        content_mask: Matching ``(T_i,)`` / ``(N, T)`` bool: True for content tokens, False for filler.
        map_mass: Matching ``(T_i,)`` / ``(N, T)`` mass ``Σ_pixels E_t`` of each token's min-max map.
        valid: ``(N, T)`` bool of real (non-padding) tokens, for padded inputs only.
        eps: Floor of both means, relative to the peak share.
        decibels: Return ``10·log10`` of the ratio (default, the paper's scale) or the ratio itself.

    Returns:
        ``(N,)`` values (dB: any sign; ratio: non-negative).

    """
    shares, content, keep = _pad_tokens(_token_shares(token_weights, map_mass), content_mask, valid)
    if not torch.isfinite(shares[keep]).all() or (shares[keep] < 0).any():
        raise ValueError("token weights and map masses must be finite and non-negative")
    s = torch.where(keep, shares.double(), 0.0)
    is_content, is_filler = content & keep, ~content & keep
    n_content, n_filler = is_content.sum(1), is_filler.sum(1)
    peak = s.amax(1, keepdim=True) if s.shape[1] else torch.zeros(s.shape[0], 1, dtype=s.dtype)
    s = s / torch.where(peak > 0, peak, 1.0)
    mean_content = ((s * is_content).sum(1) / n_content.clamp(min=1)).clamp(min=eps)
    mean_filler = ((s * is_filler).sum(1) / n_filler.clamp(min=1)).clamp(min=eps)
    snr = mean_content / mean_filler
    if decibels:
        snr = 10 * torch.log10(snr)
    return _nan_where((n_content == 0) | (n_filler == 0) | (peak[:, 0] <= 0), snr)


# -- perturbation curves ----------------------------------------------------------------------------
def _curve_inputs(values: torch.Tensor, levels: torch.Tensor | Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, L)`` float values and ``(L,)`` strictly increasing levels."""
    values = values[None] if values.ndim == 1 else values
    if values.ndim != 2:
        raise ValueError(f"curves must be (L,) or (N, L), got {tuple(values.shape)}")
    values = values.to(_work_dtype(values))
    x = torch.as_tensor(levels, dtype=values.dtype, device=values.device)
    if x.ndim != 1 or x.numel() != values.shape[1] or x.numel() < 2:
        raise ValueError(f"need at least 2 levels, one per curve column; got {x.numel()} for {values.shape[1]}")
    if not (x[1:] > x[:-1]).all():
        raise ValueError(f"levels must be strictly increasing, got {x.tolist()}")
    return values, x


def normalized_perplexity(ppl: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``NPPL = PPL / PPL_reference`` per row; NaN rows where the reference is not finite and positive."""
    ppl = ppl[None] if ppl.ndim == 1 else ppl
    reference = torch.as_tensor(reference, dtype=ppl.dtype, device=ppl.device).reshape(-1, 1)
    ok = torch.isfinite(reference) & (reference > 0)
    return torch.where(ok, ppl / torch.where(ok, reference, 1.0), torch.nan)


def perturbation_auc(nppl: torch.Tensor, levels: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Area under the normalized-perplexity curve, trapezoidal in the levels (paper eq. for AUC).

    ``AUC = Σ_i (p_{i+1} − p_i) · (NPPL_i + NPPL_{i+1}) / 2`` over the given levels, not rescaled by
    their span (the paper's 0–0.9 grid gives AUC ≈ 0.9 for a flat curve at 1). Levels must be strictly
    increasing. Cases: a row with a non-finite value → NaN.

    Args:
        nppl: ``(N, L)`` or ``(L,)`` normalized perplexities ``PPL(x_p) / PPL(x_0)``.
        levels: ``(L,)`` perturbation fractions.

    Returns:
        ``(N,)`` AUCs.

    """
    values, x = _curve_inputs(nppl, levels)
    auc = torch.trapezoid(values, x, dim=1)
    return _nan_where(~torch.isfinite(values).all(1), auc)


def _end_columns(levels: torch.Tensor, name: str) -> None:
    """Check that a grid runs from level 0 to level 1: the two end images a curve is normalized between."""
    if float(levels[0]) != 0.0 or float(levels[-1]) != 1.0:
        raise ValueError(
            f"{name} levels must start at 0 and end at 1 (the curve is normalized between its two end images), "
            f"got {levels.tolist()}"
        )


def normalize_between_ends(ppl: torch.Tensor, ppl_original: torch.Tensor, ppl_perturbed: torch.Tensor) -> torch.Tensor:
    """``clip((PPL − PPL_original) / (PPL_perturbed − PPL_original), 0, 1)`` per row.

    0 is the original image's perplexity, 1 that of the fully perturbed image. A point beyond an end
    (a non-monotone curve: a partly perturbed image worse than the fully perturbed one, or better than
    the original) is clipped to that end, as PIC clips its gain (:func:`pic_curve`), so an AUC over a
    0–1 grid lies in [0, 1]. A row is NaN (undefined, skipped by the metric classes) unless every value
    is finite and ``PPL_perturbed > PPL_original``: with equal ends there is nothing to normalize, and
    when perturbing the whole image *lowers* the perplexity there is no deterioration (deletion) or
    recovery (insertion) for the curve to measure. The test uses no tolerance: near-equal ends give a
    noisy but bounded curve.

    Args:
        ppl: ``(N, L)`` perplexities.
        ppl_original: ``(N,)`` perplexity on the unperturbed image.
        ppl_perturbed: ``(N,)`` perplexity on the fully perturbed image.

    Returns:
        ``(N, L)`` values in [0, 1] (NaN rows where undefined).

    """
    start, end = ppl_original.reshape(-1, 1), ppl_perturbed.reshape(-1, 1)
    ok = (end > start) & torch.isfinite(ppl).all(1, keepdim=True) & torch.isfinite(start) & torch.isfinite(end)
    curve = ((ppl - start) / torch.where(ok, end - start, 1.0)).clamp(0.0, 1.0)
    return _nan_where(~ok, curve)


def deletion_curve(ppl: torch.Tensor, levels: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Deletion curve (appendix F.1), normalized between its ends: ``(PPL(x_p) − PPL(x)) / (PPL(x_1) − PPL(x))``.

    ``x`` is the original image (level 0) and ``x_1`` the image with every pixel replaced by the dataset
    mean (level 1), so the curve rises from 0 to 1; clipping and undefined rows as
    :func:`normalize_between_ends`. Levels must start at 0 and end at 1.

    Reading of "normalize the perplexities": the paper's table 6 puts Del. in 0.21–0.50 while the
    positive test (the same images divided by ``PPL(x)`` only) is 6–18, so the curve is normalized
    between its two end images. It is the paper's ratio ``PPL(x_p) / PPL(x)`` rescaled affinely so
    that its ends are 0 and 1, whichever of the two is divided first.
    """
    values, x = _curve_inputs(ppl, levels)
    _end_columns(x, "deletion")
    return normalize_between_ends(values, values[:, 0], values[:, -1])


def deletion_auc(ppl: torch.Tensor, levels: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Deletion AUC: trapezoidal AUC of :func:`deletion_curve` over the levels. Higher is better.

    A good map removes the pixels the answer needs first, so the perplexity approaches that of the
    all-mean image early and the area is large.

    Args:
        ppl: ``(N, L)`` or ``(L,)`` perplexities per level, level 0 the original, level 1 all mean.
        levels: ``(L,)`` strictly increasing fractions from 0 to 1.

    Returns:
        ``(N,)`` AUCs in [0, 1]; NaN where :func:`normalize_between_ends` is undefined.

    """
    return perturbation_auc(deletion_curve(ppl, levels), levels)


def insertion_curve(ppl: torch.Tensor, levels: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Insertion curve (appendix F.1), normalized between its ends: ``(PPL(x_p) − PPL(x)) / (PPL(x_0) − PPL(x))``.

    ``x_0`` is the fully blurred image (level 0) and ``x`` the original (level 1: every pixel revealed),
    so the curve falls from 1 to 0; clipping and undefined rows as :func:`normalize_between_ends`
    (the blurred image must have the higher perplexity). Levels must start at 0 and end at 1.
    """
    values, x = _curve_inputs(ppl, levels)
    _end_columns(x, "insertion")
    return normalize_between_ends(values, values[:, -1], values[:, 0])


def insertion_auc(ppl: torch.Tensor, levels: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Insertion AUC: trapezoidal AUC of :func:`insertion_curve` over the levels. Lower is better.

    A good map reveals the pixels the answer needs first, so the perplexity recovers early ("faster
    recovery", appendix F.1) and the area is small.

    Args:
        ppl: ``(N, L)`` or ``(L,)`` perplexities per level, level 0 fully blurred, level 1 the original.
        levels: ``(L,)`` strictly increasing fractions from 0 to 1.

    Returns:
        ``(N,)`` AUCs in [0, 1]; NaN where :func:`normalize_between_ends` is undefined.

    """
    return perturbation_auc(insertion_curve(ppl, levels), levels)


def pic_curve(ppl: torch.Tensor, sizes: torch.Tensor, monotone: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of the Perplexity Information Curve (appendix F.2), one per level.

    Column 0 must be the fully obscured (mean) image and the last column the original.
    ``x = clip((S(x_p) − S_0) / (S_1 − S_0), 0, 1)`` with S the lossless-WebP size and
    ``y = clip((PPL_0 − PPL(x_p)) / (PPL_0 − PPL_1), 0, 1)``, the normalized perplexity gain. As in the
    original PIC (Kapishnikov et al., 2021), ``monotone`` replaces y by its running maximum over the
    levels, and a sample is undefined (NaN row) unless ``S_1 > S_0`` and ``PPL_1 < PPL_0``
    (the original must carry more information and a lower perplexity than the obscured image).

    Returns:
        ``(x, y)``, each ``(N, L)``.

    """
    ppl = (ppl[None] if ppl.ndim == 1 else ppl).to(torch.float64)
    sizes = (sizes[None] if sizes.ndim == 1 else sizes).to(torch.float64)
    if ppl.ndim != 2 or ppl.shape != sizes.shape or ppl.shape[1] < 2:
        raise ValueError(f"ppl {tuple(ppl.shape)} and sizes {tuple(sizes.shape)} must be (N, L) with L >= 2")
    s0, s1, p0, p1 = sizes[:, :1], sizes[:, -1:], ppl[:, :1], ppl[:, -1:]
    ok = (s1 > s0) & (p1 < p0) & torch.isfinite(ppl).all(1, keepdim=True) & torch.isfinite(sizes).all(1, keepdim=True)
    x = ((sizes - s0) / torch.where(ok, s1 - s0, 1.0)).clamp(0.0, 1.0)
    y = ((p0 - ppl) / torch.where(ok, p0 - p1, 1.0)).clamp(0.0, 1.0)
    if monotone:
        y = y.cummax(1).values
    return _nan_where(~ok, x), _nan_where(~ok, y)


def pic_auc(ppl: torch.Tensor, sizes: torch.Tensor, monotone: bool = True) -> torch.Tensor:
    """PIC-AUC (appendix F.2): area under normalized perplexity gain vs normalized WebP size.

    The points of :func:`pic_curve` plus the end points (0, 0) and (1, 1) are sorted by x (stable, so
    ties keep level order; x need not grow with p since compressed size is not monotone) and
    integrated with the trapezoid rule on the piecewise-linear curve through them. Higher is better.
    Cases: undefined samples of :func:`pic_curve` → NaN.

    Args:
        ppl: ``(N, L)`` or ``(L,)`` perplexities; column 0 fully obscured, last column original.
        sizes: Matching lossless-WebP sizes (:func:`webp_size`).
        monotone: Use the running maximum of y over the levels.

    Returns:
        ``(N,)`` AUCs in [0, 1].

    """
    x, y = pic_curve(ppl, sizes, monotone)
    zeros, ones = torch.zeros_like(x[:, :1]), torch.ones_like(x[:, :1])
    x, y = torch.cat([zeros, x, ones], 1), torch.cat([zeros, y, ones], 1)
    order = torch.sort(torch.nan_to_num(x), dim=1, stable=True).indices
    auc = torch.trapezoid(y.gather(1, order), x.gather(1, order), dim=1)
    return _nan_where(~torch.isfinite(x).all(1), auc)
