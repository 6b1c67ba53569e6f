"""Tiny on-disk datasets in the real layouts (real JPEG/PNG/JSON/XML/CSV/parquet), for tests and benchmarks.

Every builder writes under a given root and returns a :class:`Fixture` that says what it wrote. Image
kinds cycle through RGB, grayscale (``L``) and CMYK JPEGs; ``broken`` files are JPEGs cut in half.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.common import BenchmarkDataModule
from datamodules.voc import VOC_CLASSES
from dexar.schema import Sample

IMAGENET_WNIDS = ("n01440764", "n01443537", "n02119789")
"""tench, goldfish, kit fox."""
KINDS = ("rgb", "gray", "cmyk")


@dataclass
class Fixture:
    """What a builder wrote.

    Attributes:
        root: The dataset root to pass as ``root``.
        keys: Keys of every sample (file stems, question ids, VOC names), sorted.
        broken: Keys whose image file is truncated.
        labels: Key → label (wnid, answer or class list).
        kinds: Key → image kind (``rgb``, ``gray``, ``cmyk``, ``broken``).

    """

    root: Path
    keys: list = field(default_factory=list)
    broken: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)


def image_pixels(size: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth random ``(H, W, 3)`` uint8 picture of ``size = (width, height)``."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8))
    fine = np.asarray(coarse.resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
    return np.clip(fine + rng.integers(-12, 13, fine.shape), 0, 255).astype(np.uint8)


def encode_image(pixels: np.ndarray, kind: str = "rgb", fmt: str = "JPEG") -> bytes:
    """Encode pixels as ``kind``: ``rgb``, ``gray``, ``cmyk`` or ``broken`` (a JPEG cut in half)."""
    image = Image.fromarray(pixels, mode="RGB")
    if kind == "gray":
        image = image.convert("L")
    elif kind == "cmyk":
        image = image.convert("CMYK")
    buf = io.BytesIO()
    image.save(buf, fmt, quality=90) if fmt == "JPEG" else image.save(buf, fmt)
    data = buf.getvalue()
    return data[: len(data) // 2] if kind == "broken" else data


def write_image(path: Path, pixels: np.ndarray, kind: str = "rgb") -> Path:
    """Write ``pixels`` as a JPEG of ``kind`` to ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_image(pixels, kind))
    return path


def _kind(i: int, broken: set[int]) -> str:
    return "broken" if i in broken else KINDS[i % len(KINDS)]


def make_imagenet(
    root: str | Path,
    layout: str = "folders",
    per_class: int = 3,
    size: tuple[int, int] = (40, 30),
    broken: tuple[int, ...] = (4,),
    split: str = "val",
) -> Fixture:
    """ImageNet val in ``folders`` (``val/<wnid>/``), ``flat`` (+ CSV) or ``kaggle`` layout.

    Image ``i`` is ``ILSVRC2012_val_{i+1:08d}.JPEG`` of class ``IMAGENET_WNIDS[i % 3]``; indices in
    ``broken`` are truncated.
    """
    root = Path(root)
    fx = Fixture(root)
    folder = root / "ILSVRC" / "Data" / "CLS-LOC" / split if layout == "kaggle" else root / split
    rows = []
    for i in range(per_class * len(IMAGENET_WNIDS)):
        stem, wnid = f"ILSVRC2012_val_{i + 1:08d}", IMAGENET_WNIDS[i % len(IMAGENET_WNIDS)]
        kind = _kind(i, set(broken))
        target = folder / wnid if layout == "folders" else folder
        write_image(target / f"{stem}.JPEG", image_pixels(size, i), kind)
        rows.append(f"{stem},{wnid} 1 2 {size[0] - 1} {size[1] - 1}")
        fx.keys.append(stem)
        fx.labels[stem], fx.kinds[stem] = wnid, kind
        if kind == "broken":
            fx.broken.append(stem)
    if layout != "folders":
        (root / f"LOC_{split}_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    fx.keys.sort()
    return fx


def make_imagenet_hf(
    root: str | Path, fmt: str = "parquet", n: int = 9, size: tuple[int, int] = (40, 30), broken: tuple[int, ...] = (4,)
) -> Fixture:
    """ImageNet-1k in the hub's columns (``image`` {bytes, path}, ``label``), rows in shuffled order.

    ``fmt``: ``parquet`` (``data/validation-*.parquet`` plus a ``train`` file) or ``disk``
    (``DatasetDict.save_to_disk`` with ``validation`` and ``train``).
    """
    import datasets

    from datamodules.imagenet import wnid_to_index

    root = Path(root)
    fx = Fixture(root)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)})
    order = np.random.default_rng(0).permutation(n)
    images, labels = [], []
    for i in order.tolist():
        stem, wnid = f"ILSVRC2012_val_{i + 1:08d}", IMAGENET_WNIDS[i % len(IMAGENET_WNIDS)]
        kind = _kind(i, set(broken))
        images.append({"bytes": encode_image(image_pixels(size, i), kind), "path": f"{stem}.JPEG"})
        labels.append(wnid_to_index()[wnid])
        fx.keys.append(stem)
        fx.labels[stem], fx.kinds[stem] = wnid, kind
        if kind == "broken":
            fx.broken.append(stem)
    val = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    train = datasets.Dataset.from_dict(
        {"image": [{"bytes": encode_image(image_pixels(size, 99)), "path": "n01440764_1.JPEG"}], "label": [0]},
        features=features,
    )
    _save_hf(root, fmt, {"validation": val, "train": train})
    fx.keys.sort()
    return fx


def _save_hf(root: Path, fmt: str, splits: dict) -> None:
    import datasets

    if fmt == "disk":
        datasets.DatasetDict(splits).save_to_disk(str(root))
    elif fmt == "parquet":
        (root / "data").mkdir(parents=True, exist_ok=True)
        for name, ds in splits.items():
            ds.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
    else:
        raise ValueError(f"fmt must be 'disk' or 'parquet', got {fmt!r}")


QUESTIONS = (
    ("what color is the", "other", "What color is the car?", "red"),
    ("is there a", "yes/no", "Is there a dog?", "yes"),
    ("how many", "number", "How many people are there?", "2"),
)


def _vqa_rows(n_images: int, per_image: int, size: tuple[int, int], broken: set[int]) -> list[dict]:
    rows = []
    for i in range(n_images):
        image_id = 100 + 37 * i
        kind = _kind(i, broken)
        for k in range(per_image):
            qtype, atype, question, answer = QUESTIONS[(i + k) % len(QUESTIONS)]
            rows.append(
                {
                    "image_id": image_id,
                    "question_id": image_id * 1000 + k,
                    "question": question,
                    "multiple_choice_answer": answer,
                    "question_type": qtype,
                    "answer_type": atype,
                    "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)],
                    "kind": kind,
                    "pixels_seed": i,
                }
            )
    return rows


def make_vqav2(
    root: str | Path,
    n_images: int = 4,
    per_image: int = 3,
    size: tuple[int, int] = (40, 30),
    broken: tuple[int, ...] = (3,),
) -> Fixture:
    """Official VQAv2 val files (questions + annotations JSON) with COCO ``val2014`` JPEGs."""
    root = Path(root)
    fx = Fixture(root)
    rows = _vqa_rows(n_images, per_image, size, set(broken))
    for r in rows:
        path = root / "val2014" / f"COCO_val2014_{r['image_id']:012d}.jpg"
        if not path.exists():
            write_image(path, image_pixels(size, r["pixels_seed"]), r["kind"])
        fx.keys.append(r["question_id"])
        fx.labels[r["question_id"]], fx.kinds[r["question_id"]] = r["multiple_choice_answer"], r["kind"]
        if r["kind"] == "broken":
            fx.broken.append(r["question_id"])
    header = {"info": {"description": "fixture"}, "license": {"name": "fixture"}, "data_subtype": "val2014"}
    questions = [{k: r[k] for k in ("image_id", "question", "question_id")} for r in rows[::-1]]
    annotations = [
        {
            k: r[k]
            for k in ("question_type", "multiple_choice_answer", "answers", "image_id", "answer_type", "question_id")
        }
        for r in rows
    ]
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({**header, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions})
    )
    (root / "v2_mscoco_val2014_annotations.json").write_text(
        json.dumps({**header, "data_type": "mscoco", "annotations": annotations})
    )
    fx.keys.sort()
    return fx


def make_vqav2_hf(
    root: str | Path,
    fmt: str = "parquet",
    n_images: int = 4,
    per_image: int = 3,
    size: tuple[int, int] = (40, 30),
    broken: tuple[int, ...] = (3,),
) -> Fixture:
    """VQAv2 in the hub's columns (``question``, ``multiple_choice_answer``, ``image``, ...), rows shuffled."""
    import datasets

    root = Path(root)
    fx = Fixture(root)
    rows = _vqa_rows(n_images, per_image, size, set(broken))
    rows = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    data: dict[str, list] = {
        k: []
        for k in (
            "question_type",
            "multiple_choice_answer",
            "answers",
            "image_id",
            "answer_type",
            "question_id",
            "question",
            "image",
        )
    }
    for r in rows:
        for k in data:
            if k != "image":
                data[k].append(r[k])
        name = f"COCO_val2014_{r['image_id']:012d}.jpg"
        data["image"].append({"bytes": encode_image(image_pixels(size, r["pixels_seed"]), r["kind"]), "path": name})
        fx.keys.append(r["question_id"])
        fx.labels[r["question_id"]], fx.kinds[r["question_id"]] = r["multiple_choice_answer"], r["kind"]
        if r["kind"] == "broken":
            fx.broken.append(r["question_id"])
    val = datasets.Dataset.from_dict(data).cast_column("image", datasets.Image())
    _save_hf(root, fmt, {"validation": val})
    fx.keys.sort()
    return fx


def voc_palette() -> list[int]:
    """The PascalVOC colour map (256 RGB triplets, flattened), as in the devkit."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _boundary(instances: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels within ``width`` of a change of instance id (VOC's 255 void band along outlines)."""
    edge = np.zeros(instances.shape, dtype=bool)
    edge[:-1] |= instances[:-1] != instances[1:]
    edge[1:] |= instances[:-1] != instances[1:]
    edge[:, :-1] |= instances[:, :-1] != instances[:, 1:]
    edge[:, 1:] |= instances[:, :-1] != instances[:, 1:]
    for _ in range(width - 1):
        grown = edge.copy()
        grown[:-1] |= edge[1:]
        grown[1:] |= edge[:-1]
        grown[:, :-1] |= edge[:, 1:]
        grown[:, 1:] |= edge[:, :-1]
        edge = grown
    return edge


def _save_palette_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    image.save(path)


VOC_SCENES = (
    ("bus", "car", "person"),
    ("pottedplant", "diningtable"),
    ("person", "person"),
    ("aeroplane",),
    ("tvmonitor", "sofa", "cat"),
)
"""Objects of each fixture image (a class may repeat: several instances)."""


def make_voc(
    root: str | Path,
    scenes: tuple[tuple[str, ...], ...] = VOC_SCENES,
    size: tuple[int, int] = (48, 36),
    broken: tuple[int, ...] = (4,),
    year: str = "2012",
) -> Fixture:
    """PascalVOC segmentation layout ``VOCdevkit/VOC<year>`` with every file the datamodule reads.

    JPEGImages, palette SegmentationClass/SegmentationObject PNGs (255 boundaries), Annotations XML and
    ``ImageSets/Segmentation/{val,train}.txt``.

    Objects are side-by-side rectangles, one instance each; ``labels`` maps a name to its class list.
    """
    root = Path(root)
    base = root / "VOCdevkit" / f"VOC{year}"
    fx = Fixture(root)
    w, h = size
    names = []
    for i, scene in enumerate(scenes):
        name = f"{year}_{i:06d}"
        names.append(name)
        instances = np.zeros((h, w), dtype=np.uint8)
        classes = np.zeros((h, w), dtype=np.uint8)
        step = w // len(scene)
        objects = []
        for k, cls in enumerate(scene):
            x0, x1, y0, y1 = k * step + 2, (k + 1) * step - 2, 3 + k, h - 3
            instances[y0:y1, x0:x1] = k + 1
            classes[y0:y1, x0:x1] = VOC_CLASSES.index(cls) + 1
            objects.append((cls, x0, y0, x1 - 1, y1 - 1))
        edge = _boundary(instances)
        classes[edge], instances[edge] = 255, 255
        pixels = image_pixels(size, 50 + i)
        for k in range(len(scene)):
            pixels[instances == k + 1] = pixels[instances == k + 1] // 2 + np.array([40 * k, 120, 200 - 40 * k]) // 2
        kind = _kind(i, set(broken))
        write_image(base / "JPEGImages" / f"{name}.jpg", pixels, kind)
        _save_palette_png(base / "SegmentationClass" / f"{name}.png", classes)
        _save_palette_png(base / "SegmentationObject" / f"{name}.png", instances)
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{name}.xml").write_text(_voc_xml(name, size, objects))
        fx.keys.append(name)
        fx.labels[name], fx.kinds[name] = list(scene), kind
        if kind == "broken":
            fx.broken.append(name)
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "val.txt").write_text("\n".join(names) + "\n")
    (sets / "train.txt").write_text(names[0] + "\n")
    return fx


def _voc_xml(name: str, size: tuple[int, int], objects: list[tuple[str, int, int, int, int]]) -> str:
    parts = [
        "<annotation>",
        "  <folder>VOC2012</folder>",
        f"  <filename>{name}.jpg</filename>",
        f"  <size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>",
        "  <segmented>1</segmented>",
    ]
    for cls, x0, y0, x1, y1 in objects:
        parts += [
            "  <object>",
            f"    <name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>",
            f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
            f"<xmax>{x1 + 1}</xmax><ymax>{y1 + 1}</ymax></bndbox>",
            "  </object>",
        ]
    return "\n".join([*parts, "</annotation>"]) + "\n"


def make_imagenet_c(
    root: str | Path,
    corruptions: tuple[str, ...] = ("fog", "pixelate"),
    severities: tuple[int, ...] = (5,),
    per_class: int = 2,
    size: tuple[int, int] = (32, 32),
    broken: tuple[str, ...] = ("ILSVRC2012_val_00000002",),
) -> Fixture:
    """Released ImageNet-C layout ``<corruption>/<severity>/<wnid>/*.JPEG`` (the same files in each)."""
    root = Path(root)
    fx = Fixture(root)
    for i in range(per_class * len(IMAGENET_WNIDS)):
        stem, wnid = f"ILSVRC2012_val_{i + 1:08d}", IMAGENET_WNIDS[i % len(IMAGENET_WNIDS)]
        kind = "broken" if stem in broken else KINDS[i % len(KINDS)]
        for c in corruptions:
            for s in severities:
                write_image(root / c / str(s) / wnid / f"{stem}.JPEG", image_pixels(size, i), kind)
        fx.keys.append(stem)
        fx.labels[stem], fx.kinds[stem] = wnid, kind
        if kind == "broken":
            fx.broken.append(stem)
    fx.keys.sort()
    return fx


def drain(datamodule: BenchmarkDataModule) -> list[Sample]:
    """Run a datamodule's predict loader as a Trainer would (``setup``, batches, skip counting).

    Returns:
        Every sample of every batch, in order; the skips are in ``datamodule.skipped``.

    """
    datamodule.setup("predict")
    samples = []
    for batch in datamodule.predict_dataloader():
        samples += datamodule.on_before_batch_transfer(batch, 0)
    return samples
