"""PascalVOC segmentation (VOC2012 val) and PascalVOC-QA (paper appendix H).

Masks come from ``SegmentationClass`` (palette PNG of class indices): one boolean mask per class
present, in class-index order (which is alphabetical). Label 255 marks object boundaries and
"difficult" regions: it goes to ``Sample.ignore_mask`` and belongs to neither the objects nor the
background, so metrics exclude it. ``Annotations`` (XML) and ``SegmentationObject`` (instance ids)
are read when present and summarised in ``Sample.meta``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datamodules.common import BenchmarkDataModule, BenchmarkDataset, article, layout_error, load_rgb, seeded_subset
from dexar.schema import Sample

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""VOC class names; class ``c`` has label ``VOC_CLASSES.index(c) + 1`` (0 is background)."""
DISPLAY_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}
"""Natural-language names of the VOC classes written as one word."""
IGNORE_LABEL = 255
CLASSIFY_PROMPT = "Classify the image."
QA_PROMPT = "What do you see in the image?"


def display_name(voc_class: str) -> str:
    """The class name as words (``pottedplant`` → ``potted plant``)."""
    return DISPLAY_NAMES.get(voc_class, voc_class)


def voc_layouts(split: str, year: str) -> list[str]:
    """Human-readable description of the understood VOC layout (for error messages)."""
    base = f"ROOT/VOCdevkit/VOC{year}"
    return [
        f"{base}/{{ImageSets/Segmentation/{split}.txt, JPEGImages/<name>.jpg, SegmentationClass/<name>.png}} "
        f"(ROOT may also be VOCdevkit or VOC{year} itself)"
    ]


def find_voc_base(root: str | Path, split: str = "val", year: str = "2012") -> Path:
    """The ``VOC<year>`` folder under ``root``, checked for the segmentation layout.

    Raises:
        DatasetLayoutError: ``root`` is missing or in no understood layout.

    """
    root = Path(root)
    layouts = voc_layouts(split, year)
    if not root.is_dir():
        raise layout_error("PascalVOC", f"dataset root {root} does not exist", layouts)
    candidates = [root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}", root]
    base = next((c for c in candidates if (c / "ImageSets" / "Segmentation").is_dir()), None)
    if base is None:
        raise layout_error("PascalVOC", f"{candidates[0] / 'ImageSets' / 'Segmentation'} not found", layouts)
    for needed in (
        base / "ImageSets" / "Segmentation" / f"{split}.txt",
        base / "JPEGImages",
        base / "SegmentationClass",
    ):
        if not needed.exists():
            raise layout_error("PascalVOC", f"{needed} not found", layouts)
    return base


def read_split(base: Path, split: str) -> list[str]:
    """Image names listed in ``ImageSets/Segmentation/<split>.txt``, sorted, without duplicates."""
    text = (base / "ImageSets" / "Segmentation" / f"{split}.txt").read_text(encoding="utf-8")
    return sorted({line.split()[0] for line in text.splitlines() if line.strip()})


def read_label_png(path: Path) -> np.ndarray:
    """``(H, W)`` uint8 label indices of a palette (or grayscale) segmentation PNG."""
    image = Image.open(path)
    image.load()
    if image.mode not in ("P", "L"):
        raise ValueError(f"{path.name} is a {image.mode} image, expected a palette PNG of label indices")
    return np.asarray(image)


def read_objects(path: Path) -> list[dict[str, Any]]:
    """Objects of a VOC XML annotation: name, difficult, truncated, bbox ``[xmin, ymin, xmax, ymax]``."""
    objects = []
    for obj in ET.parse(path).getroot().findall("object"):
        box = obj.find("bndbox")
        objects.append(
            {
                "name": (obj.findtext("name") or "").strip(),
                "difficult": int(obj.findtext("difficult") or 0),
                "truncated": int(obj.findtext("truncated") or 0),
                "bbox": [int(float(box.findtext(k) or 0)) for k in ("xmin", "ymin", "xmax", "ymax")]
                if box is not None
                else None,
            }
        )
    return objects


def qa_answer(
    classes: list[str], start: str = "I see", connector: str = "as well as"
) -> tuple[str, list[bool], list[int]]:
    """PascalVOC-QA answer ``"I see a bus as well as a car as well as a person"`` with word labels.

    Args:
        classes: Class names as words, in order (``classes[k]`` is named by mask ``k``).
        start: Opening phrase (filler).
        connector: Phrase between objects (filler).

    Returns:
        The answer, per-word content flags (only the class-name words are content; every word of a
        multi-word name is) and per-word mask indices (``-1`` for filler words).

    """
    words, content, mask_index = start.split(), [False] * len(start.split()), [-1] * len(start.split())
    for k, name in enumerate(classes):
        filler = (connector.split() if k else []) + [article(name)]
        words += filler + name.split()
        content += [False] * len(filler) + [True] * len(name.split())
        mask_index += [-1] * len(filler) + [k] * len(name.split())
    return " ".join(words), content, mask_index


class PascalVOCDataset(BenchmarkDataset):
    """VOC segmentation images with per-class masks and the 255-boundary ignore mask.

    Args:
        base: The ``VOC<year>`` folder (see :func:`find_voc_base`).
        split: Image set of ``ImageSets/Segmentation``.
        num_samples: Size of the seeded subset (``None``: all images of the split).
        seed: Subset seed.
        prompt: User prompt.

    """

    dataset_name = "voc"

    def __init__(
        self,
        base: Path,
        split: str = "val",
        num_samples: int | None = None,
        seed: int = 0,
        prompt: str = CLASSIFY_PROMPT,
    ) -> None:
        names = read_split(base, split)
        self.records = [names[i] for i in seeded_subset(len(names), num_samples, seed)]
        self.base, self.split, self.prompt = base, split, prompt
        self.has_objects = (base / "SegmentationObject").is_dir()
        self.has_annotations = (base / "Annotations").is_dir()

    def sample_id(self, index: int) -> str:
        return f"{self.dataset_name}-{self.split}-{self.records[index]}"

    def read(self, index: int) -> tuple[Image.Image, np.ndarray, list[int], dict[str, Any]]:
        """Image, class-index labels, classes present (labels 1–20) and metadata of one image."""
        name = self.records[index]
        image = load_rgb(self.base / "JPEGImages" / f"{name}.jpg")
        labels = read_label_png(self.base / "SegmentationClass" / f"{name}.png")
        if labels.shape != (image.height, image.width):
            raise ValueError(f"mask {labels.shape[::-1]} and image {image.size} sizes differ")
        values = np.flatnonzero(np.bincount(labels.ravel(), minlength=256))  # labels present (uint8)
        bad = [int(v) for v in values if len(VOC_CLASSES) < v < IGNORE_LABEL]
        if bad:
            raise ValueError(f"unknown labels {bad} in SegmentationClass/{name}.png")
        present = [int(v) for v in values if 1 <= v <= len(VOC_CLASSES)]
        meta: dict[str, Any] = {
            "dataset": self.dataset_name,
            "index": index,
            "image_name": name,
            "classes": [VOC_CLASSES[v - 1] for v in present],
        }
        object_png = self.base / "SegmentationObject" / f"{name}.png"
        if self.has_objects and object_png.is_file():
            ids = np.flatnonzero(np.bincount(read_label_png(object_png).ravel(), minlength=256))
            meta["num_instances"] = int(((ids > 0) & (ids != IGNORE_LABEL)).sum())
        xml = self.base / "Annotations" / f"{name}.xml"
        if self.has_annotations and xml.is_file():
            meta["objects"] = read_objects(xml)
        return image, labels, present, meta

    def load(self, index: int) -> Sample:
        image, labels, present, meta = self.read(index)
        return Sample(
            id=self.sample_id(index),
            image=image,
            prompt=self.prompt,
            masks=labels[None] == np.asarray(present, dtype=labels.dtype)[:, None, None],
            mask_labels=[display_name(VOC_CLASSES[v - 1]) for v in present],
            ignore_mask=labels == IGNORE_LABEL,
            meta=meta,
        )


class PascalVOCQADataset(PascalVOCDataset):
    """PascalVOC-QA: VOC samples whose answer names every class present, with content/filler labels.

    Args:
        base: The ``VOC<year>`` folder.
        split: Image set of ``ImageSets/Segmentation``.
        num_samples: Size of the seeded subset (``None``: all images of the split).
        seed: Subset seed.
        prompt: User prompt.
        start: Opening phrase of the answer (filler words).
        connector: Phrase between two objects (filler words).

    """

    dataset_name = "vocqa"

    def __init__(
        self,
        base: Path,
        split: str = "val",
        num_samples: int | None = None,
        seed: int = 0,
        prompt: str = QA_PROMPT,
        start: str = "I see",
        connector: str = "as well as",
    ) -> None:
        super().__init__(base, split, num_samples, seed, prompt)
        self.start, self.connector = start, connector

    def load(self, index: int) -> Sample:
        sample = super().load(index)
        if not sample.mask_labels:
            raise ValueError("no labelled object to describe")
        answer, content, mask_index = qa_answer(sample.mask_labels, self.start, self.connector)
        sample.answer, sample.word_is_content, sample.word_mask_index = answer, content, mask_index
        return sample


class PascalVOCDataModule(BenchmarkDataModule):
    """PascalVOC segmentation val for localization metrics (IoU, soft-IoU, EPG; paper section 4.1).

    Each sample has the prompt ``Classify the image.``, no ground-truth answer (the model's answer is
    explained), ``masks`` = one mask per class present with ``mask_labels`` = class names (their union,
    ``Sample.union_mask``, is the paper's target) and ``ignore_mask`` = the 255 boundary pixels.

    Args:
        root: Folder holding ``VOCdevkit/VOC<year>`` (``VOCdevkit`` or ``VOC<year>`` itself also work).
        split: Image set in ``ImageSets/Segmentation`` (``val``: 1,449 images).
        num_samples: Size of the seeded random subset; ``None`` (default) keeps every image.
        seed: Seed of the subset (the same ids on any number of processes).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (images and masks are decoded there).
        year: VOC edition (``2012``).
        prompt: User prompt.

    """

    def __init__(
        self,
        root: str,
        split: str = "val",
        num_samples: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 2,
        year: str = "2012",
        prompt: str = CLASSIFY_PROMPT,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def build_dataset(self) -> PascalVOCDataset:
        hp = self.hparams
        return PascalVOCDataset(find_voc_base(hp.root, hp.split, hp.year), hp.split, hp.num_samples, hp.seed, hp.prompt)


class PascalVOCQADataModule(BenchmarkDataModule):
    """PascalVOC-QA (paper appendix H): the answer lists the image's classes with fixed filler phrases.

    The answer is ``"I see a bus as well as a car as well as a person"`` (classes in label order,
    ``a``/``an`` by spelling); ``word_is_content`` marks the class-name words (all words of a multi-word
    name such as ``potted plant``), ``word_mask_index`` points each of them at its class mask.
    :func:`dexar.labels.token_labels` turns these word labels into per-token labels and masks for
    any fast tokenizer. Masks and ignore mask as in :class:`PascalVOCDataModule`.

    Args:
        root: Folder holding ``VOCdevkit/VOC<year>`` (``VOCdevkit`` or ``VOC<year>`` itself also work).
        split: Image set in ``ImageSets/Segmentation``.
        num_samples: Size of the seeded random subset; ``None`` (default) keeps every image.
        seed: Seed of the subset (the same ids on any number of processes).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        year: VOC edition (``2012``).
        prompt: User prompt.
        start: Opening phrase of the answer.
        connector: Phrase between two objects.

    """

    def __init__(
        self,
        root: str,
        split: str = "val",
        num_samples: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 2,
        year: str = "2012",
        prompt: str = QA_PROMPT,
        start: str = "I see",
        connector: str = "as well as",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def build_dataset(self) -> PascalVOCQADataset:
        hp = self.hparams
        base = find_voc_base(hp.root, hp.split, hp.year)
        return PascalVOCQADataset(base, hp.split, hp.num_samples, hp.seed, hp.prompt, hp.start, hp.connector)
