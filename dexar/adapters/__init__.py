"""Model adapters, chosen from ``config.model_type``."""

from __future__ import annotations

from typing import Any

from torch import nn

from dexar.adapters.base import DexarInputError, TeacherForcedBatch, VLMAdapter
from dexar.adapters.florence2 import Florence2Adapter
from dexar.adapters.idefics3 import Idefics3Adapter
from dexar.adapters.llava import LlavaAdapter
from dexar.adapters.llava_next import LlavaNextAdapter
from dexar.adapters.paligemma import PaliGemmaAdapter
from dexar.adapters.qwen2_vl import Qwen2VLAdapter

ADAPTERS: dict[str, type[VLMAdapter]] = {
    t: cls for cls in (LlavaAdapter, Qwen2VLAdapter, LlavaNextAdapter, Idefics3Adapter) for t in cls.model_types
}
ADAPTERS.update({t: cls for cls in (PaliGemmaAdapter, Florence2Adapter) for t in cls.model_types})


def get_adapter(model: nn.Module, processor: Any) -> VLMAdapter:
    """Return the adapter for ``model.config.model_type``.

    Raises:
        DexarInputError: The model type is not supported; the message lists the supported ones.

    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise DexarInputError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type](model, processor)


__all__ = ["ADAPTERS", "DexarInputError", "LlavaAdapter", "TeacherForcedBatch", "VLMAdapter", "get_adapter"]
