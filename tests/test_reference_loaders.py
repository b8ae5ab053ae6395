"""References given as a Dataset or a DataLoader: read in order or said not to be
(shuffling, samplers, a shuffled batch sampler), random transforms said to be so, the
progress bar counting the loader's own batches, and ``plot_region`` reading the reference
images again from what was given to ``fit`` (or saying why it cannot)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from captum_repinterp import RepresentativeInterpretation

RANDOM_STATE = {"random_state": 0}


# here, not in conftest: fit's warnings point at the caller of fit, this file
def _fit(model, layer, refs, **kwargs):
    return RepresentativeInterpretation(model, layer).fit(refs, progress=False, **kwargs)


def test_plot_region_takes_the_dataset_or_loader_given_to_fit(tiny):
    from torch.utils.data import DataLoader, TensorDataset

    from captum_repinterp.visualization import _reference_rows, plot_region

    model, x = tiny
    refs = x[:80]
    dataset = TensorDataset(refs, torch.zeros(80))
    loader = DataLoader(dataset, batch_size=16)
    ri = _fit(model, model.features, loader)
    region = ri.interpret(x[200:201], **RANDOM_STATE)
    members = region.similar(3)
    for given in (dataset, loader, TensorDataset(refs)):
        assert torch.equal(_reference_rows(given, members), refs[members])
        assert _reference_rows(given, members[:0]).shape == (0, *refs.shape[1:])
        fig = plot_region(region, x[200], given, k=3)
        assert len(fig.axes) >= 1 + len(members)
    with pytest.raises(ValueError, match="reference_images"):
        plot_region(region, x[200], refs[: int(members.max())])
    with pytest.raises(TypeError, match="reference_images"):
        plot_region(region, x[200], refs.numpy())


def test_shuffled_loader_warns_at_fit_and_is_refused_by_plot_region(tiny):
    from torch.utils.data import DataLoader, TensorDataset

    from captum_repinterp.visualization import plot_region

    model, x = tiny
    loader = DataLoader(TensorDataset(x[:80]), batch_size=16, shuffle=True)
    with pytest.warns(UserWarning, match="does not read its dataset in order") as caught:
        ri = _fit(model, model.features, loader)
    assert caught[0].filename == __file__  # points at the caller of fit
    region = ri.interpret(x[200:201], **RANDOM_STATE)
    with pytest.raises(ValueError, match="^reference_images: .*in order"):
        plot_region(region, x[200], loader)


def test_a_shuffled_batch_sampler_is_said_to_be_out_of_order(tiny):
    """A DataLoader given ``batch_sampler=`` over a RandomSampler reads its dataset out of
    order (its own ``sampler`` is then a SequentialSampler): fit warns as for
    ``shuffle=True``, and reference images are not mapped by member index."""
    from torch.utils.data import BatchSampler, RandomSampler

    from captum_repinterp.visualization import _reference_rows

    model, x = tiny
    shuffled = RandomSampler(range(60), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x[:60]), batch_sampler=BatchSampler(shuffled, 8, False))
    ri = RepresentativeInterpretation(model, model.features[-1])
    with pytest.warns(UserWarning, match="does not read its dataset in order"):
        ri.fit(loader, progress=False)
    with pytest.raises(ValueError, match="reference_images"):
        _reference_rows(loader, torch.tensor([0, 1]))


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
