"""Samples/s of every benchmark datamodule on fixtures in the real layouts, at realistic image sizes.

    python benchmarks/datamodules.py [--workers 0 2] [--count 60]

Builds the fixtures in a temporary directory (ImageNet and VOC images 500×375, COCO 640×480,
released ImageNet-C 224×224), then times ``setup`` (indexing) and one full pass of the predict loader
(decoding, masks, corruption; worker start-up included) for each datamodule.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datamodules import fixtures as fx  # noqa: E402
from datamodules.imagenet import ImageNetDataModule  # noqa: E402
from datamodules.imagenet_c import ImageNetCDataModule  # noqa: E402
from datamodules.voc import PascalVOCDataModule, PascalVOCQADataModule  # noqa: E402
from datamodules.vqav2 import VQAv2DataModule  # noqa: E402


def build(base: Path, count: int) -> dict[str, tuple[type, dict]]:
    per_class = max(1, count // 3)
    imagenet = fx.make_imagenet(base / "imagenet", "folders", per_class=per_class, size=(500, 375), broken=())
    hf = fx.make_imagenet_hf(base / "imagenet-hf", "parquet", n=count, size=(500, 375), broken=())
    vqa = fx.make_vqav2(base / "vqav2", n_images=max(1, count // 3), per_image=3, size=(640, 480), broken=())
    voc = fx.make_voc(base / "voc", scenes=fx.VOC_SCENES * max(1, count // 5), size=(500, 375), broken=())
    released = fx.make_imagenet_c(
        base / "imagenet-c", ("fog", "pixelate"), (5,), per_class=max(1, count // 6), size=(224, 224), broken=()
    )
    cache = str(base / "hf-cache")
    return {
        "imagenet (class folders)": (ImageNetDataModule, {"root": str(imagenet.root), "num_samples": None}),
        "imagenet (hub parquet)": (ImageNetDataModule, {"root": str(hf.root), "num_samples": None, "cache_dir": cache}),
        "vqav2 (official json)": (VQAv2DataModule, {"root": str(vqa.root), "num_samples": None}),
        "pascal_voc": (PascalVOCDataModule, {"root": str(voc.root)}),
        "pascal_voc_qa": (PascalVOCQADataModule, {"root": str(voc.root)}),
        "imagenet_c (released)": (
            ImageNetCDataModule,
            {"root": str(released.root), "num_samples": None, "corruptions": ["fog", "pixelate"]},
        ),
        "imagenet_c (generated, 6 corruptions)": (
            ImageNetCDataModule,
            {"root": str(imagenet.root), "num_samples": max(1, count // 6), "mode": "generate"},
        ),
    }


def measure(cls: type, kwargs: dict, workers: int, batch_size: int) -> tuple[float, int, float, float]:
    """Setup seconds, samples, samples/s over the whole pass, samples/s after the first batch."""
    dm = cls(**kwargs, num_workers=workers, batch_size=batch_size)
    start = time.perf_counter()
    dm.setup("predict")
    setup = time.perf_counter() - start
    start = time.perf_counter()
    n, first_n, first_t = 0, 0, 0.0
    for batch in dm.predict_dataloader():
        n += len(dm.on_before_batch_transfer(batch, 0))
        if not first_n:
            first_n, first_t = n, time.perf_counter()
    end = time.perf_counter()
    return setup, n, n / (end - start), (n - first_n) / max(end - first_t, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--count", type=int, default=60, help="about this many samples per datamodule")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = build(Path(tmp), args.count)
        heads = " ".join(f"{f'w={w} all':>9s} {f'w={w} warm':>9s}" for w in args.workers)
        print("samples/s: 'all' = whole pass incl. worker start-up, 'warm' = after the first batch")
        print(f"{'datamodule':40s} {'samples':>7s} {'setup s':>8s} {heads}")
        for name, (cls, kwargs) in cases.items():
            rates, setup, n = [], 0.0, 0
            for w in args.workers:
                setup, n, rate, warm = measure(cls, kwargs, w, args.batch_size)
                rates += [rate, warm]
            print(f"{name:40s} {n:7d} {setup:8.3f} " + " ".join(f"{r:9.1f}" for r in rates))


if __name__ == "__main__":
    main()
