"""ImageNet-C (paper appendix L): the released images, or corruptions generated from ImageNet val.

``released``: ``<root>/<corruption>/<severity>/<wnid>/*.JPEG`` as published by Hendrycks & Dietterich.
``generate``: ``root`` is an ImageNet root in any layout :mod:`datamodules.imagenet` understands; each
image is (by default) resized to 256 and centre-cropped to 224 like the released set, then corrupted by
``corrupt-tta`` (a maintained, NumPy-2 compatible port of the ImageNet-C code) with a random state
seeded per sample, so a sample is the same image on every run and process.

Both modes pick the same seeded subset of images as :class:`~datamodules.imagenet.ImageNetDataModule`
(records sorted by file stem) and pair it across corruptions: every corruption shows the same images.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.common import (
    BenchmarkDataModule,
    BenchmarkDataset,
    image_files,
    layout_error,
    load_rgb,
    name_some,
    seeded_subset,
    subfolders,
)
from datamodules.imagenet import (
    CLASSIFY_PROMPT,
    ImageNetIndex,
    imagenet_answer,
    imagenet_sample,
    index_imagenet,
    wnid_to_index,
)
from dexar.schema import Sample

PAPER_CORRUPTIONS = ("pixelate", "fog", "brightness", "zoom_blur", "gaussian_noise", "motion_blur")
"""The six corruptions of the paper's appendix L (run at severity 5)."""
MODES = ("auto", "released", "generate")


def imagenet_c_layouts(split: str) -> list[str]:
    """Human-readable descriptions of the understood ImageNet-C layouts (for error messages)."""
    return [
        "released ROOT/<corruption>/<severity>/<wnid>/*.JPEG (e.g. ROOT/fog/5/n01440764/*.JPEG)",
        f"mode generate: an ImageNet root ({split}/<wnid>/, {split}/ + LOC_{split}_solution.csv, or Hugging Face)",
    ]


def corrupt_image(image: Image.Image, corruption: str, severity: int, seed: int) -> Image.Image:
    """Apply one ImageNet-C corruption with ``corrupt-tta``, deterministically for a given ``seed``.

    ``corrupt-tta`` draws from NumPy's global random state: it is seeded here and restored afterwards.
    """
    from corrupt_tta import corrupt

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        out = corrupt(np.asarray(image), severity=severity, corruption_name=corruption)
    finally:
        np.random.set_state(state)
    return Image.fromarray(np.clip(np.asarray(out), 0, 255).astype(np.uint8), mode="RGB")


def resize_center_crop(image: Image.Image, resize: int = 256, crop: int = 224) -> Image.Image:
    """Shorter side to ``resize`` (bilinear), then the central ``crop × crop`` (the released preprocessing)."""
    w, h = image.size
    scale = resize / min(w, h)
    image = image.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), Image.Resampling.BILINEAR)
    w, h = image.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return image.crop((left, top, left + crop, top + crop))


def sample_seed(seed: int, corruption: str, severity: int, key: str) -> int:
    """Per-sample corruption seed from the run seed and the sample's identity."""
    digest = zlib.crc32(f"{corruption}/{severity}/{key}".encode())
    return int(np.random.SeedSequence([seed, digest]).generate_state(1)[0])


def _is_released(root: Path, corruptions: list[str]) -> bool:
    return any((root / c).is_dir() for c in corruptions)


def index_released(
    root: Path, corruptions: list[str], severities: list[int]
) -> dict[tuple[str, int], dict[str, tuple[str, int]]]:
    """Per ``(corruption, severity)``: file stem → ``(path, label)``.

    Raises:
        DatasetLayoutError: a requested corruption/severity folder is missing or not ``<wnid>`` folders.

    """
    known = wnid_to_index()
    layouts = imagenet_c_layouts("val")
    out: dict[tuple[str, int], dict[str, tuple[str, int]]] = {}
    for c in corruptions:
        for s in severities:
            folder = root / c / str(s)
            if not folder.is_dir():
                raise layout_error("ImageNet-C", f"{folder} not found", layouts)
            wnids = subfolders(folder)
            unknown = [w for w in wnids if w not in known]
            if not wnids or unknown:
                stray = f"in {folder}, not a wnid folder: {name_some(unknown)}"
                what = stray if unknown else f"no <wnid> folders in {folder}"
                raise layout_error("ImageNet-C", what, layouts)
            out[(c, s)] = {Path(e.name).stem: (e.path, known[w]) for w in wnids for e in image_files(folder / w)}
    return out


class ImageNetCDataset(BenchmarkDataset):
    """ImageNet-C samples: for every requested corruption and severity, the same seeded images.

    Records are ``(corruption, severity, key, ref, label)``; ``ref`` is a released file (released
    mode) or a path / hub row of the clean image (generate mode, ``source`` set).

    Args:
        records: The samples, corruption-major.
        source: ImageNet index the clean images come from (generate mode), else ``None``.
        seed: Run seed (subset and per-sample corruption noise).
        prompt: User prompt.
        answer_template: Answer template (see :class:`~datamodules.imagenet.ImageNetDataModule`).
        resize_crop: Generate mode: resize to 256 and centre-crop 224 before corrupting.

    """

    def __init__(
        self,
        records: list[tuple[str, int, str, str | int, int]],
        source: ImageNetIndex | None,
        seed: int = 0,
        prompt: str = CLASSIFY_PROMPT,
        answer_template: str = "I see {article} {name}",
        resize_crop: bool = True,
    ) -> None:
        imagenet_answer(0, answer_template)  # validates the template early
        self.records, self.source, self.seed = records, source, seed
        self.prompt, self.answer_template, self.resize_crop = prompt, answer_template, resize_crop

    def sample_id(self, index: int) -> str:
        corruption, severity, key, _, _ = self.records[index]
        return f"imagenetc-{corruption}-{severity}-{key}"

    def load(self, index: int) -> Sample:
        corruption, severity, key, ref, label = self.records[index]
        if self.source is None:
            image = load_rgb(ref)
        else:
            image = self.source.read(ref)
            if self.resize_crop:
                image = resize_center_crop(image)
            image = corrupt_image(image, corruption, severity, sample_seed(self.seed, corruption, severity, key))
        meta = {
            "dataset": "imagenet-c",
            "index": index,
            "corruption": corruption,
            "severity": severity,
            "file": key,
            "mode": "released" if self.source is None else "generated",
        }
        return imagenet_sample(self.sample_id(index), image, self.prompt, label, self.answer_template, meta)


class ImageNetCDataModule(BenchmarkDataModule):
    """ImageNet-C for the filler-filtering robustness study (paper appendix L).

    ``released`` mode reads ``root/<corruption>/<severity>/<wnid>/*.JPEG``; ``generate`` mode reads an
    ImageNet root (any :class:`~datamodules.imagenet.ImageNetDataModule` layout, incl. Hugging Face)
    and corrupts on the fly with ``corrupt-tta``; ``auto`` picks ``released`` when ``root`` has a folder
    named after a requested corruption. The corruption and severity are in every sample's ``meta``.
    The default answer ``"I see a tench"`` has filler words (``I see a``) and content words (the class
    name), which the filler-word SNR of appendix L needs.

    Args:
        root: ImageNet-C root (released) or ImageNet root (generate).
        split: ImageNet split used by ``generate`` mode.
        num_samples: Images per corruption and severity (seeded, the same images for each);
            ``None`` keeps all.
        seed: Seed of the subset and of the generated corruption noise.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (decoding and corruption run there).
        corruptions: Corruption names (default: the paper's six).
        severities: Severity levels 1–5 (default: ``[5]``, as in the paper).
        mode: ``auto``, ``released`` or ``generate``.
        resize_crop: ``generate``: resize to 256 and centre-crop 224 first, as the released set was made.
        prompt: User prompt.
        answer_template: Ground-truth answer template over ``name``, ``names``, ``clean_name``, ``wnid``,
            ``index`` and ``article``; words from the class name are content words.
        cache_dir: Where ``datasets`` keeps its Arrow copy of parquet files (``generate`` from parquet).

    """

    def __init__(
        self,
        root: str,
        split: str = "val",
        num_samples: int | None = 1000,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 2,
        corruptions: list[str] | None = None,
        severities: list[int] | None = None,
        mode: str = "auto",
        resize_crop: bool = True,
        prompt: str = CLASSIFY_PROMPT,
        answer_template: str = "I see {article} {name}",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"ImageNet-C mode must be one of {MODES}, got {mode!r}")
        self.save_hyperparameters()

    def build_dataset(self) -> ImageNetCDataset:
        hp = self.hparams
        root = Path(hp.root)
        corruptions = list(hp.corruptions or PAPER_CORRUPTIONS)
        severities = [int(s) for s in (hp.severities or [5])]
        bad = [s for s in severities if not 1 <= s <= 5]
        if bad:
            raise ValueError(f"ImageNet-C severities are 1–5, got {bad}")
        if not root.is_dir():
            raise layout_error("ImageNet-C", f"dataset root {root} does not exist", imagenet_c_layouts(hp.split))
        released = hp.mode == "released" or (hp.mode == "auto" and _is_released(root, corruptions))
        records: list[tuple[str, int, str, str | int, int]] = []
        if released:
            per_dir = index_released(root, corruptions, severities)
            keys = sorted(set.intersection(*(set(files) for files in per_dir.values())))
            chosen = [keys[i] for i in seeded_subset(len(keys), hp.num_samples, hp.seed)]
            for (c, s), files in per_dir.items():
                records += [(c, s, k, *files[k]) for k in chosen]
            return ImageNetCDataset(records, None, hp.seed, hp.prompt, hp.answer_template, hp.resize_crop)
        _check_corruptions(corruptions)
        try:
            index = index_imagenet(root, hp.split, hp.cache_dir)
        except FileNotFoundError as err:
            raise layout_error(
                "ImageNet-C",
                f"{root} is neither released ImageNet-C nor ImageNet ({str(err).splitlines()[0]})",
                imagenet_c_layouts(hp.split),
            ) from None
        chosen_items = [index.items[i] for i in seeded_subset(len(index.items), hp.num_samples, hp.seed)]
        for c in corruptions:
            for s in severities:
                records += [(c, s, key, ref, label) for key, ref, label in chosen_items]
        source = ImageNetIndex([], index.layout, index.root, index.hf)
        return ImageNetCDataset(records, source, hp.seed, hp.prompt, hp.answer_template, hp.resize_crop)


def _check_corruptions(corruptions: list[str]) -> None:
    """Import ``corrupt-tta`` and check the corruption names (generate mode)."""
    try:
        from corrupt_tta import corruption_dict
    except ImportError as err:  # pragma: no cover - it is a declared dependency
        raise ImportError("ImageNet-C generation needs corrupt-tta: pip install 'corrupt-tta>=0.1.7,<0.2'") from err
    unknown = [c for c in corruptions if c not in corruption_dict]
    if unknown:
        raise ValueError(f"unknown ImageNet-C corruption(s) {unknown}; known: {sorted(corruption_dict)}")
