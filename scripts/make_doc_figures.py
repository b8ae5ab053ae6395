"""Redraw the figures of the README and the docs (``docs/img/``) with the current code.

Usage: ``.venv/bin/python scripts/make_doc_figures.py`` (about 20 s on 2 cores). The small
CNN on MNIST-5k as in the demo: the region of the first held-out image predicted and
labelled 7, and the comparison with Grad-CAM and Integrated Gradients on four seeds.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

from captum_repinterp import RepresentativeInterpretation  # noqa: E402
from captum_repinterp.demo import mnist_setup  # noqa: E402
from captum_repinterp.visualization import compare_methods, plot_region  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    s = mnist_setup(0)
    ri = RepresentativeInterpretation(s.model, s.layer, head=s.head)
    ri.fit(s.references, batch_size=256, progress=False)
    _, preds = ri.transform(s.heldout)
    labels = s.heldout_labels
    seven = next(i for i in range(len(preds)) if int(preds[i]) == 7 and int(labels[i]) == 7)
    seed = s.heldout[seven : seven + 1]
    region = ri.interpret(seed)
    fig = plot_region(
        region, seed, s.references, k=6, seed_label=int(labels[seven]),
        reference_labels=s.reference_labels,
    )  # fmt: skip
    fig.savefig(ROOT / "docs" / "img" / "region_mnist.png", dpi=110)
    seeds = [next(i for i in range(len(preds)) if int(preds[i]) == c) for c in (0, 1, 7, 9)]
    fig, _ = compare_methods(
        s.model, s.layer, ri, s.heldout[seeds], labels=labels[seeds], class_names=None
    )
    fig.savefig(ROOT / "docs" / "img" / "comparison_mnist.png", dpi=110)
    print(f"held-out #{seven}: {region}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
