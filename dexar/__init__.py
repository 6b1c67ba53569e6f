"""dexar: DEX-AR explanations for autoregressive vision-language models."""

from dexar.adapters import ADAPTERS, DexarInputError, get_adapter
from dexar.explain import Explainer, explain
from dexar.explanation import Explanation
from dexar.loading import load_model
from dexar.methods import METHODS, DexAR, build_method
from dexar.schema import Sample
from dexar.shapes.model import SHAPES_CHECKPOINT

__all__ = [
    "ADAPTERS",
    "METHODS",
    "SHAPES_CHECKPOINT",
    "DexAR",
    "DexarInputError",
    "Explainer",
    "Explanation",
    "Sample",
    "build_method",
    "explain",
    "get_adapter",
    "load_model",
]
