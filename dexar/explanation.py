"""The :class:`Explanation` of one sample: per-token maps, token weights, sequence map."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class Explanation:
    """What a method says about one answer.

    Attributes:
        tokens: Answer tokens as text.
        token_ids: Answer token ids.
        token_maps: ``(T, h, w)`` per-token maps in [0, 1].
        token_weights: ``(T,)`` weights of the tokens in the sequence map (λ_t for DEX-AR).
        sequence_map: ``(h, w)`` sequence map in [0, 1].
        inputs: The exact teacher-forced model inputs (unpadded, batch dim 1) that were traced.
        answer_positions: ``(T,)`` indices in ``inputs["input_ids"][0]`` of the answer tokens.
        method: Method name.
        options: Method options.
        token_empty: ``(T,)`` True where a token had no visual evidence (its map is zero).
        sequence_empty: True where the sequence map had no visual evidence (it is zero).
        answer: Answer text.
        image: The explained image (for overlays), if kept.
        sample_id: Id of the sample, if any.

    """

    tokens: list[str]
    token_ids: list[int]
    token_maps: torch.Tensor
    token_weights: torch.Tensor
    sequence_map: torch.Tensor
    inputs: dict[str, torch.Tensor]
    answer_positions: torch.Tensor
    method: str = "dexar"
    options: dict[str, Any] = field(default_factory=dict)
    token_empty: torch.Tensor | None = None
    sequence_empty: bool = False
    answer: str = ""
    image: Image.Image | None = None
    sample_id: str | None = None

    def upsample(self, size: tuple[int, int]) -> Explanation:
        """Bilinearly upsample every map to ``size = (height, width)``; returns a new Explanation."""
        maps = torch.cat([self.token_maps, self.sequence_map[None]], dim=0)[:, None].float()
        up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]
        return replace(
            self, token_maps=up[:-1].to(self.token_maps.dtype), sequence_map=up[-1].to(self.sequence_map.dtype)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary: tokens, weights, flags, method and options."""
        empty = self.token_empty.tolist() if self.token_empty is not None else [False] * len(self.tokens)
        return {
            "sample_id": self.sample_id,
            "method": self.method,
            "options": self.options,
            "answer": self.answer,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "token_weights": [float(w) for w in self.token_weights],
            "token_empty": [bool(e) for e in empty],
            "sequence_empty": bool(self.sequence_empty),
            "answer_positions": self.answer_positions.tolist(),
            "grid": list(self.sequence_map.shape),
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``sequence.png`` (overlay), ``tokens.png`` (per-token strip), ``explanation.json``."""
        from dexar.plotting import overlay, token_strip

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "explanation.json").write_text(json.dumps(self.to_dict(), indent=2))
        if self.image is not None:
            overlay(self.image, self.sequence_map, caption=self.answer).save(directory / "sequence.png")
            token_strip(self.image, self.token_maps, self.tokens, self.token_weights).save(directory / "tokens.png")
        return directory
