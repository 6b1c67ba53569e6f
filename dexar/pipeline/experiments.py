r"""Ablation grids: a paper config declares axes of settings; each combination is one run (one variant).

A config's top-level ``experiment`` section names the paper table and declares the grid::

    experiment:
      table: table3                      # which `dexar report` table the runs feed
      attrs: {dataset: pascal_voc}       # fixed attributes of every run (used to place results)
      grid:
        model:                           # axis: label -> settings (dotted config keys)
          llava-1.5: {model.init_args.model: llava-hf/llava-1.5-7b-hf}
          bakllava: {model.init_args.model: llava-hf/bakLlava-v1-hf}
        head_filter:                     # shorthand: one key (or a list of keys), labels = str(value)
          key: model.init_args.methods.dexar.head_filter
          values: [none, max, top-0.05, avg]

A paper config holds only what differs from the configs it is composed on: ``configs/base/predict.yaml``
(trainer, logger, callbacks) and, for a real dataset, ``configs/data/<dataset>.yaml``. Its header gives the
command, every ``--config`` in order (:func:`composition` reads it), e.g.::

    # Run:   python train_eval.py predict --config configs/base/predict.yaml --config configs/data/pascal_voc.yaml \
    #            --config configs/paper/table3_head_filter.yaml --data.root <path>

A run selects a variant with ``--variant.<axis> <label>`` (what ``dexar grid`` prints and what a W&B
sweep agent passes); :func:`apply_variant` writes its settings into the parsed config, gives it its own
run directory ``<default_root_dir>/<axis>-<label>_...`` and, with a ``WandbLogger``, a run name and one
tag per setting in the table's W&B group.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class GridError(ValueError):
    """A grid or variant declaration is invalid (the message names the file or key at fault)."""


@dataclass(frozen=True)
class Axis:
    """One grid axis: level label → the dotted config keys it sets."""

    name: str
    levels: dict[str, dict[str, Any]]


def label_of(value: Any) -> str:
    """The label of a shorthand value: ``true``/``false`` for booleans, ``none`` for null, else ``str``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return str(value)


def parse_grid(grid: Mapping[str, Any] | None, source: str = "config") -> list[Axis]:
    """Validate ``experiment.grid`` and return its axes in declaration order.

    Raises:
        GridError: An axis is neither ``{key, values}`` nor a mapping of labels to settings.
    """
    axes = []
    for name, spec in (grid or {}).items():
        where = f"{source}: experiment.grid.{name}"
        if not isinstance(spec, Mapping) or not spec:
            raise GridError(f"{where}: expected {{key: ..., values: [...]}} or {{label: {{dotted.key: value}}}}")
        if "values" in spec:
            keys = spec.get("key")
            keys = [keys] if isinstance(keys, str) else keys
            if not keys or not all(isinstance(k, str) for k in keys) or not isinstance(spec["values"], list):
                raise GridError(f"{where}: shorthand needs 'key' (dotted key or list of keys) and a 'values' list")
            levels = {label_of(v): {k: v for k in keys} for v in spec["values"]}
            if len(levels) != len(spec["values"]):
                raise GridError(f"{where}: values must have distinct labels")
        else:
            levels = {}
            for label, settings in spec.items():
                if not isinstance(settings, Mapping) or not settings:
                    raise GridError(f"{where}.{label}: expected a mapping of dotted config keys to values")
                levels[str(label)] = dict(settings)
        axes.append(Axis(str(name), levels))
    return axes


def variants(axes: Sequence[Axis]) -> list[dict[str, str]]:
    """Every combination of levels, as ``{axis: label}`` (first axis varies slowest)."""
    names = [a.name for a in axes]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*[a.levels for a in axes])]


def settings_of(axes: Sequence[Axis], variant: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """The dotted-key settings of a variant.

    Raises:
        GridError: Unknown axis or label (the message lists the known ones).
    """
    by_name = {a.name: a for a in axes}
    out: dict[str, Any] = {}
    for name, label in variant.items():
        if name not in by_name:
            raise GridError(f"--variant.{name}: {source} has no grid axis {name!r}; axes: {sorted(by_name) or 'none'}")
        levels = by_name[name].levels
        if str(label) not in levels:
            raise GridError(f"--variant.{name}: {label!r} is not a level of axis {name!r}; levels: {list(levels)}")
        out.update(levels[str(label)])
    return out


def slug(variant: Mapping[str, Any]) -> str:
    """Directory-safe name of a variant, e.g. ``model-llava-1.5_head_filter-top-0.05``."""
    text = "_".join(f"{k}-{v}" for k, v in variant.items())
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text) or "base"


def set_dotted(config: Any, key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested config (jsonargparse ``Namespace`` and/or dicts).

    Raises:
        GridError: A parent of the key does not exist.
    """
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, Mapping) or hasattr(node, "get") else None
        if child is None:
            raise GridError(f"grid key {key!r}: {'.'.join(parts[: i + 1])!r} is not in the config")
        node = child
    if isinstance(node, Mapping):
        node[parts[-1]] = value  # type: ignore[index]
    else:
        setattr(node, parts[-1], value)


def load_experiment(path: str | Path) -> dict[str, Any]:
    """The ``experiment`` section of a config file (empty if none)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise GridError(f"{path}: cannot read config ({err})") from None
    experiment = data.get("experiment") or {}
    if not isinstance(experiment, Mapping):
        raise GridError(f"{path}: 'experiment' must be a mapping")
    return dict(experiment)


HEADER_COMMAND = re.compile(r"train_eval\.py predict\b(.*)")
HEADER_CONFIG = re.compile(r"--config\s+(\S+)")


def composition(config: str | Path) -> list[str]:
    r"""The config files ``config`` is run with, in ``--config`` order and ending with ``config`` itself.

    They are the ``--config`` flags of the first ``train_eval.py predict`` command in the file's leading
    comment (lines ending in ``\`` continue it), written relative to the repository root (the folder
    holding ``configs/``); each is returned as ``config`` was given: relative to the working directory
    when ``config`` is relative, else absolute. A config whose header names no config is run alone.

    Raises:
        GridError: The header's command does not end with the config itself, or names a missing file.
    """
    path = Path(config)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise GridError(f"{config}: cannot read config ({err})") from None
    comment = [line.lstrip("#").strip() for line in itertools.takewhile(lambda x: x.startswith("#"), lines)]
    command = ""
    for i, line in enumerate(comment):
        found = HEADER_COMMAND.search(line)
        if found:
            command = found[1]
            while command.rstrip().endswith("\\") and i + 1 < len(comment):
                i += 1
                command = command.rstrip()[:-1] + " " + comment[i]
            break
    named = [Path(c) for c in HEADER_CONFIG.findall(command)]
    if not named:
        return [str(config)]
    itself = named[-1].parts
    resolved = path.resolve()
    if resolved.parts[-len(itself) :] != itself:
        raise GridError(f"{config}: the header's command must end with --config {config} (it ends with {named[-1]})")
    root = Path(*resolved.parts[: -len(itself)])
    out = []
    for name in named[:-1]:
        if not (root / name).is_file():
            raise GridError(f"{config}: the header's command names {name}, which is not in {root}")
        out.append(str(root / name) if path.is_absolute() else os.path.relpath(root / name))
    return [*out, str(config)]


def config_flags(config: str | Path) -> list[str]:
    """``--config A --config B ... --config <config>``: the flags of :func:`composition`."""
    return [flag for name in composition(config) for flag in ("--config", name)]


def commands(config: str | Path, extra: Sequence[str] = (), program: str = "train_eval.py") -> list[list[str]]:
    """One ``predict`` command per variant of ``config``'s grid (just the config when it has none).

    Each starts with the ``--config`` flags of the config's :func:`composition`.
    """
    axes = parse_grid(load_experiment(config).get("grid"), str(config))
    base = ["python", program, "predict", *config_flags(config)]
    if not axes:
        return [base + list(extra)]
    out = []
    for variant in variants(axes):
        out.append(base + [a for name, label in variant.items() for a in (f"--variant.{name}", label)] + list(extra))
    return out


def shell(command: Sequence[str]) -> str:
    """A command as one copy-pasteable shell line."""
    return " ".join(shlex.quote(c) for c in command)


def sweep(config: str | Path, extra: Sequence[str] = (), program: str = "train_eval.py") -> dict[str, Any]:
    """A W&B sweep definition (``method: grid``) whose runs are the config's variants.

    ``wandb sweep FILE`` creates the sweep, ``wandb agent ID`` runs variants: the agent passes
    ``--variant.<axis>=<label>``, so each run gets the same directory, name and tags as with ``dexar grid``.
    """
    experiment = load_experiment(config)
    axes = parse_grid(experiment.get("grid"), str(config))
    if not axes:
        raise GridError(f"{config}: no experiment.grid to sweep over")
    return {
        "name": f"{experiment.get('table', Path(config).stem)}-{Path(config).stem}",
        "program": program,
        "method": "grid",
        "parameters": {f"variant.{a.name}": {"values": list(a.levels)} for a in axes},
        "command": ["${env}", "${interpreter}", "${program}", "predict", *config_flags(config), "${args}", *extra],
    }


def variant_record(config_paths: Sequence[str], experiment: Mapping[str, Any], variant: Mapping[str, str]) -> str:
    """JSON written as ``variant.json`` in a run directory: what `dexar report` needs to place its results."""
    return json.dumps(
        {
            "configs": list(config_paths),
            "table": experiment.get("table"),
            "attrs": dict(experiment.get("attrs") or {}),
            "variant": dict(variant),
        },
        indent=2,
    )


def apply_variant(config: Any) -> dict[str, Any] | None:
    """Apply ``config.variant`` (``{axis: label}``) to a parsed LightningCLI config, in place.

    Sets the variant's dotted keys, moves the run to ``<default_root_dir>/<slug>`` and, with a
    ``WandbLogger``, saves W&B files there, names the run ``<table>/<slug>`` and adds the table and one
    ``axis=label`` tag per setting. Writes nothing: ``callbacks.VariantRecord`` writes the returned record
    as the run directory's ``variant.json`` when the run starts.

    Returns:
        The ``variant.json`` record, or ``None`` when the config has no ``experiment`` section.

    Raises:
        GridError: A variant without a grid, an unknown axis or label, or a key missing from the config.
    """
    experiment = config.get("experiment") or {}
    variant = {str(k): str(v) for k, v in (config.get("variant") or {}).items()}
    sources = [str(p) for p in (config.get("config") or [])]
    source = sources[-1] if sources else "config"
    if not experiment:
        if variant:
            raise GridError(f"--variant given but {source} has no experiment.grid")
        return None
    axes = parse_grid(experiment.get("grid"), source)
    for key, value in settings_of(axes, variant, source).items():
        set_dotted(config, key, value)
    trainer = config.get("trainer")
    root = Path(trainer.get("default_root_dir") or ".")
    if variant:
        root = root / slug(variant)
        trainer.default_root_dir = str(root)
    table = str(experiment.get("table") or Path(source).stem)
    logger = trainer.get("logger")
    if logger is not None and not isinstance(logger, bool | list) and "Wandb" in str(logger.get("class_path", "")):
        args = logger.init_args
        args.save_dir = str(root)
        args.name = f"{table}/{slug(variant)}" if variant else table
        tags = list(args.get("tags") or [])
        tags += [t for t in [table, *(f"{k}={v}" for k, v in variant.items())] if t not in tags]
        args.tags = tags
    record = json.loads(variant_record(sources, experiment, variant))
    if axes and not variant:
        count = len(variants(axes))
        print(f"{source}: grid of {count} variants; this run is the base config. List them: dexar grid {source}")
    return record
