"""Regression tests for ``heatmap_layer="auto"``: the references it scores are the ones
``fit`` read (a DataLoader's collate_fn and sampler, a Dataset of NumPy arrays), and the
choice is only made when the rule can use it."""

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler, TensorDataset

from captum_repinterp import RepresentativeInterpretation


def _fit(model, refs):
    ri = RepresentativeInterpretation(model, model.features[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a sampler's member-order warning
        return ri.fit(refs, progress=False)


def _choice(ri):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the split layer
        return ri.heatmap_resolution_


class _NumpyItems(Dataset):
    """(image, label) items as NumPy arrays: fit's DataLoader collates them to tensors."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i].numpy(), i % 4


def test_auto_reads_the_references_as_fit_did(tiny):
    """A Dataset of NumPy images, a DataLoader whose collate_fn scales the raw images
    and one whose sampler reads only some rows of its dataset: the choice is scored on
    the images fit read, so it equals the one on the tensor of those references."""
    model, x = tiny
    refs = x[:60]
    expected = _choice(_fit(model, refs))
    mean, std = 0.3, 2.0
    raw = TensorDataset(refs * std + mean, torch.zeros(60))

    def scale(items):
        return (torch.stack([im for im, _ in items]) - mean) / std, None

    # rows 60.. of this dataset are not references: only the sampler's rows are
    others = torch.cat([refs, 5 * torch.randn(240, *refs.shape[1:])])
    sampler = SubsetRandomSampler(range(60), generator=torch.Generator().manual_seed(0))
    for given in (
        _NumpyItems(refs),
        DataLoader(_NumpyItems(refs), batch_size=16),
        DataLoader(raw, batch_size=16, collate_fn=scale),
        DataLoader(TensorDataset(others), batch_size=8, sampler=sampler),
        DataLoader(TensorDataset(others), batch_size=8, sampler=list(range(60))),
    ):
        ri = _fit(model, given)
        # the same references (the random sampler reads them in another order)
        row_sums = [f.sum(1).sort().values for f in (ri.features_, _fit(model, refs).features_)]
        torch.testing.assert_close(*row_sums)
        got = _choice(ri)
        assert got.heatmap_layer == expected.heatmap_layer
        assert got.scores == pytest.approx(expected.scores, abs=1e-6)
        assert got.p_value == pytest.approx(expected.p_value)


def test_auto_is_not_chosen_for_rules_drawn_at_the_split_layer(tiny, monkeypatch):
    """Rules that cannot draw at the input ("channel", "region-score", ...) draw at the
    split layer under "auto": the choice (up to half a minute on a VGG-16, and its
    fallback warning) is not run for them."""
    import captum_repinterp.resolution as res

    model, x = tiny
    ri = _fit(model, x[:200])

    def fail(*args, **kwargs):
        raise AssertionError("the choice ran")

    monkeypatch.setattr(res, "choose_heatmap_layer", fail)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        region = ri.interpret(x[200:201], heatmap_rule="channel", n_boundaries=10)
        attr = ri.attribute(x[200:202], heatmap_rule="channel", n_boundaries=10)
    assert region.heatmap_layer is None and attr.shape == (2, 1, 6, 6)
    assert "_resolution" not in ri.__dict__


def test_inference_mode_is_refused_and_does_not_fix_the_choice(tiny):
    """Under torch.inference_mode() no gradient can be taken: a clear RuntimeError,
    not autograd's, nor a misleading heatmap_layer error, nor a choice cached as the
    split layer for the rest of the fit (torch.no_grad() is fine)."""
    model, x = tiny
    ri = _fit(model, x[:200])
    expected = _choice(ri)
    ri.__dict__.pop("_resolution", None)
    region = ri.interpret(x[200:201], n_boundaries=10, heatmap_layer="input")
    for call in (
        lambda: ri.attribute(x[200:202], n_boundaries=10),
        lambda: ri.interpret(x[200:201], n_boundaries=10, heatmap_layer=None),
        lambda: region.heatmap(x[200:202]),
        lambda: ri.heatmap_resolution_,
    ):
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
            call()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="^attribute takes"):
        ri.attribute(x[200:202], n_boundaries=10)  # names the call the user made
    assert _choice(ri) == expected
    with torch.no_grad():
        torch.testing.assert_close(
            ri.attribute(x[200:201], n_boundaries=10), region.heatmap(x[200:201])
        )


def test_out_of_memory_in_the_choice_is_raised_not_kept(tiny):
    """Running out of memory while scoring the maps says nothing about the model: it is
    raised (as the other calls do), not kept as a split-layer choice for the whole fit."""
    from torch import nn

    model, x = tiny

    class OutOfMemoryOnce(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.armed = model, False

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            if self.armed and torch.is_grad_enabled():  # the maps' backward pass
                self.armed = False
                raise torch.OutOfMemoryError("out of memory")
            return self.model(z)

    wrapped = OutOfMemoryOnce().eval()
    ri = RepresentativeInterpretation(wrapped, model.features[-1]).fit(x[:200], progress=False)
    wrapped.armed = True
    with pytest.raises(torch.OutOfMemoryError):
        _ = ri.heatmap_resolution_
    assert _choice(ri) == _choice(_fit(model, x[:200]))


def test_a_tuple_of_one_tensor_is_that_tensor(tiny):
    """fit takes Captum's tuple form; the references (x,) give the choice x gives, and
    the region-members rule finds their images (no fallback warning, same maps)."""
    model, x = tiny
    by_tensor, by_tuple = _fit(model, x[:200]), _fit(model, (x[:200],))
    assert _choice(by_tuple) == _choice(by_tensor)
    for rule in ("elementwise-members", "region-members"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = by_tuple.attribute((x[200:202],), n_boundaries=10, heatmap_rule=rule)
        torch.testing.assert_close(
            got, by_tensor.attribute(x[200:202], n_boundaries=10, heatmap_rule=rule)
        )


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __iter__(self):
        return iter(self.x)


def test_an_iterable_dataset_is_not_said_to_be_shuffled(tiny):
    """A DataLoader over an iterable dataset reads it in its own order: no warning about
    shuffling or samplers (the choice's own warning about random access stays)."""
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ri.fit(DataLoader(_Stream(x[:60]), batch_size=16), progress=False)
    assert not [w for w in caught if "in order" in str(w.message)]
    torch.testing.assert_close(ri.features_, _fit(model, x[:60]).features_)


class _Pooled(torch.nn.Module):
    """Any image size runs (global average pooling after the split layer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_a_wrong_image_size_names_the_input_shapes(tiny):
    _, x = tiny
    model = _Pooled().eval()
    with torch.no_grad():  # spread the predictions over the classes
        h = model.head[:2](model.features(x[:60]))
        y = torch.nn.functional.one_hot(torch.arange(60) % 3, 3).float()
        sol = torch.linalg.lstsq(torch.cat([h, torch.ones(60, 1)], 1), y).solution
        model.head[2].weight.copy_(sol[:-1].T)
        model.head[2].bias.copy_(sol[-1])
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:60], progress=False)
    small = torch.nn.functional.interpolate(x[:2], size=(8, 8))
    with pytest.raises(ValueError, match=r"examples of shape \(1, 8, 8\).*\(1, 12, 12\)"):
        ri.interpret(small[:1], heatmap_layer=None)


def test_auto_samples_only_rows_a_drop_last_loader_read(tiny, monkeypatch):
    """With drop_last=True fit never read the last partial batch: the choice samples the
    rows it read (in order), and with a shuffled loader, whose dropped rows depend on the
    draw, keeps the split layer and says why."""
    import captum_repinterp.resolution as res

    model, x = tiny
    seen: list[int] = []
    real = res.reference_rows

    def spy(references, rows, *args, **kwargs):
        seen.extend(int(r) for r in rows)
        return real(references, rows, *args, **kwargs)

    monkeypatch.setattr(res, "reference_rows", spy)
    loader = DataLoader(TensorDataset(x[:70]), batch_size=32, drop_last=True)
    ri = _fit(model, loader)
    assert ri.n_references_ == 64
    _choice(ri)
    assert seen and max(seen) < 64
    shuffled = DataLoader(TensorDataset(x[:70]), batch_size=32, drop_last=True, shuffle=True)
    choice = res.choose_heatmap_layer(model, model.features[-1], shuffled)
    assert choice.heatmap_layer is None and "sampler" in choice.reason
