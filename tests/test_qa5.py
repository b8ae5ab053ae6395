"""Regression tests for the auto choice's one-pass maps (a layer that gives a one-tensor
tuple, a choice made under ``torch.no_grad()``), the rows a NumPy-indexed sampler or a
loader's ``batch_sampler`` read (with its ``collate_fn``), and the side-by-side figure's
checks of its arguments."""

import warnings

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient, LayerGradientXActivation
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.resolution import choose_heatmap_layer, margin_maps
from captum_repinterp.visualization import plot_comparison


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


@pytest.mark.parametrize("scale", ["image", "column"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("per_image", [(), ("M",)])
def test_comparison_refuses_maps_that_are_not_finite(scale, bad, per_image):
    """A NaN or infinite value gave a NaN/infinite colour scale for the whole column, an
    infinite map labelled 'all values <= 0', or an IndexError inside Captum."""
    images = torch.rand(3, 1, 12, 12)
    maps = torch.rand(3, 1, 12, 12)
    maps[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match=r"attributions\['M'\].*(NaN|infinite)"):
        plot_comparison(images, {"M": maps}, scale=scale, per_image=per_image)


def test_comparison_checks_titles_bad_and_empty_images():
    images, maps = torch.rand(3, 1, 12, 12), {"RI": torch.rand(3, 1, 6, 6)}
    with pytest.raises(ValueError, match="titles"):
        plot_comparison(images, maps, titles=["a"])
    with pytest.raises(ValueError, match="bad"):
        plot_comparison(images, maps, bad=[True])
    with pytest.raises(ValueError, match="images"):
        plot_comparison(images[:0], {"RI": maps["RI"][:0]})
    plot_comparison(images, maps, titles=["a", "b", "c"], bad=[False, True, False])


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
