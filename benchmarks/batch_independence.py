"""Do metric values depend on the number of processes or the batch size? Runs the matrix and compares.

Each cell is a ``predict`` run of the bundled Shapes model (teacher-forced ground-truth answers,
DEX-AR and raw attention) on the same Shapes samples with ``ddp_spawn`` on CPU (gloo) for world size
> 1. Every cell's per-sample values are compared with the first cell's; the script prints, per
metric, the largest absolute difference of the mean and of any sample, and how many samples differ
by more than ``--tol``. Batches of more than one sample pad their prompts, which moves each map by
float noise (~1e-7); metrics must not follow it.

    PYTHONPATH=$PWD python benchmarks/batch_independence.py [--samples 24] [--devices 1 2 3]
        [--batch-sizes 1 4 16] [--out /tmp/batch-independence]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.wandb_media import _per_sample_rows  # noqa: E402
from datamodules.shapes import ShapesDataModule  # noqa: E402
from dexar import SHAPES_CHECKPOINT  # noqa: E402
from dexar.module import ExplainerModule  # noqa: E402
from metrics import (  # noqa: E402
    PICAUC,
    DeletionAUC,
    EnergyPointingGame,
    FillerSNR,
    InsertionAUC,
    NegativePerturbationAUC,
    PerturbationAUC,
    SoftIoU,
)


def metrics() -> dict:
    return {
        "epg": EnergyPointingGame(),
        "soft_iou": SoftIoU(),
        "filler_snr": FillerSNR(),
        "pos_auc": PerturbationAUC(),
        "neg_auc": NegativePerturbationAUC(),
        "deletion": DeletionAUC(),
        "insertion": InsertionAUC(),
        "pic": PICAUC(),
    }


class PerSample(L.Callback):
    """Writes every per-sample metric value to ``per_sample.json`` (collective; rank 0 writes)."""

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = _per_sample_rows(pl_module, pl_module.metric_sets, trainer.world_size)
        if trainer.is_global_zero:
            Path(trainer.default_root_dir, "per_sample.json").write_text(json.dumps(rows))


def run(cell: Path, devices: int, batch_size: int, samples: int, checkpoint: str) -> dict:
    module = ExplainerModule(
        model=checkpoint,
        methods={"dexar": {}, "attention": {}},
        answer_source="ground_truth",
        metrics=metrics(),
        localization_target="sequence",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(cell),
        callbacks=[PerSample()],
    )
    trainer.predict(
        module, datamodule=ShapesDataModule(num_samples=samples, batch_size=batch_size), return_predictions=False
    )
    rows = json.loads((cell / "per_sample.json").read_text())
    return {(r["sample"], r["method"]): r for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--checkpoint", default=SHAPES_CHECKPOINT)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--out", type=Path, default=Path("/tmp/batch-independence"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cells = {}
    for devices in args.devices:
        for batch_size in args.batch_sizes:
            start = time.perf_counter()
            cells[(devices, batch_size)] = run(
                args.out / f"d{devices}-b{batch_size}", devices, batch_size, args.samples, args.checkpoint
            )
            print(f"devices={devices} batch_size={batch_size}: {time.perf_counter() - start:.0f} s", flush=True)
    (reference_key, reference), *others = cells.items()
    names = sorted({k for r in reference.values() for k in r if k not in ("sample", "method")})
    print(f"reference: devices={reference_key[0]} batch_size={reference_key[1]}; tolerance {args.tol:g}")
    worst_overall = 0.0
    for key, rows in others:
        assert rows.keys() == reference.keys(), key
        for method in ("dexar", "attention"):
            for name in names:
                a = torch.tensor([reference[k].get(name, float("nan")) for k in reference if k[1] == method])
                b = torch.tensor([rows[k].get(name, float("nan")) for k in reference if k[1] == method])
                assert torch.equal(a.isnan(), b.isnan()), (key, method, name)
                ok = ~a.isnan()
                diff = (a[ok] - b[ok]).abs()
                mean_diff = abs(float(a[ok].mean() - b[ok].mean())) if ok.any() else 0.0
                worst = float(diff.max()) if diff.numel() else 0.0
                worst_overall = max(worst_overall, worst, mean_diff)
                if worst > args.tol or mean_diff > args.tol:
                    print(
                        f"  devices={key[0]} batch_size={key[1]} {method}/{name}: mean differs by {mean_diff:.2e}, "
                        f"max per sample {worst:.2e}, {int((diff > args.tol).sum())} samples > tol"
                    )
    print(f"largest difference over the matrix: {worst_overall:.3e}")


if __name__ == "__main__":
    main()
