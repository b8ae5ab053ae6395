"""Command-line entry: ``captum-repinterp demo``, ``report`` and ``evaluate``.

Bad arguments end with a one-line usage error and exit status 2, as argparse's own
errors do: the ``ValueError`` / ``TypeError`` raised while the arguments are resolved
(loading ``--model-factory`` and ``--data``, checking ``--classes``) are turned into
``parser.error``. Errors raised later, while the job runs, are not argument errors and
keep their traceback.

Warnings given while a command runs are printed as ``captum-repinterp: UserWarning:
message``, each message once, without Python's source location: the package's warnings
point at the caller's line, which for a command is the interpreter's entry (``<frozen
runpy>``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def _random_state(text: str) -> int:
    """``--random-state``: an int in ``[0, 2**32)``, the seeds scikit-learn's k-means (in
    the report's audit) and NumPy take."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**32), got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts if p]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated non-negative ints, got {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated non-negative ints, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    """``--class-names``: comma-separated names, or ``@FILE`` with one name per line (for
    names that hold commas, as ImageNet's "tench, Tinca tinca")."""
    if text.startswith("@"):
        try:
            lines = Path(text[1:]).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]!r}: {exc}") from None
        while lines and not lines[-1].strip():
            lines.pop()  # trailing blank lines
        names = [line.strip() for line in lines]
        if not names or not all(names):
            raise argparse.ArgumentTypeError(
                f"{text[1:]!r} must hold one non-empty name per line (class 0 first)"
            )
        return names
    names = [p.strip() for p in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be comma-separated non-empty names, got {text!r}")
    return names


def _out_dir(text: str) -> str:
    """``--out``: a folder that exists or can be made (checked before any work)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot make a folder in {str(parent)!r}")
    return text


def _seeds(text: str) -> int | list[int]:
    """``"4"``: a count; ``"0,100"`` (any comma): held-out indices."""
    if "," in text:
        return _int_list(text)
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a count (e.g. 4) or comma-separated held-out indices (e.g. 0,100), "
            f"got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a count must be at least 1, got {text!r}")
    return value


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except ``None`` (whose help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _add_random_state(parser: argparse.ArgumentParser, what: str = "random seed") -> None:
    """``--random-state`` (alias ``--seed``), an int in ``[0, 2**32)``, default 0."""
    parser.add_argument(
        "--random-state",
        "--seed",
        dest="random_state",
        type=_random_state,
        default=0,
        help=f"{what}, in [0, 2**32)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``captum-repinterp`` argument parser (defaults shown in ``--help``)."""
    fmt = _DefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="captum-repinterp",
        formatter_class=fmt,
        description="Representative interpretations of CNNs for Captum.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        formatter_class=fmt,
        help="run the main job on the bundled data",
        description="Fit, interpret a few seeds and draw the figures on MNIST-5k and on "
        "the faces; print the table and save it as table.txt.",
    )
    demo.set_defaults(subparser=demo)
    demo.add_argument(
        "--out", type=_out_dir, default="out", help="folder for the PNG figures and table.txt"
    )
    demo.add_argument(
        "--seeds",
        type=_seeds,
        default=4,
        metavar="N|I,J,...",
        help="MNIST-5k seeds: a count N (the first held-out image of each of N predicted "
        "classes) or comma-separated held-out indices such as 0,100 (a single index needs "
        "a trailing comma: 7,); the faces always use one seed per class",
    )
    _add_random_state(demo, "random seed of the split, the training and the interpretations")

    rep = sub.add_parser(
        "report",
        formatter_class=fmt,
        help="write a static HTML audit report of a model",
        description="Audit the classes of a model and write DIR/index.html with its PNGs. "
        "Without --model-factory and --data: the small CNN on MNIST-5k.",
    )
    rep.set_defaults(subparser=rep)
    rep.add_argument(
        "--out", type=_out_dir, default="report", help="folder for index.html and its PNGs"
    )
    rep.add_argument(
        "--model-factory",
        default=None,
        metavar="PKG.MOD:FN",
        help="function returning model (split at model.features[-1]), (model, layer) or "
        "(model, layer, head); default: the small CNN on MNIST-5k",
    )
    rep.add_argument(
        "--data",
        default=None,
        metavar="PKG.MOD:FN",
        help="function returning (reference_images, heldout_images), or those and "
        "(reference_labels, heldout_labels) after them; the explainer is fitted on the "
        "references and each class is audited on the held-out images it is predicted "
        "for, so a shortcut shows only when held-out images carry it",
    )
    rep.add_argument(
        "--classes",
        type=_int_list,
        default=None,
        metavar="C,C,...",
        help="comma-separated predicted classes to audit (default: 0,1,2 for the demo, all "
        "predicted classes for your model)",
    )
    rep.add_argument(
        "--layer",
        default=None,
        metavar="NAME|auto",
        help="split layer of --model-factory's model: a module name as in "
        "model.named_modules() (e.g. layer3, features.7), or auto (find_layer); replaces "
        "the factory's layer (default: the factory's)",
    )
    rep.add_argument(
        "--class-names",
        type=_name_list,
        default=None,
        metavar="NAME,NAME,...|@FILE",
        help="comma-separated names of classes 0, 1, ... of --model-factory's model, shown "
        "next to the class indices; @FILE reads one name per line (names with commas)",
    )
    rep.add_argument(
        "--regions", type=_positive_int, default=2, help="at most this many regions per class"
    )
    _add_random_state(rep)

    ev = sub.add_parser(
        "evaluate",
        formatter_class=fmt,
        help="run the evaluation protocol (see the docs' Method and evaluation page)",
        description="Run the reuse protocol against the CAM baselines; write results.json "
        "and evaluation.md to --out.",
    )
    ev.set_defaults(subparser=ev)
    ev.add_argument(
        "--setup",
        action="append",
        choices=["mnist", "faces", "digits"],
        default=None,
        help="setup to evaluate (repeatable; default: mnist and faces)",
    )
    ev.add_argument(
        "--out", type=_out_dir, default="evaluation", help="folder for results.json and .md"
    )
    _add_random_state(ev)
    ev.add_argument(
        "--quick",
        action="store_true",
        help="a small smoke run (1 seed per class): its intervals mean nothing",
    )
    return parser


QUICK_NOTE = (
    "note: --quick uses one seed per class, so there are no intervals and the "
    "better/worse marks in evaluation.md are not evidence; run without --quick to compare "
    "methods."
)


def _warning_printer() -> Callable[..., None]:
    """A ``warnings.showwarning`` for the command: each message once, without a source
    location (the report's fit, audit and maps each gave the same curved-head warning)."""
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = f"captum-repinterp: {category.__name__}: {message}"
        if text not in shown:
            shown.add(text)
            print(text, file=file or sys.stderr)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``captum-repinterp`` command; returns the exit status."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer()
        _run(args)
    return 0


def _make_out(args: argparse.Namespace) -> None:
    """Make ``--out`` once the other arguments are resolved, before the job runs: a
    folder that cannot be made (a read-only mount; ``os.access`` in :func:`_out_dir`
    says yes to root everywhere) is a usage error, not an OSError traceback."""
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        args.subparser.error(f"argument --out: cannot make the folder {args.out!r}: {reason}")


def _run(args: argparse.Namespace) -> None:
    """Run the parsed command."""
    if args.command != "report":  # the report's folder is made after its inputs load
        _make_out(args)
    if args.command == "evaluate":
        from .evaluation import run_evaluation

        setups = args.setup or ["mnist", "faces"]
        run_evaluation(setups, args.out, seed=args.random_state, quick=args.quick)
        out = Path(args.out).resolve()
        print(f"results written to {out / 'results.json'} and {out / 'evaluation.md'}")
        if args.quick:
            print(QUICK_NOTE)
    elif args.command == "report":
        from .report import run_report
        from .report_inputs import prepare_report

        try:
            inputs = prepare_report(
                args.model_factory,
                args.data,
                args.classes,
                args.random_state,
                layer=args.layer,
                class_names=args.class_names,
            )
        except (ValueError, TypeError) as exc:
            args.subparser.error(str(exc))
        _make_out(args)
        from .cuts import NotACutError

        try:
            run_report(
                args.out,
                regions_per_class=args.regions,
                random_state=args.random_state,
                inputs=inputs,
            )
        except NotACutError as exc:  # the factory's layer: an argument error, found at fit
            args.subparser.error(f"model-factory: {exc}")
    elif args.command == "demo":
        from .demo import SeedsError, run_demo

        try:
            run_demo(args.out, seeds=args.seeds, random_state=args.random_state)
        except SeedsError as exc:  # an index beyond the held-out images, found before the fit
            args.subparser.error(str(exc))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
