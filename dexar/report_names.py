"""Paper-style names of run attributes (methods, models, datasets, switches).

Shared by the report's tables (:mod:`dexar.report`) and figures (:mod:`dexar.report_plots`), so that
neither imports the other's module back.
"""

from __future__ import annotations

DISPLAY = {
    "attention": "Attention",
    "rollout": "Rollout",
    "gradcam": "GradCAM",
    "chefercam": "CheferCAM",
    "attngrad": "AttnGrad",
    "integrated_gradients": "Int.Grad",
    "rise": "RISE",
    "iia": "IIA",
    "tam": "TAM",
    "tam_authors": "TAM (authors' indexing)",
    "dexar": "DEX-AR",
    "llava-1.5": "LLaVA-1.5",
    "bakllava": "BakLLaVA-v1",
    "paligemma": "PaliGemma",
    "florence-2": "Florence-2",
    "shapes": "Shapes",
    "imagenet": "ImageNet",
    "vqav2": "VQAv2",
    "true": "✓",
    "false": "✗",
    "on": "✓",
    "off": "✗",
}


def display(value: str) -> str:
    """Paper-style name of an attribute value (``dexar_top05`` → ``top-0.05``, ``dexar_max`` → ``max``).

    A ``_nofiller`` suffix (the filler filter off) reads ``(filler ✗)``.
    """
    if value in DISPLAY:
        return DISPLAY[value]
    if value.endswith("_nofiller"):
        return f"{display(value.removesuffix('_nofiller'))} (filler ✗)"
    if value.startswith("dexar_top") and value[9:].isdigit():
        return f"top-{int(value[9:]) / 100:g}"
    if value.startswith("dexar_"):
        return value[6:]
    return value
