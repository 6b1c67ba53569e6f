"""A tokenizer + image processor pair standing in for a multimodal processor the environment cannot build.

``Qwen2VLProcessor`` and ``SmolVLMProcessor`` also hold a video processor, which needs ``torchvision``;
the adapters use only the tokenizer and the image processor, and expand the image placeholders
themselves, so this pair is all they need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer


@dataclass
class ImageTextProcessor:
    """The two parts of a processor the adapters use.

    Attributes:
        tokenizer: The model's tokenizer.
        image_processor: The model's image processor.

    """

    tokenizer: Any
    image_processor: Any

    def save_pretrained(self, directory: str | Path) -> None:
        """Save both parts into one checkpoint directory."""
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, source: str | Path, **kwargs: Any) -> ImageTextProcessor:
        """Load the tokenizer and the image processor saved in ``source``."""
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        return cls(tokenizer, AutoImageProcessor.from_pretrained(source, **kwargs))
