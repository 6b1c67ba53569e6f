"""One-pass DEX-AR vs a plain forward vs the naive reference: time and peak memory, side by side.

Model: random LLaVA (8 decoder layers, hidden 512, 8 heads, 576 image tokens = 24×24 grid of a
336-px image, patch 14), 20-token answer, float32, SDPA. Each variant runs in its own subprocess so
that its peak resident memory (``ru_maxrss``) is its own; memory is reported above the baseline
reached after building the model and inputs. The time ratios come from one more subprocess that runs
the forward, the backbone forward and explain alternately, ``--repeats`` rounds: each round's ratio is
taken within the round, so load changes on a shared machine hit both sides alike (separate processes
measured minutes apart swung 1.12–1.63× on this machine); the median round and the range are printed.

With ``--paired-runs K`` the alternated measurement runs in K fresh processes: the median of one run
moves by about ±0.03 between processes on this machine, so the median over runs is the figure to quote.

    python benchmarks/one_pass.py [--repeats 5] [--paired-runs 1] [--answer-tokens 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("forward", "backbone_forward", "explain", "naive")


def _setup(answer_tokens: int):
    import torch

    from datamodules.shapes import make_shapes_sample
    from dexar.adapters import get_adapter
    from dexar.testing.llava import random_llava

    model, processor = random_llava(
        hidden=512, layers=8, heads=8, grid=24, patch=14, vision_hidden=64, vision_layers=1, dtype=torch.float32
    )
    adapter = get_adapter(model, processor)
    sample = make_shapes_sample(0)
    words = ("i see a red circle and a blue square and a green triangle " * 4).split()
    answer_ids = adapter.tokenize_answer(" ".join(words))[:answer_tokens]
    prompt_ids, image_inputs = adapter.encode_prompts([sample.image], [sample.prompt])
    batch = adapter.build_batch(prompt_ids, [answer_ids], image_inputs)
    return model, adapter, batch


def _run_variant(name: str, repeats: int, answer_tokens: int, threads: int) -> dict:
    import torch

    from dexar.methods import DexAR
    from dexar.testing.reference import naive_layer_grads
    from dexar.trace import run as run_trace

    torch.set_num_threads(threads)
    model, adapter, batch = _setup(answer_tokens)
    inputs = {k: v for k, v in batch.inputs.items()}

    def forward():
        with torch.inference_mode():
            model(**inputs)

    def backbone_forward():
        with torch.inference_mode():
            adapter.backbone_forward(inputs)

    def explain():
        DexAR()(run_trace(adapter, batch))

    def naive():
        naive_layer_grads(adapter, batch, 0)

    fns = {"forward": forward, "backbone_forward": backbone_forward, "explain": explain, "naive": naive}
    if name == "paired":
        return _paired({k: fns[k] for k in ("forward", "backbone_forward", "explain")}, repeats)
    fn = fns[name]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()  # warm-up (also sets the memory high-water mark)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats if name != "naive" else 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {
        "variant": name,
        "seconds": statistics.median(times),
        "peak_mib": (peak - base) / 1024,
        "tokens": int(batch.input_ids.shape[1]),
    }


def _paired(fns: dict, repeats: int) -> dict:
    """Each function once per round, alternately; per-round time ratios to the forward."""
    for fn in fns.values():
        fn()  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        times = {}
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        for name in fns:
            ratios[name].append(times[name] / times["forward"])
    return {"variant": "paired", "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--answer-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paired-runs", type=int, default=1, help="processes for the alternated measurement")
    parser.add_argument("--variant", choices=(*VARIANTS, "paired"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(_run_variant(args.variant, args.repeats, args.answer_tokens, args.threads)))
        return

    def run(name: str) -> dict:
        cmd = [sys.executable, __file__, "--variant", name, "--repeats", str(args.repeats)]
        cmd += ["--answer-tokens", str(args.answer_tokens), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        return json.loads(out.strip().splitlines()[-1])

    rows = {name: run(name) for name in VARIANTS}
    runs = [run("paired")["ratios"] for _ in range(max(1, args.paired_runs))]
    paired = runs[0]
    ref = rows["forward"]
    print(f"sequence: {ref['tokens']} tokens, {args.answer_tokens} answer tokens, {args.threads} threads")
    print(f"{'variant':<18}{'seconds':>10}{'× forward':>11}{'peak MiB':>10}{'× forward':>11}")
    for name, row in rows.items():
        t_ratio = row["seconds"] / ref["seconds"]
        m_ratio = row["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] > 0 else float("nan")
        print(f"{name:<18}{row['seconds']:>10.3f}{t_ratio:>11.2f}{row['peak_mib']:>10.1f}{m_ratio:>11.2f}")
    print(f"naive / explain: {rows['naive']['seconds'] / rows['explain']['seconds']:.1f}× slower")
    print(f"alternated in one process, {args.repeats} rounds (× forward: median, min–max):")
    for name, values in paired.items():
        if name != "forward":
            print(f"  {name:<18}{statistics.median(values):>6.2f}  {min(values):.2f}–{max(values):.2f}")
    if len(runs) > 1:
        print(f"the same in {len(runs)} processes (× forward: each run's median; the median of them):")
        for name in paired:
            if name != "forward":
                medians = [statistics.median(r[name]) for r in runs]
                listed = " / ".join(f"{m:.3f}" for m in medians)
                print(f"  {name:<18}{listed}  median {statistics.median(medians):.3f}")


if __name__ == "__main__":
    main()
