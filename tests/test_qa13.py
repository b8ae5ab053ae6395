"""Breaker round 5: references read from Datasets, heat-map consistency, audits at their
limits, numeric edge cases. Each test is a call that used to go wrong."""

import warnings

import numpy as np
import pytest
import torch

from captum_repinterp import RepresentativeInterpretation, audit
from captum_repinterp.auditing import _split

pytest.importorskip("sklearn")


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


class _Shifted(torch.utils.data.Dataset):
    """(image, label) items; with ``random=True`` each read rolls the image by a random
    offset of up to 2 pixels and flips it at random (RandomCrop / RandomHorizontalFlip
    in spirit), drawn from the global torch RNG as torchvision's transforms do."""

    def __init__(self, x, random):
        self.x, self.random = x, random

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        img = self.x[i]
        if self.random:
            dy, dx = torch.randint(-2, 3, (2,)).tolist()
            img = torch.roll(img, (dy, dx), dims=(1, 2))
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
        return img, i % 4


@pytest.mark.parametrize("wrap", ["dataset", "loader"])
def test_references_with_random_transforms_are_said_to_be_so(tiny, one_thread, wrap):
    """Two reads of one reference give two images: the features fit keeps are of one
    draw, while plot_region and heatmap_layer="auto" read the references again. fit
    says so (it said nothing), and only for random items; the check draws nothing from
    the global RNG: after fit it is where reading the references once leaves it."""
    model, x = tiny
    for random in (True, False):
        ds = _Shifted(x[:64], random)
        refs = ds if wrap == "dataset" else torch.utils.data.DataLoader(ds, batch_size=16)
        torch.manual_seed(5)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            ri = RepresentativeInterpretation(model, model.features).fit(refs, progress=False)
        after_fit = torch.get_rng_state()
        said = [str(w.message) for w in record if "random transforms" in str(w.message)]
        assert len(said) == (1 if random else 0), said
        if random:
            assert said[0].startswith("references:")
            torch.manual_seed(5)
            for _ in refs if wrap == "loader" else (ds[i] for i in range(len(ds))):
                pass
            assert torch.equal(torch.get_rng_state(), after_fit)
        assert ri.features_.shape[0] == 64


class _Stream(torch.utils.data.IterableDataset):
    """(image, label) items in order, without random access."""

    def __init__(self, x):
        self.x = x

    def __iter__(self):
        return ((img, i % 4) for i, img in enumerate(self.x))


class _Batches(torch.utils.data.Dataset):
    """Items that are batches of 10 references, for ``DataLoader(batch_size=None)``."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x) // 10

    def __getitem__(self, i):
        return self.x[10 * i : 10 * i + 10], torch.zeros(10, dtype=torch.long)


@pytest.mark.parametrize("kind", ["iterable", "iterable-loader", "unbatched-loader"])
def test_plot_region_says_why_references_without_rows_cannot_be_drawn(tiny, one_thread, kind):
    """References fit reads in order but plot_region cannot read by index: an iterable
    dataset (a raw "object of type ... has no len()", or inside a DataLoader "does not
    read its dataset in order (shuffle=True or a sampler)", which it does) and a
    DataLoader with batch_size=None, whose items are batches ("only 6 reference images
    were given; pass the reference set given to fit", which the user did)."""
    from captum_repinterp.visualization import plot_region

    model, x = tiny
    x = x[:60]
    refs = {
        "iterable": _Stream(x),
        "iterable-loader": torch.utils.data.DataLoader(_Stream(x), batch_size=16),
        "unbatched-loader": torch.utils.data.DataLoader(_Batches(x), batch_size=None),
    }[kind]
    ri = RepresentativeInterpretation(model, model.features).fit(refs, progress=False)
    assert torch.equal(ri.features_, ri.transform(x)[0])  # fit read every row, in order
    region = ri.interpret(x[:1], heatmap_layer=None)
    why = "batch_size=None" if kind == "unbatched-loader" else "iterable-style"
    with pytest.raises(ValueError, match=f"reference_images: .*{why}"):
        plot_region(region, x[0], refs)
    plot_region(region, x[0], x)  # the same rows as a tensor draw


@pytest.mark.parametrize("sampling", ["drop_last", "list_sampler", "subset_random"])
def test_a_finished_store_of_a_loader_reading_some_rows_is_reused(
    tiny, one_thread, tmp_path, sampling
):
    """A DataLoader that reads fewer rows than its dataset holds (drop_last=True, or a
    sampler of some indices): fit again with the same loader and store reuses the
    store (it said "already holds a finished fit of 256 references; pass append=True
    to add these", comparing with len(dataset)). A random sampler reads another order
    the second time: refused as other references."""
    model, x = tiny
    ds = torch.utils.data.TensorDataset(x[:100], torch.zeros(100, dtype=torch.long))
    kw = {
        "drop_last": dict(batch_size=32, drop_last=True),
        "list_sampler": dict(batch_size=16, sampler=list(range(99, 19, -1))),
        "subset_random": dict(
            batch_size=16,
            sampler=torch.utils.data.SubsetRandomSampler(
                range(20, 100), generator=torch.Generator().manual_seed(0)
            ),
        ),
    }[sampling]
    loader = torch.utils.data.DataLoader(ds, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the samplers' "not in order" warning
        first = RepresentativeInterpretation(model, model.features).fit(
            loader, progress=False, store=tmp_path
        )
        assert first.features_.shape[0] == (96 if sampling == "drop_last" else 80)
        rows_run = []
        hook = model.register_forward_hook(lambda m, i, o: rows_run.append(i[0].shape[0]))
        try:
            if sampling == "subset_random":
                with pytest.raises(ValueError, match="store: .*other references"):
                    RepresentativeInterpretation(model, model.features).fit(
                        loader, progress=False, store=tmp_path
                    )
                return
            again = RepresentativeInterpretation(model, model.features).fit(
                loader, progress=False, store=tmp_path
            )
        finally:
            hook.remove()
    assert torch.equal(torch.as_tensor(again.features_), torch.as_tensor(first.features_))
    assert sum(rows_run) < 32  # the first rows checked, nothing recomputed


@pytest.mark.parametrize("drop_last", [False, True])
def test_fit_progress_counts_a_loaders_own_batches(tiny, one_thread, monkeypatch, drop_last):
    """A DataLoader keeps its own batch size: the progress bar's total was
    ceil(len(dataset) / batch_size) with fit's batch_size (128), so a loader of 100
    rows in batches of 16 showed 7/1."""
    import captum_repinterp.features as features

    totals = []

    def recording_tqdm(iterable, total=None, **kwargs):
        totals.append(total)
        return iterable

    monkeypatch.setattr(features, "tqdm", recording_tqdm)
    model, x = tiny
    ds = torch.utils.data.TensorDataset(x[:100])
    loader = torch.utils.data.DataLoader(ds, batch_size=16, drop_last=drop_last)
    RepresentativeInterpretation(model, model.features).fit(loader, progress=True)
    assert totals[0] == len(list(loader)) == (6 if drop_last else 7)
    totals.clear()
    RepresentativeInterpretation(model, model.features).fit(ds, batch_size=16, progress=True)
    assert totals[0] == 7
