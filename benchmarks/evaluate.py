"""Full evaluation run: the protocol of docs/method.md on the real setups.

Usage::

    .venv/bin/python benchmarks/evaluate.py [--setups mnist faces digits] [--out DIR]
        [--update-docs]

Writes ``results.json`` and ``evaluation.md`` to ``--out`` (default:
``benchmarks/out/evaluation``); with ``--update-docs`` it also copies the markdown to
``docs/evaluation.md``. Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

from captum_repinterp.evaluation import run_evaluation  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=["mnist", "faces", "digits"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "evaluation"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--update-docs", action="store_true", help="copy evaluation.md to docs/evaluation.md"
    )
    args = parser.parse_args()
    report = run_evaluation(args.setups, args.out, seed=args.seed)
    if args.update_docs:
        shutil.copy(Path(args.out) / "evaluation.md", ROOT / "docs" / "evaluation.md")
    print((Path(args.out) / "evaluation.md").read_text())
    print(
        f"total {report['total_seconds']} s; results written to "
        f"{Path(args.out).resolve()} (results.json, evaluation.md)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
