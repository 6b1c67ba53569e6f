"""The ``dexar`` console script.

* ``dexar explain IMAGE --model PATH_OR_ID --prompt TEXT [--method dexar,attention] [--html]``: explain one
  image (several methods share one trace; ``--html`` writes ``explanation.html``, every method in one page);
* ``dexar grid CONFIG [--run] [--sweep FILE] [-- EXTRA ARGS]``: one predict run per grid variant;
* ``dexar report RUN_DIR... [--out DIR]``: the paper's tables from finished runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dexar.adapters import DexarInputError
from dexar.shapes.model import SHAPES_CHECKPOINT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dexar", description="Explain which image regions drive a VLM's answer.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="explain one image + prompt (answer given or generated)")
    ex.add_argument("image", help="image file (any format Pillow reads, any mode)")
    ex.add_argument(
        "--model",
        default=SHAPES_CHECKPOINT,
        help="checkpoint directory or cached hub id (default: bundled Shapes model)",
    )
    ex.add_argument("--prompt", required=True, help="user prompt; the model's template is applied")
    ex.add_argument("--answer", default=None, help="answer to teacher-force (default: generate greedily)")
    ex.add_argument(
        "--method",
        default="dexar",
        help="explanation method, or several separated by commas (one shared trace), e.g. dexar,attention,chefercam",
    )
    ex.add_argument("--head-filter", default=None, help="DEX-AR head filter: max, avg, none, top-0.05 ... top-0.9")
    ex.add_argument("--max-new-tokens", type=int, default=32, help="generation budget (default: 32)")
    ex.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, float64")
    ex.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    ex.add_argument("--out", default="dexar-out", help="output directory (default: dexar-out)")
    ex.add_argument(
        "--html",
        action="store_true",
        help="also write OUT/explanation.html: the answer word by word over the image, every method; opens offline",
    )
    grid = sub.add_parser(
        "grid",
        help="list (or run, or write a W&B sweep of) the variants of a config's grid",
        epilog="Other arguments (e.g. --data.root D --trainer.devices 4) are appended to every run.",
    )
    grid.add_argument(
        "config",
        help="LightningCLI config with an experiment.grid section (configs/paper/...); each command carries the "
        "--config flags its header composes it from (configs/base/predict.yaml, configs/data/...)",
    )
    grid.add_argument("--run", action="store_true", help="run the variants one after the other")
    grid.add_argument("--sweep", default=None, help="write a W&B sweep YAML (method: grid) to this file instead")
    rep = sub.add_parser("report", help="rebuild the paper's tables (Markdown, CSV, PNG) from finished runs")
    rep.add_argument("runs", nargs="+", help="run directories (searched recursively for results.json / W&B runs)")
    rep.add_argument("--out", default="reports", help="output directory (default: reports)")
    rep.add_argument("--samples", type=int, default=2, help="samples in the overlay gallery (default: 2)")
    return parser


def _grid(args: argparse.Namespace) -> int:
    import subprocess

    import yaml

    from dexar.pipeline import experiments as grid

    if args.sweep:
        Path(args.sweep).write_text(yaml.safe_dump(grid.sweep(args.config, args.extra), sort_keys=False))
        print(f"wrote {args.sweep}; create it with `wandb sweep {args.sweep}`, run it with `wandb agent <sweep id>`")
        return 0
    commands = grid.commands(args.config, args.extra)
    failed = 0
    for command in commands:
        print(grid.shell(command), flush=True)
        if args.run:
            failed += subprocess.run([sys.executable, "-m", "train_eval", *command[2:]]).returncode != 0
    if args.run:
        print(f"{len(commands) - failed}/{len(commands)} variants finished")
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    from dexar.pipeline.report.tables import report

    print(report(args.runs, args.out, args.samples))
    print(f"\nwrote {Path(args.out) / 'report.md'} (+ CSV and PNG files)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (errors print one line to stderr)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "grid":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = [a for a in extra if a != "--"]
    if args.command in ("grid", "report"):
        try:
            return _grid(args) if args.command == "grid" else _report(args)
        except (ValueError, FileNotFoundError) as err:
            print(f"dexar {args.command}: error: {err}", file=sys.stderr)
            return 2
    try:
        from dexar.explain import Explainer, open_image
        from dexar.loading import load_model
        from dexar.schema import Sample

        image = open_image(args.image)
        options = {"head_filter": args.head_filter} if args.head_filter else {}
        methods = _methods(args.method, options)  # a bad method or option fails before the model loads
        model, processor = load_model(args.model, dtype=args.dtype, device=args.device)
        sample = Sample(id="input", image=image, prompt=args.prompt, answer=args.answer)
        source = "generate" if args.answer is None else "ground_truth"
        results = Explainer(model, processor, methods).explain_samples([sample], source, args.max_new_tokens)
    except (DexarInputError, ValueError) as err:
        print(f"dexar: error: {err}", file=sys.stderr)
        return 2
    explanations = {name: exps[0] for name, exps in results.items()}
    out = Path(args.out)
    try:
        written = _save(explanations, out, args.prompt, args.html, title=Path(args.image).name)
    except OSError as err:
        print(f"dexar: error: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    first = next(iter(explanations.values()))
    print(f"answer: {first.answer}")
    for name, result in explanations.items():
        prefix = f"{name} " if len(explanations) > 1 else ""
        words = zip(result.word_texts, result.word_weights, strict=True)
        print(f"{prefix}words: " + " ".join(f"{t}({float(w):.3g})" for t, w in words))
        if any(len(w.pieces) > 1 for w in result.word_list):
            pieces = zip(result.tokens, result.token_weights, strict=True)
            print(f"{prefix}pieces: " + " ".join(f"{t}({float(w):.3g})" for t, w in pieces))
    print("wrote " + ", ".join(str(p) for p in written))
    if args.html:
        print(f"open {out / 'explanation.html'} in a browser (works offline)")
    return 0


def _methods(spec: str, options: dict[str, str]) -> dict[str, Any]:
    """``--method`` (one name or ``a,b,c``) as method instances; ``options`` go to the methods that take them.

    Raises:
        ValueError: An unknown or repeated method, or options that no listed method takes.
    """
    from dexar.methods import build_method

    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError("--method: no method given")
    if len(set(names)) != len(names):
        raise ValueError(f"--method: {spec!r} lists a method twice")
    methods, errors = {}, []
    for name in names:
        try:
            methods[name] = build_method(name, **options)
        except TypeError as err:
            errors.append(f"method {name!r} does not take {sorted(options)}: {err}")
            methods[name] = build_method(name)
    if errors and (len(names) == 1 or len(errors) == len(names)):
        raise ValueError("; ".join(errors))
    return methods


def _save(explanations: dict[str, Any], out: Path, prompt: str, html: bool, title: str) -> list[Path]:
    """Write each method's PNGs and JSON (``out/`` for one method, ``out/<method>/`` for several) and the page."""
    written = []
    for name, result in explanations.items():
        directory = result.save(out if len(explanations) == 1 else out / name)
        written += [directory / "sequence.png", directory / "words.png", directory / "tokens.png"]
        written.append(directory / "explanation.json")
    if html:
        from dexar.explorer import payload_from_explanations, write_explanation_html

        payload = payload_from_explanations(explanations, prompt=prompt, title=title)
        written.append(write_explanation_html(payload, out / "explanation.html"))
    return written


if __name__ == "__main__":
    sys.exit(main())
