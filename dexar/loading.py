"""Loading a VLM and its processor from a local directory or the Hugging Face cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from dexar.adapters import ADAPTERS, DexarInputError
from dexar.adapters.processing import ImageTextProcessor

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16`` (and friends); a clear error for unknown names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DexarInputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a supported VLM and its processor with SDPA attention, in eval mode.

    Args:
        name_or_path: Local checkpoint directory or a hub id already in the local cache.
        dtype: Parameter dtype (``float32``, ``bfloat16``, ``float16``, ``float64``).
        device: Device to place the model on.
        trust_remote_code: Allow a checkpoint's own code (off by default; no supported family needs it).

    Raises:
        DexarInputError: The checkpoint cannot be found or is not a supported family.

    """
    source = str(name_or_path)
    try:
        try:
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        except ImportError:
            # Qwen2-VL / SmolVLM processors also build a video processor, which needs torchvision; the
            # adapters use only the tokenizer and the image processor.
            processor = ImageTextProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=resolve_dtype(dtype), attn_implementation="sdpa", trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        where = "local directory" if Path(source).exists() else "local directory or Hugging Face cache entry"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DexarInputError(f"cannot load model {source!r} ({where}): {first}") from err
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise DexarInputError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return model.to(device).eval(), processor
