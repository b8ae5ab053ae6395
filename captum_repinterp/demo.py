"""The main job on bundled data: two real setups, a few seeds, figures and a table.

1. The small CNN trained on MNIST-5k (seeded, cached), split at its last conv block;
   references are the 80% training split, held-out images the other 20%
   (:func:`mnist_setup`, shared with ``captum-repinterp report``).
2. MTCNN's pretrained ONet on the ``lfw_subset`` faces vs non-faces, split at its last
   conv block (``conv4 + prelu4``); references are 70% of the 200 images
   (:func:`faces_setup`).

For each seed the demo prints one row of a table (see :func:`format_table` for its
columns), saves the table as ``table.txt``, and writes the region figure (seed and its
nearest members under the shared heat map) and a side-by-side comparison with Captum's
``LayerGradCam`` and ``IntegratedGradients``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .attribution import RepresentativeInterpretation
from .visualization import compare_methods, plot_region

__all__ = ["DemoSetup", "SeedRow", "faces_setup", "format_table", "mnist_setup", "run_demo"]


@dataclass
class DemoSetup:
    """A model split at a layer, with reference and held-out images and their labels."""

    name: str
    model: nn.Module
    layer: nn.Module
    head: Callable[[Tensor], Tensor] | None
    references: Tensor
    heldout: Tensor
    reference_labels: Tensor
    heldout_labels: Tensor
    class_names: list[str] | None = None


def mnist_setup(random_state: int = 0) -> DemoSetup:
    """The small CNN on MNIST-5k: 80% references (its training set), 20% held out.

    The CNN is trained with ``random_state`` (or loaded from the cache, see
    :func:`captum_repinterp.datasets.cache_dir`); the split is stratified by label.
    """
    from . import datasets, models

    x, y = datasets.load_mnist5k()
    train, test = datasets.split_indices(len(y), 0.2, seed=random_state, stratify=y)
    cnn = models.train_small_cnn(x[train], y[train], seed=random_state)
    return DemoSetup("mnist", cnn, cnn.features[-1], cnn.head, x[train], x[test], y[train], y[test])


def faces_setup(random_state: int = 0) -> DemoSetup:
    """MTCNN's pretrained ONet on ``lfw_subset`` faces vs non-faces (70% references)."""
    from . import datasets, models

    fx, fy = datasets.load_faces(48)
    train, test = datasets.split_indices(len(fy), 0.3, seed=random_state, stratify=fy)
    onet = models.load_onet()
    return DemoSetup(
        "faces",
        onet,
        onet.features[-1],
        onet.head,
        fx[train],
        fx[test],
        fy[train],
        fy[test],
        ["non-face", "face"],
    )


@dataclass
class SeedRow:
    """One row of the demo's table (see :func:`format_table`)."""

    setup: str
    seed_index: int
    target: int
    members: int
    purity: float
    coverage: float
    heldout_precision: float
    heldout_inside: int
    boundaries: int
    true_label: int | None = None


def _pick_seeds(predictions: Tensor, n: int) -> list[int]:
    """The first held-out image of each of ``n`` different predicted classes."""
    seen: dict[int, int] = {}
    for i, p in enumerate(predictions.tolist()):
        if p not in seen:
            seen[p] = i
        if len(seen) == n:
            break
    return sorted(seen.values())


class SeedsError(ValueError):
    """Held-out indices given as ``seeds`` that the held-out images do not have (the
    command line turns it into a usage error)."""


def _check_indices(seeds: Sequence[int], n: int) -> list[int]:
    out = [int(i) for i in seeds]
    if not out or any(not 0 <= i < n for i in out):
        raise SeedsError(f"seeds: held-out indices must lie in 0..{n - 1}, got {list(seeds)}")
    return out


def _seed_indices(seeds: int | Sequence[int], predictions: Tensor) -> list[int]:
    """A count (one seed per predicted class) or explicit held-out indices."""
    if isinstance(seeds, bool):
        raise TypeError(f"seeds must be an int or a sequence of ints, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {seeds}")
        return _pick_seeds(predictions, seeds)
    return _check_indices(seeds, len(predictions))


def run_setup(
    setup: DemoSetup,
    seeds: int | Sequence[int],
    out_dir: Path,
    random_state: int = 0,
    **kwargs: Any,
) -> list[SeedRow]:
    """Fit RI on the references, interpret the seeds, write the figures.

    Parameters
    ----------
    setup : DemoSetup
        Model, layer, images and labels.
    seeds : int or sequence of int
        A count ``n`` (the first held-out image of each of ``n`` predicted classes) or
        held-out indices.
    out_dir : Path
        Folder of the PNG figures.
    random_state : int
        Random seed of the interpretations.
    **kwargs
        More options of :meth:`RepresentativeInterpretation.interpret`.
    """
    ri = RepresentativeInterpretation(setup.model, setup.layer, head=setup.head)
    ri.fit(setup.references, batch_size=256, progress=True)
    heldout = setup.heldout
    feats, preds = ri.transform(heldout, batch_size=256)
    # the random-seed keyword of interpret() (one place to rename it)
    kwargs = {"random_state": random_state, **kwargs}
    rows = []
    for idx in _seed_indices(seeds, preds):
        seed = heldout[idx : idx + 1]
        region = ri.interpret(seed, **kwargs)
        # held-out images other than the seed itself
        score = region.evaluate_features(feats, preds, exclude=idx)
        true = int(setup.heldout_labels[idx])
        rows.append(
            SeedRow(
                setup.name,
                idx,
                region.target,
                len(region),
                region.purity,
                region.coverage,
                score["precision"],
                score["n_inside"],
                region.n_boundaries,
                true,
            )
        )
        fig = plot_region(
            region,
            seed,
            setup.references,
            k=6,
            class_names=setup.class_names,
            seed_label=true,
            reference_labels=setup.reference_labels,
            title=f"{setup.name}: region of held-out #{idx}",
        )
        fig.savefig(out_dir / f"{setup.name}_region_seed{idx}.png", dpi=110)
    idx = [r.seed_index for r in rows]
    fig, _ = compare_methods(
        setup.model,
        setup.layer,
        ri,
        heldout[idx],
        class_names=setup.class_names,
        labels=setup.heldout_labels[idx],
        **kwargs,
    )
    fig.savefig(out_dir / f"{setup.name}_comparison.png", dpi=110)
    return rows


#: The table's columns: (header, meaning), in order.
COLUMNS = (
    ("setup", "the data set and model (mnist: small CNN on MNIST-5k; faces: MTCNN ONet)"),
    ("held-out #", "index of the seed among the held-out images"),
    ("class", "the class the model predicts for the seed (the class explained)"),
    ("true", "the seed's true label"),
    ("members", "references inside the seed's region"),
    ("purity", "share of the members the model puts in the class (references)"),
    ("coverage", "share of the references of the class that are members"),
    (
        "held-out precision",
        "share of the held-out images inside the region (seed "
        "excluded) that the model puts in the class; n/a when none is inside",
    ),
    ("held-out inside", "held-out images inside the region, seed excluded"),
    ("boundaries", "decision boundaries that bound the region"),
)


def format_table(rows: list[SeedRow]) -> str:
    """A plain-text table of the seed rows (columns: :data:`COLUMNS`)."""
    widths = [max(len(h), 6) for h, _ in COLUMNS]
    head = " ".join(
        h.rjust(w) if i else h.ljust(8) for i, ((h, _), w) in enumerate(zip(COLUMNS, widths))
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        prec = "n/a" if math.isnan(r.heldout_precision) else f"{r.heldout_precision:.3f}"
        cells = [
            r.setup.ljust(8),
            str(r.seed_index),
            str(r.target),
            "?" if r.true_label is None else str(r.true_label),
            str(r.members),
            f"{r.purity:.3f}",
            f"{r.coverage:.3f}",
            prec,
            str(r.heldout_inside),
            str(r.boundaries),
        ]
        lines.append(
            " ".join(c if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        )
    return "\n".join(lines)


def run_demo(
    out_dir: str | Path = "out", seeds: int | Sequence[int] = 4, random_state: int = 0
) -> list[SeedRow]:
    """Run both setups, write PNG figures and ``table.txt`` to ``out_dir``, print the table.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created if needed).
    seeds : int or sequence of int
        On MNIST-5k: a count ``n`` (the first held-out image of each of ``n`` predicted
        classes) or held-out indices. The faces always use one seed per class.
    random_state : int
        Random seed of the split, the training and the interpretations.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    mnist = mnist_setup(random_state)
    if not isinstance(seeds, int):  # checked before the fit
        _check_indices(seeds, len(mnist.heldout))
    rows = run_setup(mnist, seeds, out, random_state)
    rows += run_setup(faces_setup(random_state), 2, out, random_state)
    elapsed = time.perf_counter() - start
    table = format_table(rows)
    (out / "table.txt").write_text(table + "\n", encoding="utf-8")
    print(table)
    print("\ncolumns:\n" + "\n".join(f"  {h}: {m}" for h, m in COLUMNS))
    print(f"\nfigures and table.txt written to {out.resolve()}; demo took {elapsed:.1f} s")
    return rows
