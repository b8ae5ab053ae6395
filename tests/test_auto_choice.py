"""``heatmap_layer="auto"`` reads the references as ``fit`` read them (a Dataset of NumPy
arrays, a DataLoader's collate_fn, sampler, batch_sampler or drop_last, an iterable
dataset, a tuple of one tensor), scores layers that give a one-tensor tuple, is made the
same under ``torch.no_grad()``, and is only made when the rule can use it."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient, LayerGradientXActivation
from torch import nn
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler, TensorDataset

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.resolution import choose_heatmap_layer, margin_maps


# -------------------------------------------- references read as fit read them
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


# -------------------- a layer that gives a one-tensor tuple, no_grad, samplers
class _TupleConv(nn.Module):
    """A layer whose output is a tuple of one tensor (unpacked by the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.relu(self.conv(x)),)


class _UnpacksTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = _TupleConv()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h,) = self.block(x)
        return self.fc(h.flatten(1))


def test_margin_maps_keep_a_one_tensor_tuple_a_tuple():
    """The copy handed on after the layer has the layer's output structure: the model
    unpacking ``(h,)`` runs, and the maps are Captum's."""
    model = _UnpacksTuple().eval()
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    top, ru = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2])
    at_layer, at_input = margin_maps(model, model.block, x, top, ru)

    def margin(inp):
        out = model(inp)
        return out[torch.arange(4), top] - out[torch.arange(4), ru]

    layer = LayerGradientXActivation(margin, model.block).attribute(x)
    layer = layer[0] if isinstance(layer, tuple) else layer
    torch.testing.assert_close(at_layer, layer.sum(1, keepdim=True).clamp_min(0))
    inp = InputXGradient(margin).attribute(x.clone().requires_grad_(True))
    torch.testing.assert_close(at_input, inp.sum(1, keepdim=True).clamp_min(0))
    assert not model.block._forward_hooks


def test_auto_scores_a_layer_that_gives_a_one_tensor_tuple():
    model = _UnpacksTuple().eval()
    x = torch.randn(40, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    choice = choose_heatmap_layer(model, model.block, x)
    assert choice.scores, choice.reason


def test_auto_chosen_under_no_grad_is_the_same_choice(tiny):
    """``torch.no_grad()`` is said to be fine: a choice first made inside it (and kept for
    the fit) is the one made outside, not a fallback to the split layer."""
    model, x = tiny
    want = choose_heatmap_layer(model, model.features[-1], x[:80])
    with torch.no_grad():
        got = choose_heatmap_layer(model, model.features[-1], x[:80])
    assert got == want and got.scores
    ri = RepresentativeInterpretation(model, model.features[-1], head=model.head)
    ri.fit(x[:80], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "draws the maps at the split layer" warning
        with torch.no_grad():
            ri.attribute(x[:1], target=int(ri.predictions_[0]))
    assert ri.heatmap_resolution_ == want


def test_auto_reads_a_sampler_of_numpy_indices(tiny):
    """A ``SubsetRandomSampler`` over a NumPy array of indices (a common split) lists its
    rows as a list of the same indices does."""
    model, x = tiny
    rows = np.arange(0, 120, 2)
    data = TensorDataset(x[:120])
    by_list = DataLoader(data, batch_size=16, sampler=SubsetRandomSampler(rows.tolist()))
    by_array = DataLoader(data, batch_size=16, sampler=SubsetRandomSampler(rows))
    want = choose_heatmap_layer(model, model.features[-1], by_list)
    got = choose_heatmap_layer(model, model.features[-1], by_array)
    assert got == want and got.scores, got.reason


def test_auto_reads_a_loader_given_a_batch_sampler_as_fit_did(tiny):
    """A DataLoader built with ``batch_sampler=`` (its ``batch_size`` is None) still
    collates with its ``collate_fn`` and reads only its batch sampler's rows; the choice
    equals the one on the tensor of those references."""
    from torch.utils.data import BatchSampler, SequentialSampler

    model, x = tiny
    refs = x[:60]
    expected = choose_heatmap_layer(model, model.features[-1], refs)
    mean, std = 0.3, 2.0
    raw = TensorDataset(refs * std + mean, torch.zeros(60))

    def scale(items):
        return (torch.stack([im for im, _ in items]) - mean) / std, None

    others = TensorDataset(torch.cat([refs, 5 * torch.randn(240, *refs.shape[1:])]))
    rows = SubsetRandomSampler(range(60), generator=torch.Generator().manual_seed(0))
    for given in (
        DataLoader(
            raw, batch_sampler=BatchSampler(SequentialSampler(raw), 16, False), collate_fn=scale
        ),
        DataLoader(others, batch_sampler=BatchSampler(rows, 8, False)),
    ):
        got = choose_heatmap_layer(model, model.features[-1], given)
        assert got.scores, got.reason
        assert got.heatmap_layer == expected.heatmap_layer and got.n_images == expected.n_images
        assert got.scores == pytest.approx(expected.scores, abs=1e-6)
        assert got.p_value == pytest.approx(expected.p_value)


def test_integer_references_say_why_auto_keeps_the_split_layer(one_thread):
    """uint8 references (the model scales them itself): ``heatmap_layer="auto"`` keeps
    the split layer because the input's maps need float inputs; the reason said "the
    references are not one N x C x H x W batch", which they are."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x.float() / 255 - 0.5))

    torch.manual_seed(0)
    model = Scaled().eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 8, 8), generator=gen, dtype=torch.uint8)
    with torch.no_grad():  # spread the predictions over the classes
        z = model.head[:2](model.features(images.float() / 255 - 0.5))
        model.head[2].weight.copy_(torch.randn(4, 24, generator=gen) / z.std(0).clamp_min(1e-6))
        model.head[2].bias.copy_(-(z @ model.head[2].weight.T).mean(0))
    ri = RepresentativeInterpretation(model, model.features).fit(images, progress=False)
    with pytest.warns(UserWarning, match="torch.uint8 images"):
        choice = ri.heatmap_resolution_
    assert choice.heatmap_layer is None
    assert "floating-point inputs" in choice.reason
    assert ri.attribute(images[:2]).shape == (2, 1, 8, 8)


def test_the_choice_shows_its_progress_when_fit_did(tiny, capsys):
    """The one-off choice ran inside the first map call with no sign of it (a new user
    waited 95 s on a ResNet-50 at 112 px in an attribute call that looks like
    LayerGradCam's). It now shows a progress bar when fit showed one (fit's default),
    counting the references scored, and none after fit(progress=False)."""
    model, x = tiny
    quiet = _fit(model, x[:200])
    assert quiet.heatmap_resolution_.n_images > 0
    assert "scoring both maps" not in capsys.readouterr().err
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200])
    capsys.readouterr()
    choice = ri.heatmap_resolution_
    err = capsys.readouterr().err
    assert 'heatmap_layer="auto": scoring both maps on references' in err
    assert f"{choice.n_images}/{choice.n_images}" in err
    # the bar's total is the sample taken so far (16, then 32, 64 when the maps are
    # close), never the largest sample it may not reach ("0/64" ending at "16/16")
    totals = {int(t) for t in re.findall(r"\| *\d+/(\d+) ", err)}
    assert totals <= {16, 32, 64} and max(totals) == choice.n_images, err
    assert choice == quiet.heatmap_resolution_
