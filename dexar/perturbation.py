"""Batched perturbation of ``pixel_values`` by an explanation map, and answer-perplexity scoring.

Paper section 4 and appendix F. For one sample, every perturbed image of every requested mode is built
in the processor's normalized ``pixel_values`` space and scored in as few forwards as ``max_batch``
allows (one prompt repeated for every image, inference mode, the model's own SDPA attention).

Modes (``p`` = a level, the fraction of pixels; ``k = round(p·H·W)`` pixels, Python rounding):

* ``positive`` / ``deletion``: the top-k pixels of the map are replaced by the replacement value.
* ``negative``: the bottom-k pixels are replaced.
* ``insertion``: the top-k pixels of the original are revealed over a Gaussian-blurred image.
* ``pic``: the top-k pixels are revealed over the mean image (every pixel = the replacement value).

Choices the paper leaves open:

* Pixel order (:func:`rank_pixels`): the map is quantized at its own resolution to
  ``rank_levels`` = 256 levels (:func:`quantize_map`: min-max normalized, ``round(x · 255)``, the
  map as an 8-bit image), upsampled bilinearly (``align_corners=False``, float64) to the resolution of
  ``pixel_values``, and sorted descending, stably: ties go to the lower row-major pixel index. The
  bottom-k pixels are the last k of that same order, so ``negative`` at level p replaces exactly the
  complement of what ``positive`` replaces at level 1 − p.
  Why quantize: explaining a sample in a batch with others pads its prompt, which moves a map by float
  noise (≤ 5e-7 on the bundled Shapes model) and used to reorder the near-ties of its float32 upsample;
  a metric then depended on the batch size and the number of processes (up to 0.12 in one sample's
  AUC). Ranked this way, the order is a deterministic function of the quantized map: a 1-ulp change
  moves it only if a token crosses a level boundary (probability ≈ noise × 255 per token). Measured
  on 100 Shapes samples × 2 methods × 4 batchings (1 vs 4, 16, and the batches of 2 and 3 processes):
  samples with any different perturbed image — float32 upsample 83/800, float64 upsample 0/800,
  quantized low-res map 0/800 at 2^8 to 2^16 levels and 4/192 at 2^20, quantized *upsampled* map 2/800
  at 2^10 and 2^12 (4096 pixels to cross boundaries instead of 64 tokens). 256 levels keep the
  boundaries as sparse as an 8-bit heatmap's; ``rank_levels=None`` ranks the unquantized map.
* Replacement value: the dataset mean, which is 0 after the processor's mean/std normalization
  (``replacement=0.0``); a datamodule with another mean passes its own (scalar or per channel, in
  ``pixel_values`` space; :func:`replacement_value` converts an RGB mean in [0, 1]).
* Insertion blur: the σ of appendix F.1 is lost in the paper's text; the default is σ = 5 pixels
  (the σ of RISE's reference insertion code) on the ``pixel_values`` grid, a separable kernel
  truncated at 3σ, replicate padding. ``blur_sigma`` changes it.
* Level grids: ``positive``/``negative`` default to the paper's 0, 0.1, …, 0.9; ``deletion``,
  ``insertion`` and ``pic`` to 0, 0.1, …, 1.0, and their grids must start at 0 and end at 1: their
  metrics normalize each curve between the original image and the fully perturbed one.
* Identical images are scored once: level 0 of the removal modes and level 1 of the reveal modes are
  the original image; ``pic`` at p equals ``negative`` at 1 − p; ``deletion`` equals ``positive``.
"""

from __future__ import annotations

import inspect
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dexar.adapters.base import VLMAdapter
from dexar.explanation import Explanation

MODES = ("positive", "negative", "deletion", "insertion", "pic")
REMOVAL_LEVELS: tuple[float, ...] = tuple(i / 10 for i in range(10))
"""Paper grid of the positive/negative perturbation test: 0, 0.1, …, 0.9."""
FULL_LEVELS: tuple[float, ...] = tuple(i / 10 for i in range(11))
"""0, 0.1, …, 1.0: default grid of deletion, insertion and PIC."""
DEFAULT_LEVELS: dict[str, tuple[float, ...]] = {
    "positive": REMOVAL_LEVELS,
    "negative": REMOVAL_LEVELS,
    "deletion": FULL_LEVELS,
    "insertion": FULL_LEVELS,
    "pic": FULL_LEVELS,
}
DEFAULT_BLUR_SIGMA = 5.0
DEFAULT_MAX_BATCH = 16
RANK_LEVELS = 256
"""Quantization levels of a map before it is ranked (:func:`rank_pixels`)."""

# How each mode builds its image: (fill, which pixels are replaced by the fill, as a function of k).
_FILL = {"positive": "mean", "deletion": "mean", "negative": "mean", "insertion": "blur", "pic": "mean"}
_REVEAL = {"insertion", "pic"}
# Modes whose curves are normalized between their two end images, so both must be on the grid.
_ENDS = {
    "deletion": "the original and the all-mean image",
    "insertion": "the fully blurred image and the original",
    "pic": "the fully obscured image and the original",
}

ImageKey = tuple[Any, ...]


# -- building perturbed images ------------------------------------------------------------------
def _as_chw(pixel_values: torch.Tensor) -> torch.Tensor:
    """``(C, H, W)`` view of ``(C, H, W)`` or ``(1, C, H, W)`` pixel values."""
    if pixel_values.ndim == 4 and pixel_values.shape[0] == 1:
        pixel_values = pixel_values[0]
    if pixel_values.ndim != 3:
        raise ValueError(f"pixel_values must be (C, H, W) or (1, C, H, W), got {tuple(pixel_values.shape)}")
    return pixel_values


def upsample_map(heatmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample an ``(h, w)`` map to ``size = (H, W)`` (``align_corners=False``), in float64."""
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be (h, w), got {tuple(heatmap.shape)}")
    work = heatmap.detach().to(torch.float64)
    if tuple(work.shape) == tuple(size):
        return work
    return F.interpolate(work[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def quantize_map(heatmap: torch.Tensor, levels: int = RANK_LEVELS) -> torch.Tensor:
    """A map's level in ``0 … levels − 1``: ``round((E − min E) / (max E − min E) · (levels − 1))``, float64.

    Rounding is half to even; a constant map is all level 0. Quantizing makes a pixel order robust to
    float noise (see the module docstring).

    Raises:
        ValueError: The map holds NaN or infinite values, or ``levels < 2``.
    """
    if levels < 2:
        raise ValueError(f"rank_levels must be at least 2 (or None), got {levels}")
    work = heatmap.detach().to(torch.float64)
    if not torch.isfinite(work).all():
        raise ValueError("the heatmap holds NaN or infinite values")
    if work.numel() == 0:
        return work
    lo, span = work.min(), work.max() - work.min()
    if span <= 0:
        return torch.zeros_like(work)
    return torch.round((work - lo) / span * (levels - 1))


def pixel_order(heatmap: torch.Tensor) -> torch.Tensor:
    """Row-major pixel indices from most to least important; ties: lower index first (stable sort)."""
    flat = heatmap.reshape(-1)
    if not torch.isfinite(flat).all():
        raise ValueError("the heatmap holds NaN or infinite values")
    return torch.sort(flat, descending=True, stable=True).indices


def rank_pixels(heatmap: torch.Tensor, size: tuple[int, int], levels: int | None = RANK_LEVELS) -> torch.Tensor:
    """The perturbation order of the ``size = (H, W)`` pixels: quantize the map, upsample it, sort it.

    Args:
        heatmap: ``(h, w)`` map at its own resolution (e.g. the token grid).
        size: Resolution of the perturbed image.
        levels: Quantization levels (:func:`quantize_map`); ``None`` ranks the unquantized map.

    Returns:
        ``(H·W,)`` row-major pixel indices, most important first (:func:`pixel_order`).
    """
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be (h, w), got {tuple(heatmap.shape)}")
    return pixel_order(upsample_map(heatmap if levels is None else quantize_map(heatmap, levels), size))


def level_counts(levels: Sequence[float], num_pixels: int) -> list[int]:
    """Pixels per level: ``round(p · num_pixels)`` (Python rounding), levels in [0, 1]."""
    if any(not 0.0 <= float(p) <= 1.0 for p in levels):
        raise ValueError(f"levels must lie in [0, 1], got {list(levels)}")
    return [round(float(p) * num_pixels) for p in levels]


def gaussian_blur(pixel_values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(..., H, W)`` images (kernel truncated at 3σ, replicate padding).

    ``sigma <= 0`` returns the input unchanged.
    """
    if sigma <= 0:
        return pixel_values
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(pixel_values.dtype).to(pixel_values.device)
    shape = pixel_values.shape
    flat = pixel_values.reshape(-1, 1, *shape[-2:])
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(shape)


def replacement_value(
    mean_rgb: Sequence[float], image_mean: Sequence[float], image_std: Sequence[float]
) -> torch.Tensor:
    """A dataset's RGB mean in [0, 1] expressed in normalized ``pixel_values`` space, per channel."""
    mean, im, sd = (torch.as_tensor(v, dtype=torch.float64) for v in (mean_rgb, image_mean, image_std))
    return (mean - im) / sd


def _fill_image(pixel_values: torch.Tensor, replacement: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """The mean image: every pixel set to the (scalar or per-channel) replacement value."""
    value = torch.as_tensor(replacement, dtype=pixel_values.dtype, device=pixel_values.device)
    if value.ndim == 0:
        return torch.full_like(pixel_values, float(value))
    if value.shape != (pixel_values.shape[0],):
        raise ValueError(f"replacement must be a scalar or one value per channel, got {tuple(value.shape)}")
    return value[:, None, None].expand_as(pixel_values).clone()


def _image_key(mode: str, count: int, num_pixels: int) -> ImageKey:
    """Canonical description of a perturbed image, so that identical images are scored once."""
    fill = _FILL[mode]
    if mode in _REVEAL:
        side, replaced = "bottom", num_pixels - count
    else:
        side, replaced = ("bottom" if mode == "negative" else "top"), count
    if replaced == 0:
        return ("original",)
    if replaced == num_pixels:
        return (fill, "all")
    return (fill, side, replaced)


def _build_image(
    key: ImageKey, original: torch.Tensor, fills: dict[str, torch.Tensor], order: torch.Tensor
) -> torch.Tensor:
    """The ``(C, H, W)`` image described by ``key``."""
    if key[0] == "original":
        return original
    fill = fills[key[0]]
    if key[1] == "all":
        return fill
    _, side, replaced = key
    n = order.numel()
    pixels = order[:replaced] if side == "top" else order[n - replaced :]
    mask = torch.zeros(n, dtype=torch.bool, device=original.device)
    mask[pixels] = True
    return torch.where(mask.view(1, *original.shape[-2:]), fill, original)


def perturb(
    pixel_values: torch.Tensor,
    heatmap: torch.Tensor,
    levels: Sequence[float],
    mode: str = "positive",
    replacement: float | Sequence[float] | torch.Tensor = 0.0,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    rank_levels: int | None = RANK_LEVELS,
) -> torch.Tensor:
    """Every perturbed image of one mode: ``(L, C, H, W)``, one per level (see the module docstring)."""
    original = _as_chw(pixel_values)
    order = rank_pixels(heatmap.to(original.device), tuple(original.shape[-2:]), rank_levels)
    fills = _fills(original, [mode], replacement, blur_sigma)
    keys = [_image_key(mode, k, order.numel()) for k in level_counts(levels, order.numel())]
    return torch.stack([_build_image(key, original, fills, order) for key in keys])


def _fills(
    original: torch.Tensor, modes: Sequence[str], replacement: float | Sequence[float] | torch.Tensor, sigma: float
) -> dict[str, torch.Tensor]:
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown perturbation mode {mode!r}; choose from {MODES}")
    fills = {"mean": _fill_image(original, replacement)}
    if "insertion" in modes:
        fills["blur"] = gaussian_blur(original, sigma)
    return fills


# -- scoring --------------------------------------------------------------------------------------
def _answer_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_answer: int) -> torch.Tensor:
    """``(B, T, V)`` logits that predict the T answer tokens (the last T + 1 positions but one)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(**inputs, use_cache=False, logits_to_keep=num_answer + 1).logits
        return logits[:, :num_answer]
    logits = model(**inputs, use_cache=False).logits
    n = logits.shape[1]
    return logits[:, n - num_answer - 1 : n - 1]


def answer_perplexity(
    adapter: VLMAdapter,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    pixel_values: torch.Tensor,
    max_batch: int | None = DEFAULT_MAX_BATCH,
) -> torch.Tensor:
    """Perplexity of one answer for a batch of images, ``PPL = exp(−mean_i log P(y_i | x, y_<i))``.

    Args:
        adapter: Adapter of the model.
        prompt_ids: Prompt token ids (with the image placeholders), shared by every image.
        answer_ids: Answer token ids (at least one).
        pixel_values: ``(B, C, H, W)`` images in the processor's space.
        max_batch: Images per forward; ``None`` scores all of them in one forward.

    Returns:
        ``(B,)`` float64 perplexities on the CPU. Log-probabilities are taken in at least float32.

    """
    if not answer_ids:
        raise ValueError("the answer must hold at least one token to have a perplexity")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be positive or None, got {max_batch}")
    out = []
    with torch.inference_mode():
        for chunk in pixel_values.split(max_batch or pixel_values.shape[0]):
            b = chunk.shape[0]
            out.append(rows_perplexity(adapter, [list(prompt_ids)] * b, [list(answer_ids)] * b, chunk))
    return torch.cat(out)


def rows_perplexity(
    adapter: VLMAdapter, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], images: torch.Tensor
) -> torch.Tensor:
    """``(B,)`` float64 CPU perplexities of one forward: row ``b`` scores ``answers[b]`` after ``prompts[b]``.

    Every row's prompt and answer must have the lengths of row 0's (no padding: a row is computed as
    if it were alone, whatever the family's padding side).
    """
    if len({(len(p), len(a)) for p, a in zip(prompts, answers, strict=True)}) != 1:
        raise ValueError("rows scored in one forward need prompts and answers of equal lengths")
    model = adapter.model
    param = next(model.parameters())
    targets = torch.tensor([list(a) for a in answers], device=param.device)
    batch = adapter.build_batch([list(p) for p in prompts], [list(a) for a in answers], {"pixel_values": images})
    inputs = {
        k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
        for k, v in batch.inputs.items()
    }
    logits = _answer_logits(model, inputs, targets.shape[1])
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    token_logp = logp.gather(-1, targets[..., None])[..., 0]
    return torch.exp(-token_logp.double().mean(-1)).cpu()


# -- WebP sizes (PIC) ---------------------------------------------------------------------------------
def to_uint8(pixel_values: torch.Tensor, processor: Any) -> np.ndarray:
    """De-normalize ``(C, H, W)`` pixel values with the processor's mean/std to an ``(H, W, C)`` uint8 array.

    Inverts ``normalize`` (``x·std + mean``) and ``rescale`` (``/ rescale_factor``, 1/255 for CLIP),
    then rounds and clips to 0–255.
    """
    ip = getattr(processor, "image_processor", processor)
    x = _as_chw(pixel_values).detach().double().cpu()
    if getattr(ip, "do_normalize", True):
        mean = torch.as_tensor(ip.image_mean, dtype=torch.float64)[:, None, None]
        std = torch.as_tensor(ip.image_std, dtype=torch.float64)[:, None, None]
        x = x * std + mean
    if getattr(ip, "do_rescale", True):
        x = x / float(getattr(ip, "rescale_factor", 1 / 255))
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def webp_size(image_uint8: np.ndarray | torch.Tensor | Image.Image) -> int:
    """Bytes of an image encoded as lossless WebP with Pillow (``quality=100``, ``method=4``).

    Args:
        image_uint8: ``(H, W, C)`` or ``(H, W)`` uint8 array/tensor, or a PIL image.

    """
    if not isinstance(image_uint8, Image.Image):
        array = image_uint8.cpu().numpy() if isinstance(image_uint8, torch.Tensor) else np.asarray(image_uint8)
        if array.dtype != np.uint8:
            raise ValueError(f"webp_size needs a uint8 image, got {array.dtype}")
        image_uint8 = Image.fromarray(array)
    buffer = io.BytesIO()
    image_uint8.save(buffer, format="WEBP", lossless=True, quality=100, method=4)
    return buffer.tell()


# -- curves ---------------------------------------------------------------------------------------
@dataclass
class PerturbationCurve:
    """Answer perplexity along one mode's levels for one sample.

    Attributes:
        mode: Perturbation mode.
        levels: ``(L,)`` levels (fractions of pixels).
        ppl: ``(L,)`` float64 perplexity at each level.
        ppl_original: Perplexity on the unperturbed image.
        webp_sizes: ``(L,)`` lossless-WebP bytes of each perturbed image (``pic`` only).

    """

    mode: str
    levels: torch.Tensor
    ppl: torch.Tensor
    ppl_original: float
    webp_sizes: torch.Tensor | None = None

    @property
    def nppl(self) -> torch.Tensor:
        """Normalized perplexity ``NPPL(p) = PPL(x_p) / PPL(x_original)``."""
        return self.ppl / self.ppl_original


def _levels_by_mode(
    modes: Sequence[str], levels: Sequence[float] | Mapping[str, Sequence[float]] | None
) -> dict[str, list[float]]:
    out = {}
    for mode in modes:
        if levels is None:
            chosen = DEFAULT_LEVELS[mode]
        elif isinstance(levels, Mapping):
            chosen = levels.get(mode, DEFAULT_LEVELS[mode])
        else:
            chosen = levels
        out[mode] = [float(p) for p in chosen]
        if not out[mode]:
            raise ValueError(f"mode {mode!r} has no levels")
        if mode in _ENDS and (out[mode][0] != 0.0 or out[mode][-1] != 1.0):
            raise ValueError(f"{mode} levels must start at 0 and end at 1 ({_ENDS[mode]}), got {out[mode]}")
    return out


def perturbation_curves(
    adapter: VLMAdapter,
    pixel_values: torch.Tensor,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    heatmap: torch.Tensor,
    modes: Sequence[str] = ("positive", "negative"),
    levels: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    max_batch: int | None = DEFAULT_MAX_BATCH,
    replacement: float | Sequence[float] | torch.Tensor = 0.0,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    rank_levels: int | None = RANK_LEVELS,
) -> dict[str, PerturbationCurve]:
    """Perplexity curves of one sample for several modes, every distinct image scored once, batched.

    Args:
        adapter: Adapter of the model (its processor gives the de-normalization for WebP sizes).
        pixel_values: ``(C, H, W)`` or ``(1, C, H, W)`` processor output of the sample.
        prompt_ids: Prompt token ids (template and image placeholders included).
        answer_ids: Ground-truth answer token ids.
        heatmap: ``(h, w)`` explanation map (any size; upsampled to ``(H, W)``).
        modes: Any of :data:`MODES`.
        levels: One grid for every mode, a grid per mode, or ``None`` for :data:`DEFAULT_LEVELS`.
        max_batch: Images per forward (``None``: all images in one forward).
        replacement: Dataset mean in ``pixel_values`` space (scalar or per channel).
        blur_sigma: σ in pixels of the insertion blur.
        rank_levels: Quantization levels of the map before ranking (:func:`rank_pixels`).

    Returns:
        One :class:`PerturbationCurve` per mode.

    """
    original = _as_chw(pixel_values)
    grids = _levels_by_mode(modes, levels)
    order = rank_pixels(heatmap.to(original.device), tuple(original.shape[-2:]), rank_levels)
    fills = _fills(original, modes, replacement, blur_sigma)
    n = order.numel()
    keys_by_mode = {m: [_image_key(m, k, n) for k in level_counts(grids[m], n)] for m in modes}
    unique: dict[ImageKey, int] = {("original",): 0}
    for keys in keys_by_mode.values():
        for key in keys:
            unique.setdefault(key, len(unique))
    images = torch.stack([_build_image(key, original, fills, order) for key in unique])
    ppl = answer_perplexity(adapter, prompt_ids, answer_ids, images, max_batch)
    sizes = _webp_sizes(images, unique, keys_by_mode.get("pic", []), adapter.processor)
    curves = {}
    for mode, keys in keys_by_mode.items():
        index = torch.tensor([unique[key] for key in keys])
        curves[mode] = PerturbationCurve(
            mode=mode,
            levels=torch.tensor(grids[mode], dtype=torch.float64),
            ppl=ppl[index],
            ppl_original=float(ppl[0]),
            webp_sizes=torch.tensor([sizes[key] for key in keys], dtype=torch.float64) if mode == "pic" else None,
        )
    return curves


def _webp_sizes(
    images: torch.Tensor, unique: dict[ImageKey, int], keys: list[ImageKey], processor: Any
) -> dict[ImageKey, int]:
    """Lossless-WebP bytes of the de-normalized images named by ``keys``."""
    return {key: webp_size(to_uint8(images[unique[key]], processor)) for key in dict.fromkeys(keys)}


def perturbation_curve(
    adapter: VLMAdapter,
    image_or_pixel_values: Image.Image | torch.Tensor,
    prompt: str | Sequence[int],
    answer: str | Sequence[int],
    heatmap: torch.Tensor,
    levels: Sequence[float] | None = None,
    mode: str = "positive",
    max_batch: int | None = DEFAULT_MAX_BATCH,
    **options: Any,
) -> PerturbationCurve:
    """One mode's curve from an image (or its pixel values) and prompt/answer texts (or ids).

    A text prompt is encoded with ``adapter.encode_prompts``; given ``pixel_values`` and a text prompt,
    the prompt ids come from a blank image of the same size (LLaVA prompt ids depend on the image only
    through its size). ``options`` go to :func:`perturbation_curves` (``replacement``, ``blur_sigma``, ``rank_levels``).
    """
    if isinstance(image_or_pixel_values, Image.Image):
        prompt_ids, image_inputs = adapter.encode_prompts([image_or_pixel_values], [_text(prompt, "prompt")])
        pixel_values = image_inputs["pixel_values"][0]
    else:
        pixel_values = _as_chw(image_or_pixel_values)
        if isinstance(prompt, str):
            blank = Image.new("RGB", (pixel_values.shape[-1], pixel_values.shape[-2]))
            prompt_ids, _ = adapter.encode_prompts([blank], [prompt])
        else:
            prompt_ids = [list(prompt)]
    answer_ids = adapter.tokenize_answer(answer) if isinstance(answer, str) else list(answer)
    grid = None if levels is None else {mode: levels}
    curves = perturbation_curves(
        adapter, pixel_values, prompt_ids[0], answer_ids, heatmap, [mode], grid, max_batch, **options
    )
    return curves[mode]


def _text(value: str | Sequence[int], name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"with a PIL image, {name} must be text")
    return value


def explanation_curves(
    adapter: VLMAdapter,
    explanation: Explanation,
    modes: Sequence[str] = ("positive", "negative"),
    levels: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    max_batch: int | None = DEFAULT_MAX_BATCH,
    **options: Any,
) -> dict[str, PerturbationCurve]:
    """Curves of an :class:`~dexar.explanation.Explanation`'s sequence map on its own teacher-forced inputs.

    The prompt is :meth:`VLMAdapter.explained_prompt_ids` (decoder-only: ``input_ids`` before the first
    answer position; encoder-decoder: the encoder's ``input_ids``); the answer is
    ``explanation.token_ids`` (the explained answer: generated or ground truth, as explained).
    """
    if not explanation.token_ids:
        raise ValueError("the explanation has no answer token, so no perplexity")
    prompt_ids = adapter.explained_prompt_ids(explanation.inputs, explanation.answer_positions)
    return perturbation_curves(
        adapter,
        explanation.inputs["pixel_values"],
        prompt_ids,
        explanation.token_ids,
        explanation.sequence_map,
        modes,
        levels,
        max_batch,
        **options,
    )
