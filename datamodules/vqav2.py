"""VQAv2 (val): the official question/annotation JSON files with COCO images, or a Hugging Face source.

Question–answer pairs are sorted by ``question_id`` in every layout, so one seed picks the same pairs
from the official files and from a hub copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.common import BenchmarkDataModule, BenchmarkDataset, layout_error, load_rgb, seeded_subset
from datamodules.hf import HF_LAYOUT, arrow_column, encoded_images, image_source, is_hf_root, open_hf_split
from datamodules.hf import require_columns as missing_columns
from dexar.schema import Sample

HF_REQUIRED = ("image", "question", "question_id", "multiple_choice_answer")
HF_OPTIONAL = ("question_type", "answer_type", "image_id", "answers")


def vqav2_layouts(split: str) -> list[str]:
    """Human-readable descriptions of the understood VQAv2 layouts (for error messages)."""
    year = f"{split}2014"
    return [
        f"ROOT/v2_OpenEnded_mscoco_{year}_questions.json + ROOT/v2_mscoco_{year}_annotations.json + "
        f"ROOT/{year}/COCO_{year}_<image_id:012d>.jpg (also in ROOT/Questions, ROOT/Annotations, ROOT/Images/mscoco)",
        HF_LAYOUT.format(columns="columns image, question, question_id, multiple_choice_answer"),
    ]


@dataclass(frozen=True)
class VQARecord:
    """One question–answer pair (everything but the image pixels).

    Attributes:
        question_id: VQAv2 question id.
        image_id: COCO image id (``-1`` if unknown).
        question: The question (the prompt).
        answer: ``multiple_choice_answer``, the most frequent of the ten human answers.
        question_type: e.g. ``"what color is the"``.
        answer_type: ``yes/no``, ``number`` or ``other``.
        answers: The ten human answers.
        image: Image path, or the row of the Hugging Face dataset.

    """

    question_id: int
    image_id: int
    question: str
    answer: str
    question_type: str | None
    answer_type: str | None
    answers: tuple[str, ...]
    image: str | int


def _first_file(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def index_vqav2(
    root: str | Path, split: str, num_samples: int | None, seed: int, cache_dir: str | None = None
) -> tuple[list[VQARecord], Any, str]:
    """Index VQAv2 and draw the seeded subset of question–answer pairs.

    Returns:
        The subset's records (sorted by question id), the encoded-image Hugging Face dataset (or
        ``None``) and the layout name (``official`` or ``hf``).

    Raises:
        DatasetLayoutError: ``root`` is missing or in no understood layout.

    """
    root = Path(root)
    layouts = vqav2_layouts(split)
    if not root.is_dir():
        raise layout_error("VQAv2", f"dataset root {root} does not exist", layouts)
    if is_hf_root(root, split):
        return _index_hf(root, split, num_samples, seed, cache_dir, layouts)
    year = f"{split}2014"
    q_name, a_name = f"v2_OpenEnded_mscoco_{year}_questions.json", f"v2_mscoco_{year}_annotations.json"
    questions_file = _first_file([root / q_name, root / "Questions" / q_name])
    annotations_file = _first_file([root / a_name, root / "Annotations" / a_name])
    image_dir = next((d for d in (root / year, root / "Images" / "mscoco" / year) if d.is_dir()), None)
    for found, expected in ((questions_file, q_name), (annotations_file, a_name), (image_dir, year)):
        if found is None:
            raise layout_error("VQAv2", f"{root / expected} not found", layouts)
    assert questions_file and annotations_file and image_dir
    try:
        questions = json.loads(questions_file.read_text(encoding="utf-8"))["questions"]
        annotations = json.loads(annotations_file.read_text(encoding="utf-8"))["annotations"]
    except (KeyError, ValueError) as err:
        raise layout_error("VQAv2", f"unreadable question/annotation JSON ({err})", layouts) from None
    by_id = {a["question_id"]: a for a in annotations}
    questions = sorted(questions, key=lambda q: q["question_id"])
    unanswered = [q["question_id"] for q in questions if q["question_id"] not in by_id]
    if unanswered:
        raise layout_error(
            "VQAv2",
            f"{len(unanswered)} questions (e.g. {unanswered[0]}) have no annotation in {annotations_file}",
            layouts,
        )
    records = []
    for i in seeded_subset(len(questions), num_samples, seed):
        q = questions[i]
        a = by_id[q["question_id"]]
        records.append(
            VQARecord(
                question_id=int(q["question_id"]),
                image_id=int(q["image_id"]),
                question=q["question"],
                answer=a["multiple_choice_answer"],
                question_type=a.get("question_type"),
                answer_type=a.get("answer_type"),
                answers=tuple(x["answer"] for x in a.get("answers", [])),
                image=str(image_dir / f"COCO_{year}_{int(q['image_id']):012d}.jpg"),
            )
        )
    return records, None, "official"


def _index_hf(
    root: Path, split: str, num_samples: int | None, seed: int, cache_dir: str | None, layouts: list[str]
) -> tuple[list[VQARecord], Any, str]:
    try:
        ds, _ = open_hf_split(root, split, cache_dir)
    except FileNotFoundError as err:
        raise layout_error("VQAv2", str(err), layouts) from None
    missing = missing_columns(ds, HF_REQUIRED)
    if missing:
        raise layout_error("VQAv2", f"the dataset under {root} has no column(s) {missing}", layouts)
    qids = arrow_column(ds, "question_id").to_pylist()
    order = sorted(range(len(qids)), key=lambda row: qids[row])
    rows = [order[i] for i in seeded_subset(len(order), num_samples, seed)]
    columns = [c for c in HF_REQUIRED + HF_OPTIONAL if c in ds.column_names and c != "image"]
    table = ds.select_columns(columns).select(rows).to_list()
    records = []
    for row, r in zip(rows, table, strict=True):
        answers = r.get("answers") or []
        records.append(
            VQARecord(
                question_id=int(r["question_id"]),
                image_id=int(r["image_id"]) if r.get("image_id") is not None else -1,
                question=r["question"],
                answer=r["multiple_choice_answer"],
                question_type=r.get("question_type"),
                answer_type=r.get("answer_type"),
                answers=tuple(a["answer"] if isinstance(a, dict) else str(a) for a in answers),
                image=row,
            )
        )
    return records, encoded_images(ds), "hf"


class VQAv2Dataset(BenchmarkDataset):
    """Seeded VQAv2 question–answer pairs; the prompt is the question, the answer ``multiple_choice_answer``.

    Args:
        records: The pairs (see :func:`index_vqav2`).
        root: Dataset root (resolves relative image paths of a Hugging Face source).
        hf: Encoded-image Hugging Face dataset when records refer to its rows.
        split: Split name, part of the sample ids.
        layout: Layout name, kept in ``meta``.

    """

    def __init__(
        self, records: list[VQARecord], root: Path, hf: Any = None, split: str = "val", layout: str = ""
    ) -> None:
        self.records, self.root, self.hf, self.split, self.layout = records, root, hf, split, layout

    def sample_id(self, index: int) -> str:
        return f"vqav2-{self.split}-{self.records[index].question_id}"

    def load(self, index: int) -> Sample:
        r: VQARecord = self.records[index]
        image = load_rgb(image_source(self.hf[r.image]["image"], self.root) if isinstance(r.image, int) else r.image)
        return Sample(
            id=self.sample_id(index),
            image=image,
            prompt=r.question,
            answer=r.answer,
            meta={
                "dataset": "vqav2",
                "index": index,
                "question_id": r.question_id,
                "image_id": r.image_id,
                "question_type": r.question_type,
                "answer_type": r.answer_type,
                "answers": list(r.answers),
                "layout": self.layout,
            },
        )


class VQAv2DataModule(BenchmarkDataModule):
    """VQAv2 (val) question–answer pairs for perturbation metrics (paper section 4.1).

    Layouts under ``root`` (detected at ``setup``): the official
    ``v2_OpenEnded_mscoco_<split>2014_questions.json`` + ``v2_mscoco_<split>2014_annotations.json`` +
    ``<split>2014/COCO_<split>2014_<image_id:012d>.jpg``; or a Hugging Face ``save_to_disk`` directory or
    parquet files with columns ``image``, ``question``, ``question_id``, ``multiple_choice_answer`` (and
    ``question_type``, ``answer_type``, ``image_id``, ``answers`` when present). ``question_type`` and
    ``answer_type`` are kept in ``Sample.meta`` so that results can be broken down by them.

    Args:
        root: Dataset root (see the layouts above).
        split: ``val`` (``val2014`` files; ``validation`` on the hub) or another split with answers.
        num_samples: Size of the seeded random subset of pairs (paper: 1,000); ``None`` keeps all.
        seed: Seed of the subset (the same ids on any number of processes).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (images are decoded there).
        cache_dir: Where ``datasets`` keeps its Arrow copy of parquet files (default: its cache).

    """

    def __init__(
        self,
        root: str,
        split: str = "val",
        num_samples: int | None = 1000,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 2,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def build_dataset(self) -> VQAv2Dataset:
        hp = self.hparams
        records, hf, layout = index_vqav2(hp.root, hp.split, hp.num_samples, hp.seed, hp.cache_dir)
        return VQAv2Dataset(records, Path(hp.root), hf, hp.split, layout)
