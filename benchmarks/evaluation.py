"""Evaluation against its floor: the batched forwards of the distinct perturbed images it must score.

For each method (and for every method together), on one batch of explained samples:

* ``images/sample``: distinct perturbed images per sample of the perturbation metrics of
  ``configs/demo.yaml`` (positive and negative at 0, 0.1, …, 0.9; deletion, insertion and PIC at
  0, 0.1, …, 1.0), identical images counted once (level 0 of the removal modes, PIC = negative
  reversed, deletion = positive). With every method together the original, fully obscured and fully
  blurred images of a sample count once;
* ``floor s``: those images scored in full batches of ``--max-batch`` (each sample's images at the
  seconds per image of one full batch of that sample's prompt and answer, median of ``--repeats``);
* ``webp s``: PIC's lossless WebP encodes of those images, each distinct image once (median of
  ``--repeats``), and ``fl+webp``, the floor plus them. On a GPU the encodes run in CPU threads
  while the device runs the forwards, so the floor is the forwards; on a CPU both compete for the
  same cores (the forwards already use every thread), so the work no evaluator can avoid is the
  forwards *plus* the encodes;
* ``eval s``: the evaluator's time for the same metrics (all 9 of the demo: localization and filler
  too), median of ``--repeats``, ``× floor`` and ``× fl+webp``;
* a profile of the evaluator (one cProfile run): share of its time in the model forwards, WebP
  encoding, ranking, image building, metric updates and the rest.

When the evaluator keeps the per-sample, per-method path (``EvaluationSettings(pooled=False)``: the
algorithm before pooling, kept as the slow reference), both run side by side, alternating, so that load
changes hit both alike. Models: the bundled Shapes model and the mid-size random LLaVA of
``benchmarks/one_pass.py`` (8 layers, hidden 512, 576 image tokens of a 336-px image).

    python benchmarks/evaluation.py [--model shapes llava] [--samples 16 4] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metrics as M  # noqa: E402
from datamodules.shapes import make_shapes_sample  # noqa: E402
from dexar import SHAPES_CHECKPOINT, Explainer, load_model  # noqa: E402
from dexar.methods import build_method  # noqa: E402
from dexar.perturbation import _image_key, answer_perplexity, level_counts, to_uint8, webp_size  # noqa: E402
from dexar.pipeline.evaluation import EvaluationSettings, Evaluator  # noqa: E402
from dexar.pipeline.pooled_perturbation import CurveRequest, _Pool  # noqa: E402

METHODS = ("dexar", "attention")
PROFILE = {  # category -> function names (cumulative time; the names do not nest in one another)
    "forward": ("_answer_logits",),
    "webp": ("webp_size", "to_uint8"),
    "rank": ("rank_pixels",),
    "build": ("_build_image", "build_images", "gaussian_blur", "_fills"),
}
METRIC_FILES = str(Path(__file__).resolve().parents[1] / "metrics")


def demo_metrics() -> dict:
    """The 9 metrics of ``configs/demo.yaml``, fresh."""
    return {
        "epg": M.EnergyPointingGame(),
        "soft_iou": M.SoftIoU(),
        "iou": M.BestThresholdIoU(),
        "filler_snr": M.FillerSNR(),
        "pos_auc": M.PerturbationAUC(),
        "neg_auc": M.NegativePerturbationAUC(),
        "insertion": M.InsertionAUC(),
        "deletion": M.DeletionAUC(),
        "pic": M.PICAUC(),
    }


def load(name: str):
    if name == "shapes":
        return load_model(SHAPES_CHECKPOINT)
    from dexar.testing.llava import random_llava

    return random_llava(
        hidden=512, layers=8, heads=8, grid=24, patch=14, vision_hidden=64, vision_layers=1, dtype=torch.float32
    )


def distinct_keys(metrics: dict, num_pixels: int) -> set:
    """The distinct images of one sample and method (:func:`dexar.perturbation._image_key`)."""
    keys = {("original",)}
    for metric in metrics.values():
        kind = getattr(metric, "input_kind", "")
        if kind.startswith("perturbation:"):
            mode = kind.split(":", 1)[1]
            keys |= {_image_key(mode, k, num_pixels) for k in level_counts(metric.levels.tolist(), num_pixels)}
    return keys


SHARED = ("original", "mean", "blur")


def count_images(methods: list[str], num_pixels: int) -> int:
    """Distinct images of one sample for ``methods`` together (end images shared between methods)."""
    keys = distinct_keys(demo_metrics(), num_pixels)
    shared = {k for k in keys if k == ("original",) or k[1:] == ("all",)}
    return len(shared) + len(methods) * (len(keys) - len(shared))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def per_image_seconds(adapter, samples, exps, max_batch: int, repeats: int) -> list[float]:
    """Seconds per image of one full batch of each sample's prompt and answer (median)."""
    out = []
    for sample, exp in zip(samples, exps, strict=True):
        prompt = adapter.explained_prompt_ids(exp.inputs, exp.answer_positions)
        answer = adapter.tokenize_answer(sample.answer)
        images = exp.inputs["pixel_values"].expand(max_batch, -1, -1, -1).clone()
        answer_perplexity(adapter, prompt, answer, images, max_batch)  # warm-up
        score = lambda p=prompt, a=answer, i=images: answer_perplexity(adapter, p, a, i, max_batch)  # noqa: E731
        out.append(statistics.median(timed(score, repeats)) / max_batch)
    return out


def webp_floor(adapter, samples, explanations: dict, labels: list[str], repeats: int) -> float:
    """Seconds to encode every distinct PIC image of the samples once (``to_uint8`` + WebP; median of ``repeats``).

    The images are those the evaluator encodes, registered by its own pool
    (:class:`dexar.pipeline.pooled_perturbation._Pool`): per sample the original and the fully obscured
    image once, and each method's partly obscured ones.
    """
    settings = EvaluationSettings("tokens", 16)
    levels = {"pic": demo_metrics()["pic"].levels.tolist()}
    pool = _Pool(settings.replacement, settings.blur_sigma, settings.rank_levels)
    for i, sample in enumerate(samples):
        for label in labels:
            exp = explanations[label][i]
            prompt = adapter.explained_prompt_ids(exp.inputs, exp.answer_positions)
            answer = adapter.tokenize_answer(sample.answer)
            request = CurveRequest(i, exp.inputs["pixel_values"], prompt, answer, exp.sequence_map, levels)
            pool.add((label, i), request)
    images = pool.build([k for k, slot in enumerate(pool.slots) if slot.encode])
    processor = adapter.processor
    return statistics.median(timed(lambda: [webp_size(to_uint8(im, processor)) for im in images], repeats))


def variants() -> dict[str, dict]:
    """Evaluator settings to compare: the pooled evaluator and its reference path when both exist."""
    if "pooled" in {f.name for f in dataclasses.fields(EvaluationSettings)}:
        return {"reference": {"pooled": False}, "pooled": {"pooled": True}}
    return {"evaluator": {}}


def run_evaluator(adapter, samples, explanations: dict, options: dict, max_batch: int) -> None:
    settings = EvaluationSettings("tokens", max_batch, **options)
    evaluator = Evaluator(adapter, {label: demo_metrics() for label in explanations}, settings)
    evaluator.update(samples, explanations)


def profile_shares(fn) -> dict[str, float]:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    fn()
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    shares = {}
    for category, names in PROFILE.items():
        shares[category] = sum(v[3] for (_, _, func), v in stats.items() if func in names) / total
    updates = (v[3] for (path, _, func), v in stats.items() if func == "update" and path.startswith(METRIC_FILES))
    shares["metrics"] = sum(updates) / total
    shares["rest"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def bench(name: str, num_samples: int, repeats: int, max_batch: int) -> list[dict]:
    model, processor = load(name)
    explainer = Explainer(model, processor, {m: build_method(m) for m in METHODS})
    adapter = explainer.adapter
    samples = [make_shapes_sample(i, "test") for i in range(num_samples)]
    explanations = explainer.explain_samples(samples, "ground_truth", keep_images=False)
    pixels = explanations[METHODS[0]][0].inputs["pixel_values"].shape[-2:].numel()
    per_image = per_image_seconds(adapter, samples, explanations[METHODS[0]], max_batch, repeats)
    groups = {label: [label] for label in METHODS} | {"all": list(METHODS)}
    rows = []
    for group, labels in groups.items():
        n = count_images(labels, pixels)
        floor = n * sum(per_image)
        webp = webp_floor(adapter, samples, explanations, labels, repeats)
        exps = {label: explanations[label] for label in labels}
        times: dict[str, list[float]] = {v: [] for v in variants()}
        for _ in range(repeats):  # alternate the variants: load changes hit both
            for variant, options in variants().items():
                times[variant] += timed(lambda o=options, e=exps: run_evaluator(adapter, samples, e, o, max_batch), 1)
        for variant, options in variants().items():
            seconds = statistics.median(times[variant])
            shares = profile_shares(lambda o=options, e=exps: run_evaluator(adapter, samples, e, o, max_batch))
            rows.append(
                {
                    "model": name,
                    "methods": group,
                    "variant": variant,
                    "images": n,
                    "floor": floor,
                    "webp_floor": webp,
                    "seconds": seconds,
                    "ratio": seconds / floor,
                    "ratio_webp": seconds / (floor + webp),
                    **shares,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["shapes", "llava"], choices=["shapes", "llava"])
    parser.add_argument("--samples", nargs="+", type=int, default=[16, 4], help="samples per model (in order)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = f"{'model':<8}{'methods':<11}{'variant':<11}{'img/smp':>8}{'floor s':>9}{'webp s':>9}{'eval s':>9}"
    header += f"{'× floor':>9}{'× fl+webp':>10}" + "".join(f"{c:>9}" for c in (*PROFILE, "metrics", "rest"))
    counts = args.samples + args.samples[-1:] * len(args.model)
    for name, count in zip(args.model, counts, strict=False):
        rows = bench(name, count, args.repeats, args.max_batch)
        print(f"{name}: {count} samples, max_batch {args.max_batch}, {args.threads} threads")
        print(header)
        for r in rows:
            line = f"{r['model']:<8}{r['methods']:<11}{r['variant']:<11}{r['images']:>8}{r['floor']:>9.3f}"
            line += f"{r['webp_floor']:>9.3f}{r['seconds']:>9.3f}{r['ratio']:>9.2f}{r['ratio_webp']:>10.2f}"
            line += "".join(f"{r[c]:>9.0%}" for c in (*PROFILE, "metrics", "rest"))
            print(line)
        for (model, variant), group in _by(rows).items():
            mean = statistics.mean(r["ratio"] for r in group if r["methods"] != "all")
            mean_webp = statistics.mean(r["ratio_webp"] for r in group if r["methods"] != "all")
            print(f"{model} {variant}: mean over methods × floor {mean:.2f}, × floor+WebP {mean_webp:.2f}", flush=True)


def _by(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["model"], r["variant"]), []).append(r)
    return out


if __name__ == "__main__":
    main()
