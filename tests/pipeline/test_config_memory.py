"""Every shipped predict config fits an 80 GB GPU by the trace's memory model, the weights counted.

Each config (``configs/demo.yaml``, ``configs/paper/**``, ``configs/ablations/*``, and each
``configs/data/*.yaml`` on the predict defaults) and each of its grid variants is read by the CLI's own
parser, as its header's command composes it (later files override earlier ones). Its trace batch is
what the module would use on an 80 GB GPU: ``model.init_args.trace_batch`` if set, else what
:func:`dexar.trace.memory.samples_per_trace` fits beside the weights; at batch size or fewer samples.
A config fails when even that trace does not fit: one sample too big, or a ``trace_batch`` too large.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule

from dexar.methods import build_method
from dexar.pipeline import experiments as grid
from dexar.shapes.model import SHAPES_CHECKPOINT
from dexar.trace.memory import (
    CHECKPOINTS,
    HEADROOM,
    Checkpoint,
    ModelDims,
    memory_plan,
    retained_bytes,
    samples_per_trace,
    trace_peak_bytes,
)
from train_eval import DEFAULT_CONFIGS, DexarCLI

ROOT = Path(__file__).resolve().parents[2]
GPU_BYTES = 80 * 10**9
PROMPT_TOKENS = 64
"""Text tokens besides the image and the answer (chat template and prompt; the paper's prompts are short)."""
CONFIGS = [ROOT / "configs" / "demo.yaml", *sorted((ROOT / "configs" / "paper").rglob("*.yaml"))]
CONFIGS += sorted((ROOT / "configs" / "ablations").glob("*.yaml"))
DATA_CONFIGS = sorted((ROOT / "configs" / "data").glob("*.yaml"))


class _ParseOnly(DexarCLI):
    """The predict CLI's parser, default configs and composition, with nothing instantiated (no checkpoint loads)."""

    def before_instantiate_classes(self) -> None:
        """Skip the data and checkpoint checks: the paper's datasets and checkpoints are not on this machine."""

    def instantiate_classes(self) -> None:
        """Parse only."""


def _composed(path: Path) -> dict:
    """``path`` as its header's command runs it (``experiments.composition``), parsed by the CLI's own parser.

    ``train_eval.py predict`` reads its default configs (``configs/base/predict.yaml``, ``configs/demo.yaml``)
    first, then each ``--config`` in order.
    """
    args = [arg for part in grid.composition(path) for arg in ("--config", str(part))]
    cli = _ParseOnly(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"default_config_files": DEFAULT_CONFIGS["predict"]},
        run=False,
        args=args,
    )
    return cli.config.as_dict()


def _variants(config: dict) -> list[tuple[str, dict]]:
    axes = grid.parse_grid((config.get("experiment") or {}).get("grid"))
    if not axes:
        return [("", config)]
    out = []
    for variant in grid.variants(axes):
        resolved = copy.deepcopy(config)
        for key, value in grid.settings_of(axes, variant).items():
            grid.set_dotted(resolved, key, value)
        out.append((grid.slug(variant), resolved))
    return out


def _shapes_checkpoint() -> Checkpoint:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(SHAPES_CHECKPOINT)
    weights = sum(p.stat().st_size for p in Path(SHAPES_CHECKPOINT).glob("*.safetensors"))
    return Checkpoint(ModelDims.from_config(config.text_config), config.image_seq_length, weights // 4)


def trace_memory(config: dict) -> dict[str, Any]:
    """The memory figures of one resolved config on an 80 GB GPU (bytes)."""
    model = config.get("model", {}).get("init_args", {})
    name = model.get("model") or SHAPES_CHECKPOINT
    checkpoint = _shapes_checkpoint() if name in (SHAPES_CHECKPOINT, "shapes") else CHECKPOINTS[name]
    dtype = getattr(torch, model.get("dtype", "float32"))
    weights = checkpoint.parameters * torch.empty((), dtype=dtype).element_size()
    batch = int(config["data"]["init_args"]["batch_size"])
    answer = int(model.get("max_new_tokens", 32))
    tokens = checkpoint.image_tokens + PROMPT_TOKENS + answer
    methods = [
        build_method(o.get("method", label), **{k: v for k, v in o.items() if k != "method"})
        for label, o in ((label, dict(o or {})) for label, o in (model.get("methods") or {"dexar": {}}).items())
    ]
    needs = frozenset().union(*(m.needs for m in methods))
    if checkpoint.architecture != "decoder":  # DEX-AR-type needs only (the others are refused): bounded by default
        needs = frozenset()
    plan = memory_plan(needs)
    probe = any("attention_probes" in getattr(m, "probe_needs", ()) for m in methods)
    one = trace_peak_bytes(checkpoint.dims, tokens, answer, 1, plan, dtype)
    if probe:
        after = retained_bytes(checkpoint.dims, tokens, answer, plan, dtype)
        one = max(one, after + trace_peak_bytes(checkpoint.dims, tokens, answer, 1, "probe", dtype))
    free = GPU_BYTES - weights
    per_trace = model.get("trace_batch") or samples_per_trace(checkpoint.dims, tokens, answer, plan, dtype, free, probe)
    per_trace = min(per_trace, batch)
    return {"weights": weights, "one": one, "per_trace": per_trace, "total": weights + per_trace * one, "plan": plan}


def _cases() -> list[tuple[str, dict]]:
    cases = []
    for path in CONFIGS:
        for slug, config in _variants(_composed(path)):
            cases.append((f"{path.relative_to(ROOT)}{':' + slug if slug else ''}", config))
    for path in DATA_CONFIGS:
        cases.append((f"predict + {path.relative_to(ROOT)}", _composed(path)))
    return cases


CASES = _cases()


@pytest.mark.parametrize("name, config", CASES, ids=[name for name, _ in CASES])
def test_shipped_config_fits_80_gb(name, config):
    figures = trace_memory(config)
    assert figures["total"] <= GPU_BYTES, (
        f"{name}: {figures['plan']} trace of {figures['per_trace']} sample(s) needs "
        f"{figures['per_trace'] * figures['one'] / 1e9:.1f} GB + {figures['weights'] / 1e9:.1f} GB of weights > 80 GB"
    )
    if not config["model"]["init_args"].get("trace_batch"):  # sized from the free memory: that is what it fills
        assert figures["per_trace"] * figures["one"] <= HEADROOM * (GPU_BYTES - figures["weights"])


def test_every_shipped_config_is_covered():
    assert len(CASES) >= len(CONFIGS) + len(DATA_CONFIGS)
    assert any("chefercam" in (c["model"]["init_args"].get("methods") or {}) for _, c in CASES)


def test_a_config_that_cannot_fit_fails():
    """LLaVA-NeXT with every method at 8 samples per trace, and a model whose one sample is too big."""
    config = _composed(ROOT / "configs" / "paper" / "table1_imagenet.yaml")
    config["model"]["init_args"]["model"] = "llava-hf/llava-v1.6-mistral-7b-hf"
    config["model"]["init_args"]["trace_batch"] = 8
    config["data"]["init_args"]["batch_size"] = 8
    assert trace_memory(config)["total"] > GPU_BYTES
    del config["model"]["init_args"]["trace_batch"]  # sized from the free memory: it fits
    assert trace_memory(config)["total"] <= GPU_BYTES
    config["model"]["init_args"]["max_new_tokens"] = 2048  # no trace batch can fit one sample of 4.5k tokens
    assert trace_memory(config)["total"] > GPU_BYTES
