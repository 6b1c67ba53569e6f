"""The README's trace-memory table, from the memory model (``dexar/trace/memory.py``): no model is loaded.

Per sample and per trace of 1/4/16 samples (GB, above the weights) for LLaVA-1.5-7B and LLaVA-NeXT (bf16,
20-token answers), DEX-AR alone and the shared trace of every method; then how many samples per trace
``trace_batch: null`` gives on an 80 GB GPU beside the weights.

    python benchmarks/memory_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dexar.trace.memory import CHECKPOINTS, samples_per_trace, trace_peak_bytes  # noqa: E402

ROWS = (
    ("LLaVA-1.5-7B", "llava-hf/llava-1.5-7b-hf", 640),
    ("LLaVA-NeXT-Mistral-7B", "llava-hf/llava-v1.6-mistral-7b-hf", 2400),
)
ANSWER = 20
GPU_BYTES = 80 * 10**9


def main() -> None:
    print("| model | tokens | trace | batch 1 | batch 4 | batch 16 | samples per trace on 80 GB |")
    print("|---|---|---|---|---|---|---|")
    for label, hub_id, tokens in ROWS:
        checkpoint = CHECKPOINTS[hub_id]
        free = GPU_BYTES - 2 * checkpoint.parameters
        for plan, name in (("default", "DEX-AR"), ("shared", "shared")):
            cells = [
                trace_peak_bytes(checkpoint.dims, tokens, ANSWER, b, plan, torch.bfloat16) / 1e9 for b in (1, 4, 16)
            ]
            fit = samples_per_trace(checkpoint.dims, tokens, ANSWER, plan, torch.bfloat16, free)
            print(f"| {label} | {tokens} | {name} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {fit} |")


if __name__ == "__main__":
    main()
