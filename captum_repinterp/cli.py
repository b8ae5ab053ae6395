"""Command-line entry: ``captum-repinterp demo`` and ``captum-repinterp report``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``captum-repinterp`` command."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = argparse.ArgumentParser(
        prog="captum-repinterp",
        description="Representative interpretations of CNNs for Captum.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job on the bundled data")
    demo.add_argument("--out", default="out", help="folder for the PNG figures")
    demo.add_argument("--seeds", type=int, default=4, help="seeds on MNIST-5k")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    rep = sub.add_parser("report", help="write a static HTML audit report of a model")
    rep.add_argument("--out", default="report", help="folder for index.html and its PNGs")
    rep.add_argument(
        "--model-factory",
        default=None,
        help="pkg.mod:fn returning model (layer = model.features[-1]), (model, layer) or "
        "(model, layer, head); default: the small CNN on MNIST-5k",
    )
    rep.add_argument(
        "--data", default=None, help="pkg.mod:fn returning (reference_images, heldout_images)"
    )
    rep.add_argument(
        "--classes", default=None, help="comma-separated classes to audit (demo: 0,1,2)"
    )
    rep.add_argument("--regions", type=int, default=2, help="at most this many per class")
    rep.add_argument("--seed", type=int, default=0, help="random seed")
    ev = sub.add_parser("evaluate", help="run the evaluation protocol (EVALUATION.md)")
    ev.add_argument(
        "--setup", action="append", choices=["mnist", "faces", "digits"], default=None,
        help="setup to evaluate (repeatable; default: mnist and faces)",
    )
    ev.add_argument("--out", default="evaluation", help="folder for results.json and .md")
    ev.add_argument("--seed", type=int, default=0, help="random seed")
    ev.add_argument("--quick", action="store_true", help="a small run (1 seed per class)")
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        from .evaluation import run_evaluation

        run_evaluation(args.setup or ["mnist", "faces"], args.out, seed=args.seed,
                       quick=args.quick)
    if args.command == "report":
        from .report import run_report

        classes = None
        if args.classes:
            try:
                classes = [int(c) for c in args.classes.split(",") if c.strip()]
            except ValueError:
                parser.error(f"--classes must be comma-separated ints, got {args.classes!r}")
        run_report(
            args.out, args.model_factory, args.data, classes, args.regions, seed=args.seed
        )
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, n_seeds=args.seeds, seed=args.seed)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
