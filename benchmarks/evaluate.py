"""Full evaluation run: the protocol of docs/method.md on the bundled setups.

Usage::

    python benchmarks/evaluate.py [--setups mnist faces digits ...] [--out DIR] [--quick]
                                  [--keep 0.2 0.5] [--update-docs]
    python benchmarks/evaluate.py --from-results docs/evaluation_results.json [--update-docs]

By default every setup runs: the three bundled ones and the four check setups on which,
with them, the default heat map is chosen (``docs/choices.md``).

Writes ``results.json`` and ``evaluation.md`` to ``--out`` (default
``benchmarks/out/evaluation``) and prints where. Only with ``--update-docs`` are they
copied to ``docs/evaluation.md`` and ``docs/evaluation_results.json`` (never after
``--quick``, whose one seed per class cannot carry the published tables). The full run
takes a while on 2 CPU cores; ``--quick`` is a smoke test of a few minutes.
``--from-results`` runs nothing: it recomputes the intervals and win / loss calls of a
``results.json`` from its per-seed values (for results written with the percentile
bootstrap intervals of earlier versions) and writes the report again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

from captum_repinterp.evaluation import (  # noqa: E402
    ALL_SETUPS,
    markdown_report,
    recompute_intervals,
    run_evaluation,
)

DOCS = ROOT / "docs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", choices=ALL_SETUPS, default=list(ALL_SETUPS))
    parser.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "out" / "evaluation"),
        help="folder for results.json and evaluation.md",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run (1 seed per class; intervals reported as n/a)",
    )
    parser.add_argument(
        "--keep",
        nargs="+",
        type=float,
        default=[0.2, 0.5],
        help="keep shares of the masking metrics (default: 0.2 0.5)",
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="also copy the results to docs/evaluation.md and docs/evaluation_results.json",
    )
    parser.add_argument(
        "--from-results",
        metavar="FILE",
        help="run nothing: recompute the intervals of this results.json and rewrite the report",
    )
    args = parser.parse_args(argv)
    if args.update_docs and args.quick:
        parser.error("--update-docs needs the full run: drop --quick")
    out = Path(args.out)
    if args.from_results:
        report = recompute_intervals(json.loads(Path(args.from_results).read_text()))
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(report, indent=1))
        (out / "evaluation.md").write_text(markdown_report(report))
    else:
        report = run_evaluation(
            args.setups, out, seed=args.seed, quick=args.quick, fractions=tuple(args.keep)
        )
    print((out / "evaluation.md").read_text())
    if args.update_docs:
        shutil.copy(out / "evaluation.md", DOCS / "evaluation.md")
        shutil.copy(out / "results.json", DOCS / "evaluation_results.json")
        print(f"docs updated: {DOCS / 'evaluation.md'}, {DOCS / 'evaluation_results.json'}")
    print(f"total {report['total_seconds']} s; results in {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
