"""The sample schema shared by every datamodule and by the explainer.

Datamodules produce :class:`Sample` objects; the explainer consumes lists of them. Keeping the schema
in ``dexar`` means the method library depends on no datamodule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class Sample:
    """One image with its prompt and, optionally, ground truth for evaluation.

    Attributes:
        id: Stable identifier, unique within a dataset.
        image: The image, any PIL mode (converted to RGB when encoded).
        prompt: The user prompt, without the model's chat template.
        answer: Ground-truth answer text, or ``None`` to let the model generate.
        masks: ``(K, H, W)`` boolean object masks in the image's geometry, or ``None``.
        mask_labels: One label per mask (e.g. ``"red circle"``).
        word_is_content: Per whitespace-separated word of ``answer``: is it a content word?
        word_mask_index: Per word of ``answer``: index into ``masks`` of the object it names, or -1.
        ignore_mask: ``(H, W)`` boolean pixels excluded from every metric (e.g. VOC boundaries).
        meta: Free-form metadata (class, question type, corruption, ...).

    """

    id: str
    image: Image.Image
    prompt: str
    answer: str | None = None
    masks: np.ndarray | None = None
    mask_labels: list[str] = field(default_factory=list)
    word_is_content: list[bool] | None = None
    word_mask_index: list[int] | None = None
    ignore_mask: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def union_mask(self) -> np.ndarray | None:
        """Union of all object masks, ``(H, W)`` bool, or ``None`` without masks."""
        if self.masks is None:
            return None
        return self.masks.any(axis=0)


def collate_samples(samples: list[Sample]) -> list[Sample]:
    """Collate function for DataLoaders: a batch is simply the list of samples."""
    return list(samples)
