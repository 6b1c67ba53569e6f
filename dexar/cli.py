"""The ``dexar`` console script: ``dexar explain IMAGE --model PATH_OR_ID --prompt TEXT``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dexar.adapters import DexarInputError
from dexar.shapes_model import SHAPES_CHECKPOINT


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
    ex.add_argument("--method", default="dexar", help="explanation method (default: dexar)")
    ex.add_argument("--head-filter", default=None, help="DEX-AR head filter: max, avg, none, top-0.05 ... top-0.9")
    ex.add_argument("--max-new-tokens", type=int, default=32, help="generation budget (default: 32)")
    ex.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, float64")
    ex.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    ex.add_argument("--out", default="dexar-out", help="output directory (default: dexar-out)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (errors print one line to stderr)."""
    args = _parser().parse_args(argv)
    try:
        from dexar.explain import explain, open_image
        from dexar.loading import load_model

        image = open_image(args.image)
        model, processor = load_model(args.model, dtype=args.dtype, device=args.device)
        options = {"head_filter": args.head_filter} if args.head_filter else {}
        result = explain(
            model,
            processor,
            image,
            args.prompt,
            args.answer,
            args.method,
            max_new_tokens=args.max_new_tokens,
            **options,
        )
        out = result.save(Path(args.out))
    except (DexarInputError, ValueError) as err:
        print(f"dexar: error: {err}", file=sys.stderr)
        return 2
    print(f"answer: {result.answer}")
    print(
        "tokens: " + " ".join(f"{t}({float(w):.3g})" for t, w in zip(result.tokens, result.token_weights, strict=True))
    )
    print(f"wrote {out / 'sequence.png'}, {out / 'tokens.png'}, {out / 'explanation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
