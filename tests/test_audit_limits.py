"""The audit, its figure, the report and saving at their limits: two classes, 4-channel
non-square and 2-channel images, a split layer whose output is 1 x 1, a class of one
image, a repeated class, a model left in training mode, and subgroups of one image
(the silhouette split with too few members or a member its subsample leaves out)."""

from __future__ import annotations

import os
import re
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_repinterp import Interpretation, RepresentativeInterpretation, audit
from captum_repinterp.auditing import _split

pytest.importorskip("sklearn")

FAST = {"n_boundaries": 8, "bisection_steps": 10}


# ------------------------------------------------------------------ odd shapes
def _fitted(in_ch=1, n_classes=4, h=12, w=12, n=120):
    """A TinyCNN-like model whose last layer is re-fitted so that its predictions
    spread over the classes; fitted on its ``n`` images."""
    torch.manual_seed(0)
    features = nn.Sequential(
        nn.Conv2d(in_ch, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
    )  # fmt: skip
    dim = 8 * (h // 2) * (w // 2)
    head = nn.Sequential(nn.Flatten(), nn.Linear(dim, 24), nn.ReLU(), nn.Linear(24, n_classes))
    model = nn.Sequential(features, head).eval()
    g = torch.Generator().manual_seed(1)
    base = torch.randn(n_classes, in_ch, h, w, generator=g)
    labels = torch.arange(n) % n_classes
    x = base[labels] + 0.7 * torch.randn(n, in_ch, h, w, generator=g)
    with torch.no_grad():
        z = head[:3](features(x))
        sol = torch.linalg.lstsq(
            torch.cat([z, torch.ones(n, 1)], 1), F.one_hot(labels, n_classes).float()
        ).solution
        head[3].weight.copy_(sol[:-1].T)
        head[3].bias.copy_(sol[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ri = RepresentativeInterpretation(model, features).fit(x, progress=False)
    return model, ri, x


@pytest.mark.parametrize(
    "in_ch, n_classes, h, w",
    [(1, 2, 12, 12), (4, 3, 8, 16), (2, 4, 12, 12), (1, 4, 2, 2)],
    ids=["two-classes", "4ch-non-square", "2ch", "1x1-layer"],
)
def test_audit_plots_and_saving_on_odd_shapes(tmp_path, in_ch, n_classes, h, w):
    """Regions partition each class, the plots draw, and a saved region loads the same,
    for two classes, 4-channel non-square images, 2-channel images and a split layer
    whose output is 1 x 1."""
    import matplotlib

    matplotlib.use("Agg")
    from captum_repinterp.visualization import plot_audit, plot_region

    _, ri, x = _fitted(in_ch, n_classes, h, w)
    result = audit(ri, x, max_regions=2, coverage_target=1.0, **FAST)
    for ca in result:
        covered = torch.cat([r.members for r in ca.regions] + [ca.uncovered])
        assert sorted(covered.tolist()) == sorted(ca.indices.tolist())
        assert all(r.members[0] == r.seed_index for r in ca.regions)
    plot_audit(next(iter(result)), x)
    it = ri.interpret(x[:1], **FAST)
    plot_region(it, x[:1], x)
    it.save(tmp_path / "r.npz")
    back = Interpretation.load(tmp_path / "r.npz", ri)
    assert back.members.tolist() == it.members.tolist()
    torch.testing.assert_close(back.heatmap(x[:3]), it.heatmap(x[:3]))


def test_audit_of_a_class_with_one_image_and_heldout_without_the_class():
    _, ri, x = _fitted()
    c = int(ri.predictions_[0])
    others = x[ri.predictions_ != c][:10]
    result = audit(ri, x[:1], heldout=others, **FAST)
    (region,) = result[c].regions
    assert region.members.tolist() == [0] and region.purity == 1.0
    assert region.heldout["n_inside"] == 0 or region.heldout_precision == 0.0
    assert f"class {c}: 1 image, 1 region, 0 uncovered" in result.summary()


def test_audit_refuses_a_nan_min_silhouette():
    _, ri, x = _fitted()
    with pytest.raises(ValueError, match="min_silhouette"):
        audit(ri, x, target=0, min_silhouette=float("nan"), **FAST)


def test_audit_takes_a_numpy_float32_coverage_target():
    _, ri, x = _fitted()
    result = audit(ri, x, target=0, coverage_target=np.float32(0.5), **FAST)
    assert result[0].uncovered_share <= 0.5


def test_plot_audit_labels_of_the_wrong_length_name_labels():
    import matplotlib

    matplotlib.use("Agg")
    from captum_repinterp.visualization import plot_audit

    _, ri, x = _fitted()
    result = audit(ri, x, target=0, **FAST)
    with pytest.raises(ValueError, match="labels"):
        plot_audit(result[0], x, labels=torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------ the report
def test_report_regions_of_a_repeated_class_are_not_repeated():
    from captum_repinterp.report import audit_regions

    _, ri, x = _fitted()
    rows, _ = audit_regions(ri, x, classes=[1, 1], regions_per_class=1, **FAST)
    assert len({r.seed_index for r in rows}) == len(rows)


_FACTORY = """
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def forward(self, x):
        return self.head(self.features(x))


MODEL = M()  # left in training mode, as a fresh nn.Module is


def model():
    return MODEL


def data():
    g = torch.Generator().manual_seed(0)
    return 3 + torch.randn(60, 1, 8, 8, generator=g), 3 + torch.randn(30, 1, 8, 8, generator=g)
"""


def test_report_class_check_leaves_a_training_model_alone(tmp_path, monkeypatch):
    from captum_repinterp.report_inputs import prepare_report

    (tmp_path / "training_bn_factory.py").write_text(_FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("training_bn_factory", None)
    import training_bn_factory

    bn = training_bn_factory.MODEL.features[1]
    before = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    try:
        prepare_report("training_bn_factory:model", "training_bn_factory:data", classes=[0, 1, 2])
        assert int(bn.num_batches_tracked) == before[1]
        torch.testing.assert_close(bn.running_mean, before[0])
    finally:
        sys.modules.pop("training_bn_factory", None)


def test_report_with_four_channel_non_square_images(tmp_path):
    """build_report end to end on 4-channel 8 x 16 images of three classes."""
    from captum_repinterp.report import build_report

    model, _, x = _fitted(4, 3, 8, 16, n=90)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        index = build_report(tmp_path, model, model[0], x, x[:45], regions_per_class=1, **FAST)
    page = index.read_text()
    assert "R1" in page and page.count(".png") >= 2
    pngs = [p for p in os.listdir(tmp_path) if p.endswith(".png")]
    assert pngs and all((tmp_path / p).stat().st_size > 0 for p in pngs)


# ------------------------------------------------------ subgroups of one image
@pytest.fixture(scope="module")
def fitted(tiny, one_thread):
    model, x = tiny
    return RepresentativeInterpretation(model, model.features).fit(x, progress=False)


def test_split_stops_at_n_minus_one_groups():
    """Three members, min_size 1, up to 5 groups: the silhouette is defined for 2 groups
    only (k = 3 is one member per group; scikit-learn raised "Number of labels is 3").
    By hand, {0, 0.1} and {10}: s = 1 - 0.1/10, 1 - 0.1/9.9 and 0 for the singleton."""
    x = np.array([[0.0], [0.1], [10.0]])
    labels, score = _split(x, max_groups=5, min_size=1, min_silhouette=-1.0, random_state=0)
    assert labels.tolist() == [0, 0, 1]
    assert score == pytest.approx((1 - 0.1 / 10 + 1 - 0.1 / 9.9 + 0) / 3, abs=1e-12)
    # two members: no split has a silhouette, so one group and no score
    labels, score = _split(x[:2], max_groups=3, min_size=1, min_silhouette=-1.0, random_state=0)
    assert labels.tolist() == [0, 0] and np.isnan(score)


def test_split_skips_a_group_the_silhouette_subsample_misses():
    """1001 members (the silhouette is then taken on a seeded subsample of 1000): one far
    member, placed where the subsample leaves it out, is a group of one that the
    subsample cannot score (scikit-learn raised "Number of labels is 1"); the split is
    skipped and the region stays one group."""
    n, rs = 1001, 3
    left_out = int(np.random.RandomState(rs).permutation(n)[-1])
    x = np.random.default_rng(0).normal(size=(n, 2)) * 0.01
    x[left_out] = 100.0
    labels, score = _split(x, max_groups=2, min_size=1, min_silhouette=-1.0, random_state=rs)
    assert labels.tolist() == [0] * n and np.isnan(score)


def test_audit_of_small_classes_with_groups_of_one(fitted, tiny):
    """min_subgroup_size=1 and max_subgroups above a region's size (classes of 2-6
    images): every region is split at most into n - 1 groups, the groups partition it,
    and the same random_state gives the same audit."""
    _, x = tiny
    images = x[:10]
    kw = dict(min_subgroup_size=1, max_subgroups=20, min_silhouette=-1.0)
    first = audit(fitted, images, **kw)
    again = audit(fitted, images, **kw)
    for c in first.classes:
        for r, s in zip(first[c].regions, again[c].regions):
            sizes = [g.size for g in r.subgroups]
            assert sum(sizes) == r.size
            assert len(sizes) == 1 or 2 <= len(sizes) <= r.size - 1
            joined = torch.sort(torch.cat([g.members for g in r.subgroups])).values
            assert torch.equal(joined, torch.sort(r.members).values)
            assert [g.members.tolist() for g in r.subgroups] == [
                g.members.tolist() for g in s.subgroups
            ]


def test_split_tries_only_the_k_that_can_be_kept(monkeypatch):
    """k-means is run for no k that cannot give a kept split: not above the members'
    distinct rows (identical maps, as every map of a 1 x 1 layer scaled to unit mass:
    scikit-learn warned "Number of distinct clusters (1) found smaller than n_clusters"
    once per k per region) nor above ``n // min_size`` (some group would be smaller than
    ``min_size``: a huge ``max_subgroups`` ran k-means up to ``n - 1`` times)."""
    from sklearn.cluster import KMeans

    tried: list[int] = []

    class Counting(KMeans):
        def fit_predict(self, x, *args, **kwargs):
            tried.append(self.n_clusters)
            return super().fit_predict(x, *args, **kwargs)

    monkeypatch.setattr("sklearn.cluster.KMeans", Counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels, score = _split(np.ones((40, 3)), 3, 5, 0.25, random_state=0)
    assert labels.tolist() == [0] * 40 and np.isnan(score) and tried == []
    # two distinct rows: k = 2 only, and the split found is the one kept
    x = np.repeat(np.array([[0.0, 1.0], [1.0, 0.0]]), 20, axis=0)
    labels, score = _split(x, 3, 5, 0.25, random_state=0)
    assert tried == [2] and labels.tolist() == [0] * 20 + [1] * 20 and score == 1.0
    tried.clear()
    rng = np.random.default_rng(0)
    _split(rng.normal(size=(60, 4)), 10**9, 5, 0.25, random_state=0)
    assert tried == list(range(2, 60 // 5 + 1))


def test_audit_at_a_1x1_layer_gives_no_clustering_warning():
    """At a split layer whose output is 1 x 1 every member's map scaled to unit mass is
    the same: the region is one group, without scikit-learn's warnings, and one warning
    of ours says that no region can split by heat map there (audit said nothing)."""
    _, ri, x = _fitted(1, 4, 2, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = audit(ri, x, max_regions=2, **FAST)
    assert all(len(r.subgroups) == 1 for ca in result for r in ca.regions)
    (only,) = caught
    assert only.category is UserWarning and only.filename == __file__
    assert re.search(
        r"one position per example \(8x1x1\).*subgroup_by='margins'", str(only.message)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audit(ri, x, target=0, max_regions=1, subgroup_by="margins", **FAST)
        _, ri, x = _fitted()  # 3 x 3 positions
        audit(ri, x, target=0, max_regions=1, **FAST)
