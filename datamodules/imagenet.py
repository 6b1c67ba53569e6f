"""ImageNet (ILSVRC2012 val): class-folder, flat + ``LOC_val_solution.csv``, or Hugging Face layouts.

The 1000 wnid → class-name table ships in ``datamodules/data/imagenet_classes.json`` (index order =
sorted wnids, the standard label order, also the hub's ``label``). Records are sorted by file stem
(``ILSVRC2012_val_00000001``) in every layout, so one seed picks the same images whichever layout
holds them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

from datamodules.common import (
    BenchmarkDataModule,
    BenchmarkDataset,
    article,
    image_files,
    layout_error,
    load_rgb,
    name_some,
    render_template,
    seeded_subset,
    subfolders,
)
from datamodules.hf import (
    HF_LAYOUT,
    arrow_column,
    encoded_images,
    image_paths,
    image_source,
    is_hf_root,
    open_hf_split,
    require_columns,
)
from dexar.schema import Sample

CLASSES_FILE = Path(__file__).resolve().parent / "data" / "imagenet_classes.json"
CLASSIFY_PROMPT = "Classify the image."
CONTENT_FIELDS = ("name", "names", "clean_name")
HF_COLUMNS = ("image", "label")


@dataclass(frozen=True)
class ImageNetClass:
    """One ImageNet-1k class.

    Attributes:
        index: Label index (0–999, sorted-wnid order).
        wnid: WordNet id, e.g. ``n01440764``.
        names: The synset's names, e.g. ``"tench, Tinca tinca"``.
        clean_name: A single curated name (e.g. ``"crane bird"`` vs ``"construction crane"``).

    """

    index: int
    wnid: str
    names: str
    clean_name: str

    @property
    def name(self) -> str:
        """The first of the synset's names (``"tench"``)."""
        return self.names.split(",")[0].strip()

    def template_fields(self) -> dict[str, Any]:
        """Answer-template fields: ``name``, ``names``, ``clean_name``, ``wnid``, ``index``, ``article``."""
        return {
            "name": self.name,
            "names": self.names,
            "clean_name": self.clean_name,
            "wnid": self.wnid,
            "index": self.index,
            "article": article(self.name),
        }


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1000 ImageNet-1k classes in label order (bundled table, no download)."""
    rows = json.loads(CLASSES_FILE.read_text(encoding="utf-8"))["classes"]
    return tuple(ImageNetClass(i, wnid, names, clean) for i, (wnid, names, clean) in enumerate(rows))


@lru_cache(maxsize=1)
def wnid_to_index() -> dict[str, int]:
    """Wnid → label index."""
    return {c.wnid: c.index for c in imagenet_classes()}


def imagenet_layouts(split: str) -> list[str]:
    """Human-readable descriptions of the understood ImageNet layouts (for error messages)."""
    return [
        f"ROOT/{split}/<wnid>/*.JPEG",
        f"ROOT/{split}/*.JPEG + ROOT/LOC_{split}_solution.csv (Kaggle: images in ROOT/ILSVRC/Data/CLS-LOC/{split}/)",
        HF_LAYOUT.format(columns="columns image, label"),
    ]


@dataclass
class ImageNetIndex:
    """Every image of a split: ``items`` are ``(key, path or HF row, label or -1)``, sorted by key.

    Attributes:
        items: One entry per image; ``key`` is the file stem (or ``row-N`` for a hub row without path).
        layout: ``folders``, ``flat`` or ``hf``.
        root: Dataset root.
        hf: The ``datasets.Dataset`` reduced to encoded images (``hf`` layout only).

    """

    items: list[tuple[str, str | int, int]]
    layout: str
    root: Path
    hf: Any = None

    def read(self, ref: str | int) -> Image.Image:
        """Decode one image (a path, or a row of the Hugging Face dataset) to RGB."""
        if isinstance(ref, int):
            return load_rgb(image_source(self.hf[ref]["image"], self.root))
        return load_rgb(ref)


def index_imagenet(root: str | Path, split: str = "val", cache_dir: str | None = None) -> ImageNetIndex:
    """Index an ImageNet split in any understood layout.

    Raises:
        DatasetLayoutError: ``root`` is missing or in no understood layout (one message with all layouts).

    """
    root = Path(root)
    layouts = imagenet_layouts(split)
    if not root.is_dir():
        raise layout_error("ImageNet", f"dataset root {root} does not exist", layouts)
    if is_hf_root(root, split):
        return _index_hf(root, split, cache_dir, layouts)
    candidates = [root / split, root / "ILSVRC" / "Data" / "CLS-LOC" / split]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise layout_error("ImageNet", f"no image folder {candidates[0]} (nor {candidates[1]})", layouts)
    known = wnid_to_index()
    subdirs = subfolders(folder)
    items: list[tuple[str, str | int, int]] = []
    if subdirs:
        unknown = [d for d in subdirs if d not in known]
        if unknown:
            stray = f"in {folder}, not a class folder named by a wnid: {name_some(unknown)}"
            raise layout_error("ImageNet", f"{stray} (hidden folders are ignored)", layouts)
        for wnid in subdirs:
            items += [(Path(e.name).stem, e.path, known[wnid]) for e in image_files(folder / wnid)]
        layout = "folders"
    else:
        files = image_files(folder)
        if not files:
            raise layout_error("ImageNet", f"no class folders and no images in {folder}", layouts)
        name = f"LOC_{split}_solution.csv"
        csv_candidates = [root / name, folder.parent / name, folder / name]
        csv_path = next((c for c in csv_candidates if c.is_file()), None)
        if csv_path is None:
            raise layout_error("ImageNet", f"flat image folder {folder} but no {csv_candidates[0]}", layouts)
        labels = _read_solution(csv_path)
        items = [(Path(e.name).stem, e.path, known.get(labels.get(Path(e.name).stem, ""), -1)) for e in files]
        missing = [key for key, _, label in items if label < 0]
        if missing:
            raise layout_error(
                "ImageNet", f"{len(missing)} images (e.g. {missing[0]}) have no wnid in {csv_path}", layouts
            )
        layout = "flat"
    items.sort()
    _check_unique(items, layouts)
    return ImageNetIndex(items, layout, root)


def _read_solution(path: Path) -> dict[str, str]:
    """``ImageId → wnid`` from ``LOC_val_solution.csv`` (first wnid of ``PredictionString``)."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise layout_error("ImageNet", f"{path} lacks the header ImageId,PredictionString", imagenet_layouts("val"))
        return {row["ImageId"]: (row["PredictionString"] or "").split(" ")[0] for row in reader}


def _index_hf(root: Path, split: str, cache_dir: str | None, layouts: list[str]) -> ImageNetIndex:
    try:
        ds, _ = open_hf_split(root, split, cache_dir)
    except FileNotFoundError as err:
        raise layout_error("ImageNet", str(err), layouts) from None
    missing = require_columns(ds, HF_COLUMNS)
    if missing:
        raise layout_error("ImageNet", f"the dataset under {root} has no column(s) {missing}", layouts)
    labels = arrow_column(ds, "label").to_pylist()
    paths = image_paths(ds)
    items: list[tuple[str, str | int, int]] = [
        (Path(p).stem if p else f"row-{row:08d}", row, -1 if label is None else int(label))
        for row, (p, label) in enumerate(zip(paths, labels, strict=True))
    ]
    items.sort()
    _check_unique(items, layouts)
    return ImageNetIndex(items, "hf", root, encoded_images(ds))


def _check_unique(items: list[tuple[str, str | int, int]], layouts: list[str]) -> None:
    for (a, ref, _), (b, _, _) in zip(items, items[1:], strict=False):
        if a == b:
            raise layout_error("ImageNet", f"two images share the name {a} (one is {ref})", layouts)


def imagenet_answer(label: int, template: str) -> tuple[str | None, list[bool] | None]:
    """Answer text and per-word content flags for a class (``None`` for an unlabelled image)."""
    if label < 0:
        return None, None
    return render_template(template, imagenet_classes()[label].template_fields(), CONTENT_FIELDS)


class ImageNetDataset(BenchmarkDataset):
    """A seeded subset of an ImageNet split; one :class:`~dexar.schema.Sample` per image.

    Args:
        index: The split's :class:`ImageNetIndex`.
        num_samples: Subset size (``None``: all images).
        seed: Subset seed.
        prompt: User prompt.
        answer_template: ``str.format`` template of the ground-truth answer (see
            :meth:`ImageNetClass.template_fields`); words from the class name are content words.
        split: Split name, part of the sample ids.

    """

    def __init__(
        self,
        index: ImageNetIndex,
        num_samples: int | None = 5000,
        seed: int = 0,
        prompt: str = CLASSIFY_PROMPT,
        answer_template: str = "{name}",
        split: str = "val",
    ) -> None:
        imagenet_answer(0, answer_template)  # validates the template early
        self.records = [index.items[i] for i in seeded_subset(len(index.items), num_samples, seed)]
        self.source = ImageNetIndex([], index.layout, index.root, index.hf)  # keep workers' copies small
        self.prompt, self.answer_template, self.split = prompt, answer_template, split

    def sample_id(self, index: int) -> str:
        return f"imagenet-{self.split}-{self.records[index][0]}"

    def load(self, index: int) -> Sample:
        key, ref, label = self.records[index]
        image = self.source.read(ref)
        meta = {"dataset": "imagenet", "index": index, "file": key, "layout": self.source.layout}
        return imagenet_sample(self.sample_id(index), image, self.prompt, label, self.answer_template, meta)


def imagenet_sample(
    sample_id: str, image: Image.Image, prompt: str, label: int, template: str, meta: dict[str, Any]
) -> Sample:
    """An ImageNet-labelled sample: answer from ``template``, its words' content labels, class metadata.

    ``meta`` gets ``label``, ``wnid`` and ``class_name`` (``None`` for an unlabelled image, ``label < 0``).
    """
    answer, content = imagenet_answer(label, template)
    cls = imagenet_classes()[label] if label >= 0 else None
    return Sample(
        id=sample_id,
        image=image,
        prompt=prompt,
        answer=answer,
        word_is_content=content,
        word_mask_index=None if content is None else [-1] * len(content),
        meta={**meta, "label": label, "wnid": cls.wnid if cls else None, "class_name": cls.names if cls else None},
    )


class ImageNetDataModule(BenchmarkDataModule):
    """ImageNet (ILSVRC2012 val) for explanation and perturbation metrics (paper section 4.1).

    Layouts under ``root`` (detected at ``setup``): ``<split>/<wnid>/*.JPEG``; flat ``<split>/*.JPEG``
    with ``LOC_<split>_solution.csv`` (also the Kaggle ``ILSVRC/Data/CLS-LOC/<split>``); a Hugging Face
    ``save_to_disk`` directory or parquet files with columns ``image`` and ``label``. Unreadable images
    are skipped, logged and counted in :attr:`skipped`.

    Args:
        root: Dataset root (see the layouts above).
        split: Split folder / hub split (``val`` also matches ``validation``).
        num_samples: Size of the seeded random subset (paper: 5,000); ``None`` keeps every image.
        seed: Seed of the subset (the same ids on any number of processes).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (images are decoded there).
        prompt: User prompt.
        answer_template: Ground-truth answer for teacher forcing and perplexity, a ``str.format``
            template over ``name`` (first synset name, default), ``names``, ``clean_name``, ``wnid``,
            ``index`` and ``article`` (``a``/``an``), e.g. ``"This is {article} {name}."``.
        cache_dir: Where ``datasets`` keeps its Arrow copy of parquet files (default: its cache).

    """

    def __init__(
        self,
        root: str,
        split: str = "val",
        num_samples: int | None = 5000,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 2,
        prompt: str = CLASSIFY_PROMPT,
        answer_template: str = "{name}",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def build_dataset(self) -> ImageNetDataset:
        hp = self.hparams
        index = index_imagenet(hp.root, hp.split, hp.cache_dir)
        return ImageNetDataset(index, hp.num_samples, hp.seed, hp.prompt, hp.answer_template, hp.split)
