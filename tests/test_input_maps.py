"""Maps drawn at the input (``heatmap_layer="input"``): integer inputs, an input the model
ignores, empty batches shaped like full ones, audit's default, and the region's score
taken on the layer's tensors as ``fit`` read them (before in-place operations after the
layer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_repinterp import RepresentativeInterpretation


# ------------------------------ integer inputs, empty batches, audit's default
class _IntegerInput(nn.Module):
    """The tiny CNN on integer images (e.g. quantised pixels), scaled inside the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float() / 10)


@pytest.fixture(scope="module")
def fitted(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    return model, x, ri


@pytest.fixture(scope="module")
def three_channels():
    from conftest import TinyCNN

    torch.manual_seed(0)
    model = TinyCNN(in_ch=3).eval()
    x = torch.randn(200, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x, progress=False)
    return x, ri


def test_input_maps_of_integer_inputs_name_heatmap_layer(tiny):
    model, x = tiny
    wrapped = _IntegerInput(model).eval()
    xi = (x[:200] * 10).round().to(torch.int64)
    ri = RepresentativeInterpretation(wrapped, model.features[-1]).fit(xi, progress=False)
    for call in (
        lambda: ri.attribute(xi[:2], heatmap_layer="input", n_boundaries=5),
        lambda: ri.interpret(xi[:1], heatmap_layer="input", n_boundaries=5),
    ):
        with pytest.raises(TypeError, match="heatmap_layer.*floating"):
            call()
    # "auto" (the default) keeps the split layer for integer references, with the reason
    with pytest.warns(UserWarning, match="torch.int64 images"):
        assert ri.attribute(xi[:2], n_boundaries=5).shape == (2, 1, 6, 6)


@pytest.mark.parametrize("summed", [True, False])
def test_empty_batch_at_the_input_is_shaped_like_a_full_one(three_channels, summed):
    x, ri = three_channels
    full = ri.attribute(x[:2], heatmap_layer="input", n_boundaries=5, attr_dim_summation=summed)
    empty = ri.attribute(x[:0], heatmap_layer="input", attr_dim_summation=summed)
    assert full.shape == (2, 1 if summed else 3, 12, 12)
    assert empty.shape == (0, *full.shape[1:]) and empty.dtype == full.dtype


def test_empty_batch_at_the_input_of_a_vector_model():
    torch.manual_seed(3)
    mlp = nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    ).eval()
    x = 3 * torch.randn(200, 10, generator=torch.Generator().manual_seed(0))
    ri = RepresentativeInterpretation(mlp, mlp[3]).fit(x, progress=False)
    full = ri.attribute(x[:2], heatmap_layer="input", n_boundaries=5)
    assert full.shape == (2, 1)  # input times gradient summed over the D features
    assert ri.attribute(x[:0], heatmap_layer="input").shape == (0, 1)


@pytest.mark.parametrize("heatmap_layer", ["input", None])
def test_empty_batch_keeps_float64(tiny, heatmap_layer):
    """(At the split layer an empty batch of a float64 model gave float32 maps.)"""
    model, x = tiny
    m64 = type(model)().double().eval()
    m64.load_state_dict(model.state_dict())
    ri = RepresentativeInterpretation(m64, m64.features[-1]).fit(x[:200].double(), progress=False)
    full = ri.attribute(x[:1].double(), heatmap_layer=heatmap_layer, n_boundaries=5)
    empty = ri.attribute(x[:0].double(), heatmap_layer=heatmap_layer)
    assert full.dtype == empty.dtype == torch.float64
    assert empty.shape == (0, *full.shape[1:])


@pytest.mark.parametrize("heatmap_layer", ["input", None])
@pytest.mark.parametrize("rule", ["elementwise-members", "elementwise", "region-members"])
def test_interpretation_heatmap_on_an_empty_batch(fitted, heatmap_layer, rule):
    _, x, ri = fitted
    if heatmap_layer == "input" and rule == "region-members":
        pytest.skip("region-members is drawn at the split layer only")
    region = ri.interpret(
        x[250:251], heatmap_layer=heatmap_layer, heatmap_rule=rule, n_boundaries=5
    )
    full = region.heatmap(x[250:252])
    empty = region.heatmap(x[:0])
    assert empty.shape == (0, *full.shape[1:]) and empty.dtype == full.dtype
    # and as attribute() gives on an empty batch
    got = ri.attribute(x[:0], heatmap_layer=heatmap_layer, heatmap_rule=rule)
    assert got.shape == empty.shape


def test_interpretation_heatmap_on_an_empty_batch_at_an_earlier_layer(fitted):
    model, x, ri = fitted
    region = ri.interpret(x[250:251], heatmap_layer=model.features[0], n_boundaries=5)
    assert region.heatmap(x[250:252]).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="empty batch"):
        region.heatmap(x[:0])


def test_audit_takes_interprets_default_heatmap_layer(fitted):
    from captum_repinterp.auditing import audit

    _, x, ri = fitted
    kwargs = dict(target=0, max_regions=1, n_boundaries=5, subgroup_by="none")
    left_out = audit(ri, x[:200], **kwargs)
    auto = audit(ri, x[:200], heatmap_layer="auto", **kwargs)
    assert [r.interpretation.members.tolist() for r in auto[0].regions] == [
        r.interpretation.members.tolist() for r in left_out[0].regions
    ]
    assert all(r.interpretation.heatmap_layer is None for r in auto[0].regions)
    with pytest.raises(ValueError, match="^heatmap_layer"):
        audit(ri, x[:200], heatmap_layer="input", **kwargs)


def test_input_maps_of_an_input_the_model_ignores_say_so(tiny):
    class Ignores(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.model(a)

    model, x = tiny
    y = torch.randn_like(x)
    wrapped = Ignores(model).eval()
    ri = RepresentativeInterpretation(wrapped, model.features[-1])
    ri.fit((x[:200], y[:200]), progress=False)
    with pytest.raises(ValueError, match="heatmap_layer='input'.*every input tensor"):
        ri.attribute((x[:2], y[:2]), heatmap_layer="input", n_boundaries=5)


# --------------- the region's score before in-place operations after the layer
def _spread(model: nn.Module, fc: nn.Linear, x: torch.Tensor, scale: float = 20.0) -> None:
    """Re-draw a final Linear so that random inputs spread over its classes."""
    seen = []
    handle = fc.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(*x) if isinstance(x, tuple) else model(x)
        handle.remove()
        fc.weight.mul_(scale)
        fc.bias.copy_(-(seen[0] @ fc.weight.T).mean(0))


def _input_x_grad(model, layer, x, direction, to_layer_input=False):
    """Input times gradient of relu(direction) . psi(x), psi the layer's tensor as the
    layer gives it (copied before anything after it runs), summed over channels, ReLU-ed."""
    xi = x.detach().clone().requires_grad_(True)
    seen = []
    if to_layer_input:
        handle = layer.register_forward_pre_hook(lambda m, i: seen.append(i[0].clone()))
    else:
        handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    try:
        model(xi)
    finally:
        handle.remove()
    psi = seen[0].reshape(x.shape[0], -1)
    (grad,) = torch.autograd.grad((psi * direction.clamp_min(0)).sum(), xi)
    return (grad * xi).sum(1, keepdim=True).clamp_min(0)


class _InplaceAfter(nn.Module):
    """The split layer's output (negative values too) is ReLU-ed in place afterwards, as
    DenseNet's forward does with ``F.relu(features, inplace=True)``."""

    def __init__(self, relu_module: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6 * 4 * 4, 3)
        self.relu_module = relu_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        if self.relu_module:  # the ReLU module changes its input in place
            a = self.relu(a)
        else:
            F.relu(a, inplace=True)
        return self.fc(F.adaptive_avg_pool2d(a, 4).flatten(1))


@pytest.mark.parametrize("to_layer_input", [False, True])
def test_input_map_takes_the_score_at_the_layer_before_in_place_ops(to_layer_input):
    torch.manual_seed(0)
    model = _InplaceAfter(relu_module=to_layer_input).eval()
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    _spread(model, model.fc, x)
    # to_layer_input: the features are the input of the in-place ReLU, which it changes
    layer = model.relu if to_layer_input else model.conv
    ri = RepresentativeInterpretation(model, layer).fit(
        x, progress=False, attribute_to_layer_input=to_layer_input
    )
    assert bool((ri.features_ < 0).any())  # the in-place ReLU matters
    kw = {"n_boundaries": 10, "heatmap_rule": "elementwise-positive", "heatmap_layer": "input"}
    region = ri.interpret(x[:1], **kw)
    assert region.heatmap_layer == "input"
    hand = _input_x_grad(model, layer, x[:4], region.direction, to_layer_input)
    torch.testing.assert_close(region.heatmap(x[:4]), hand)
    attr = ri.attribute(x[:1], **kw)
    torch.testing.assert_close(attr, hand[:1])


@pytest.mark.parametrize("heatmap_layer", ["input", "features.0"])
def test_batched_maps_equal_each_images_own_map_to_rounding(tiny, heatmap_layer):
    """Maps at the input or an earlier layer take one batched gradient (one per image
    was 6x slower): a batch's maps equal each image's own map up to float rounding, for
    ``attribute`` (a region per seed) and for one region's ``heatmap`` on many images."""
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    layer = heatmap_layer if heatmap_layer == "input" else model.features[0]
    kw = {"heatmap_layer": layer, "n_boundaries": 12}
    batch = ri.attribute(x[200:206], **kw)
    alone = torch.cat([ri.attribute(x[i : i + 1], **kw) for i in range(200, 206)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
    region = ri.interpret(x[200:201], **kw)
    maps = region.heatmap(x[:40])
    own = torch.cat([region.heatmap(x[i : i + 1]) for i in range(40)])
    torch.testing.assert_close(maps, own, rtol=1e-5, atol=1e-6)
    assert maps.abs().sum() > 0
