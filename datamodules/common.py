"""Building blocks shared by the benchmark datamodules (ImageNet, VQAv2, PascalVOC, ImageNet-C).

Every benchmark dataset is a map-style :class:`BenchmarkDataset` over a small, picklable list of
records fixed at ``setup``. ``__getitem__`` decodes one image exactly once and returns a
:class:`~dexar.schema.Sample`, or a :class:`Skipped` marker when the file cannot be read.
:func:`collate_skipping` drops the markers and keeps their ids on the batch
(:class:`SampleBatch`), so the count survives DataLoader worker processes; the datamodule adds them
up in the main process (:attr:`BenchmarkDataModule.skipped`).
"""

from __future__ import annotations

import io
import logging
import os
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dexar.schema import Sample

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
SPLIT_ALIASES = {"val": ("val", "validation"), "validation": ("validation", "val")}


class DatasetLayoutError(FileNotFoundError):
    """The dataset root is missing or not in a layout the datamodule understands."""


def layout_error(dataset: str, problem: str, layouts: Sequence[str]) -> DatasetLayoutError:
    """A two-line error: what is wrong (with the path), then every layout that is understood.

    Two lines, so that ``train_eval.py`` prints the whole error in at most three (README "Datasets" has the
    long form of each layout).
    """
    return DatasetLayoutError(f"{dataset}: {problem}.\nLayouts understood (--data.root ROOT): " + " | ".join(layouts))


@dataclass(frozen=True)
class Skipped:
    """Marker returned instead of a sample whose files could not be read.

    Attributes:
        id: Id the sample would have had.
        reason: Exception type and message.
        index: The sample's dataset index (what a sampler yielded for it).

    """

    id: str
    reason: str
    index: int = -1


class SampleBatch(list):
    """A batch: the list of readable samples, plus ``skipped``, the markers of unreadable ones."""

    def __init__(self, samples: Iterable[Sample] = (), skipped: Iterable[Skipped] = ()) -> None:
        super().__init__(samples)
        self.skipped: list[Skipped] = list(skipped)


def collate_skipping(items: list[Sample | Skipped]) -> SampleBatch:
    """Collate function: keep the samples, move :class:`Skipped` markers to ``batch.skipped``."""
    return SampleBatch(
        [x for x in items if not isinstance(x, Skipped)],
        [x for x in items if isinstance(x, Skipped)],
    )


def load_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode an image file (path or encoded bytes) once and return it in RGB.

    Grayscale, CMYK, palette (with or without transparency), alpha and 16-bit images are converted;
    alpha is dropped. Pixels are used as stored (no EXIF rotation), so they stay aligned with masks.
    A truncated or corrupt file raises (``OSError`` and friends): callers turn that into a skip.
    """
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    elif image.mode.startswith("I;16") or image.mode in ("I", "F"):
        scale = 257.0 if image.mode.startswith("I;16") else 1.0
        pixels = np.asarray(image, dtype=np.float64) / scale
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (``.ipynb_checkpoints``, ``._x.JPEG``): never dataset content."""
    return name.startswith(".")


def image_files(folder: str | Path) -> list[os.DirEntry]:
    """Image files directly in ``folder`` (``.jpeg``/``.jpg``/``.png``, any case, not hidden), unsorted."""
    with os.scandir(folder) as entries:
        return [
            e
            for e in entries
            if not is_hidden(e.name) and e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
        ]


def subfolders(folder: str | Path) -> list[str]:
    """Names of the folders directly in ``folder``, sorted, hidden ones (``.ipynb_checkpoints``) left out."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not is_hidden(e.name) and e.is_dir())


def name_some(names: Sequence[str], limit: int = 3) -> str:
    """``a, b, c`` or ``a, b, c and 4 more``: names for a one-line message."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def seeded_subset(size: int, num_samples: int | None, seed: int) -> list[int]:
    """Sorted indices of a seeded random subset of ``range(size)``; ``None`` keeps everything.

    The subset depends only on ``(size, num_samples, seed)`` and is computed before any sharding,
    so every process and run sees the same ids; a smaller subset is contained in a larger one.
    """
    if num_samples is None or num_samples >= size:
        return list(range(size))
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive or None (all), got {num_samples}")
    return sorted(np.random.default_rng(seed).permutation(size)[:num_samples].tolist())


def article(word: str) -> str:
    """``an`` before a vowel letter, else ``a`` (a spelling rule; good enough for class names)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def render_template(template: str, fields: dict[str, Any], content_fields: Iterable[str]) -> tuple[str, list[bool]]:
    """Fill a ``str.format`` template and label each whitespace word as content or filler.

    A word is content if any of its characters comes from a field in ``content_fields``; literal text
    and other fields are filler.

    Returns:
        The text and one flag per ``text.split()`` word.

    """
    content = set(content_fields)
    text, flags = "", []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        text += literal
        flags += [False] * len(literal)
        if name is None:
            continue
        if name not in fields:
            raise KeyError(f"template {template!r} uses unknown field {{{name}}}; known: {sorted(fields)}")
        value = fields[name]
        value = repr(value) if conversion == "r" else value
        value = format(value, spec or "")
        text += value
        flags += [name in content] * len(value)
    words = [any(flags[m.start() : m.end()]) for m in re.finditer(r"\S+", text)]
    return text, words


def split_aliases(split: str) -> tuple[str, ...]:
    """Names a split goes by (``val`` is ``validation`` on the Hugging Face hub)."""
    return SPLIT_ALIASES.get(split, (split,))


class BenchmarkDataset(Dataset):
    """Map-style dataset over fixed records; unreadable samples come back as :class:`Skipped`.

    Subclasses set ``self.records`` (picklable, small) and implement :meth:`sample_id` and
    :meth:`load`.
    """

    records: list[Any]

    def __len__(self) -> int:
        return len(self.records)

    def sample_id(self, index: int) -> str:
        """Id of sample ``index`` (known without reading any file)."""
        raise NotImplementedError

    def load(self, index: int) -> Sample:
        """Read and decode sample ``index``; may raise on unreadable files."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample | Skipped:
        try:
            return self.load(index)
        except Exception as err:  # a bad file must not stop the run: the collate counts it
            return Skipped(self.sample_id(index), f"{type(err).__name__}: {err}", index)

    @property
    def ids(self) -> list[str]:
        """Ids of all samples, in order."""
        return [self.sample_id(i) for i in range(len(self))]


class BenchmarkDataModule(L.LightningDataModule):
    """Base of the benchmark datamodules: builds the dataset at ``setup``, serves it to ``predict``.

    Subclasses call ``save_hyperparameters()`` (their arguments are the config keys) and implement
    :meth:`build_dataset`. Unreadable samples are dropped from their batch and recorded here, in the
    main process, from the batch's ``skipped`` list (see :attr:`skipped`). Batches reach
    ``predict_step`` and prediction writers as the :class:`SampleBatch` the collate made (samples hold
    PIL images and NumPy masks: there is nothing to move to a device), so ``batch.skipped`` is there too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dataset: BenchmarkDataset | None = None
        self.skipped: list[tuple[str, str]] = []

    def build_dataset(self) -> BenchmarkDataset:
        """Index the files under ``root`` (raising :class:`DatasetLayoutError`) and build the dataset."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = self.build_dataset()

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        hp = self.hparams
        return DataLoader(
            self.dataset,
            batch_size=hp.batch_size,
            shuffle=False,
            num_workers=hp.num_workers,
            collate_fn=collate_skipping,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count and log the batch's unreadable samples (runs in the main process)."""
        for marker in getattr(batch, "skipped", ()):
            self.skipped.append((marker.id, marker.reason))
            log.warning("skipped unreadable sample %s (%s)", marker.id, marker.reason)
        return batch

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """Keep the batch as it is (PIL images, NumPy masks; the explainer moves its own tensors)."""
        return batch

    @property
    def num_skipped(self) -> int:
        """Number of unreadable samples met so far by this process."""
        return len(self.skipped)
