"""Seconds per image of every explanation method, relative to DEX-AR, on the same model and inputs.

Model: random LLaVA (by default 8 decoder layers, hidden 512, 8 heads, 576 image tokens = 24×24 grid
of a 336-px image, patch 14, as ``benchmarks/one_pass.py``), float32, SDPA; one table per
``--answer-tokens`` length. The paper's table 1 explains ImageNet class names and VQAv2 answers (a
few tokens: the default 5); 20 is a caption. Everything runs in one process, methods in turn on the
same inputs; each method's time is one :func:`dexar.trace.run` with its own needs plus the method
(median of ``--repeats``; the costly ones once), after one warm-up of everything, repeats taken
round-robin so that load changes hit every method alike. The last rows time the shared trace of several
methods against the sum of their separate runs. Ratios only: absolute times depend on the machine.

Costs: CheferCAM takes one backward per answer token (its ratio grows with the length); IG, RISE and
IIA take a fixed number of passes (``steps``, ``num_masks``); the others one trace.

    python benchmarks/methods.py [--repeats 3] [--answer-tokens 5 20] [--threads 2]
    python benchmarks/methods.py --set rise.num_masks=64 integrated_gradients.steps=16   # other budgets
    python benchmarks/methods.py --layers 2 --hidden 64 --grid 6 --answer-tokens 4   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ("dexar", "dexar_attn", "attention", "rollout", "gradcam", "attngrad", "tam")
COSTLY = ("chefercam", "integrated_gradients", "rise", "iia")
PAPER = {  # the paper's table 1 (LLaVA-1.5, ImageNet / VQAv2), seconds relative to DEX-AR
    "attention": 0.63,
    "gradcam": 0.93,
    "attngrad": 0.92,
    "chefercam": 8.7,
    "integrated_gradients": 11.5,
    "rise": 16.6,
    "iia": 21.5,
}


def _adapter(args):
    import torch

    from dexar.adapters import get_adapter
    from dexar.testing import random_llava

    model, processor = random_llava(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        grid=args.grid,
        patch=14,
        vision_hidden=64,
        vision_layers=1,
        dtype=torch.float32,
    )
    return get_adapter(model, processor)


def _batch(adapter, answer_tokens: int):
    from datamodules.shapes import make_shapes_sample

    sample = make_shapes_sample(0)
    words = ("i see a red circle and a blue square and a green triangle " * 8).split()
    answer_ids = adapter.tokenize_answer(" ".join(words))[:answer_tokens]
    prompt_ids, image_inputs = adapter.encode_prompts([sample.image], [sample.prompt])
    return adapter.build_batch(prompt_ids, [answer_ids], image_inputs)


def _overrides(pairs: list[str]) -> dict[str, dict[str, object]]:
    """``["rise.num_masks=64", ...]`` → ``{"rise": {"num_masks": 64}}`` (values parsed as YAML)."""
    import yaml

    out: dict[str, dict[str, object]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        method, dot, option = key.partition(".")
        if not (sep and dot and option):
            raise SystemExit(f"--set {pair!r}: expected METHOD.OPTION=VALUE")
        out.setdefault(method, {})[option] = yaml.safe_load(value)
    return out


def _methods(names, overrides):
    from dexar.methods import DexAR, build_method

    out = {}
    for name in names:
        options = overrides.get(name, {})
        if name == "dexar_attn":
            out[name] = DexAR(weight_by_attention=True, **options)
        else:
            out[name] = build_method(name, **options)
    return out


def _interleaved(fns: dict, repeats: dict[str, int]) -> dict[str, float]:
    """Median seconds of each function; one warm-up each, then repeats taken round-robin."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(max(repeats.values())):
        for name, fn in fns.items():
            if round_ < repeats[name]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _table(args, adapter, batch, methods, answer_tokens: int) -> None:
    from dexar.trace import run as run_trace

    def run(names):
        union = frozenset().union(*(methods[n].needs for n in names))
        trace = run_trace(adapter, batch, union)
        for n in names:
            methods[n](trace)

    shared = [n for n in methods if n in CHEAP or n == "chefercam"]
    fns = {name: (lambda name=name: run([name])) for name in methods}
    fns["shared"] = lambda: run(shared)
    repeats = {name: args.repeats if name in CHEAP else 1 for name in methods}
    repeats["shared"] = args.repeats
    seconds = _interleaved(fns, repeats)
    together = seconds.pop("shared")
    ref = seconds["dexar"]
    print(f"\nsequence: {batch.input_ids.shape[1]} tokens, {answer_tokens} answer tokens, {args.threads} threads")
    print(f"{'method':<22}{'s/image':>10}{'× DEX-AR':>10}{'paper ×':>9}")
    for name, sec in seconds.items():
        paper = f"{PAPER[name]:.2f}" if name in PAPER else "-"
        print(f"{name:<22}{sec:>10.3f}{sec / ref:>10.2f}{paper:>9}")
    separate = sum(seconds[n] for n in shared)
    print(f"one shared trace for {', '.join(shared)}: {together:.3f} s ({together / ref:.2f}× DEX-AR)")
    print(f"the same methods traced separately: {separate:.3f} s ({separate / ref:.2f}× DEX-AR)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--answer-tokens", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--grid", type=int, default=24)
    parser.add_argument("--methods", nargs="*", default=list(CHEAP + COSTLY))
    parser.add_argument("--set", nargs="*", default=[], metavar="METHOD.OPTION=VALUE", help="method options")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    methods = _methods(["dexar", *[m for m in args.methods if m != "dexar"]], _overrides(args.set))
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, {args.grid}x{args.grid} image grid")
    for name in COSTLY:
        if name in methods:
            print(f"  {name}: {dataclasses.asdict(methods[name])}")
    adapter = _adapter(args)
    for answer_tokens in args.answer_tokens:
        _table(args, adapter, _batch(adapter, answer_tokens), methods, answer_tokens)


if __name__ == "__main__":
    main()
