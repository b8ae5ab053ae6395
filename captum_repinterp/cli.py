"""Command-line entry: ``captum-repinterp demo``."""

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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, n_seeds=args.seeds, seed=args.seed)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
