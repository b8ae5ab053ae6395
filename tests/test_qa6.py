"""The default heat map (elementwise-positive drawn at the input) on odd models."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_repinterp import RepresentativeInterpretation


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
    region = ri.interpret(x[:1], n_boundaries=10)
    assert region.heatmap_layer == "input"
    hand = _input_x_grad(model, layer, x[:4], region.direction, to_layer_input)
    torch.testing.assert_close(region.heatmap(x[:4]), hand)
    attr = ri.attribute(x[:1], n_boundaries=10)
    torch.testing.assert_close(attr, hand[:1])


class _Gated(nn.Module):
    """One conv block and a linear head; ``body`` decides how the input reaches it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def body(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if self.kind == "unused":  # a second input the model ignores
            return self.conv(x)
        if self.kind == "mask":  # a second input used only through a comparison
            return self.conv(x * (rest[0] > 0))
        if self.kind == "detach":
            return self.conv(x.detach())
        if self.kind == "round":  # piecewise constant: zero gradient everywhere
            return self.conv(torch.round(x * 4) / 4)
        return self.conv(x)

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.body(x, *rest)).flatten(1))


def _gated(kind: str):
    torch.manual_seed(0)
    model = _Gated(kind).eval()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, 6, 6, generator=gen), torch.randn(40, 1, 6, 6, generator=gen)
    inputs = (x, y) if kind in ("unused", "mask") else (x,)
    _spread(model, model.fc, inputs if len(inputs) > 1 else x)
    ri = RepresentativeInterpretation(model, model.relu)
    return model, ri.fit(inputs if len(inputs) > 1 else x, progress=False), inputs


def _state(model: nn.Module):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.grad is None for p in model.parameters()],
        sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
    )


@pytest.mark.parametrize("kind", ["unused", "mask", "detach", "round"])
def test_default_falls_back_when_the_input_has_no_gradient(kind):
    model, ri, inputs = _gated(kind)
    seeds = tuple(t[:3] for t in inputs)
    seeds = seeds if len(seeds) > 1 else seeds[0]
    before = _state(model)
    with pytest.warns(UserWarning, match="heatmap_layer: the default .* split layer"):
        attr = ri.attribute(seeds, n_boundaries=8)
    with pytest.warns(UserWarning, match="split layer"):
        regions = ri.interpret(seeds, n_boundaries=8)
    assert _state(model) == before
    assert all(r.heatmap_layer is None for r in regions)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        at_layer = ri.attribute(seeds, n_boundaries=8, heatmap_layer=None)
    torch.testing.assert_close(attr, at_layer)
    for i, r in enumerate(regions):
        one = tuple(t[i : i + 1] for t in inputs) if len(inputs) > 1 else inputs[0][i : i + 1]
        torch.testing.assert_close(r.heatmap(one), attr[i : i + 1])
    if kind != "round":  # asked for explicitly, the input is still refused
        with pytest.raises(ValueError, match="heatmap_layer"):
            ri.attribute(seeds, n_boundaries=8, heatmap_layer="input")


def test_default_keeps_the_input_on_a_plain_model():
    model, ri, inputs = _gated("plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        region = ri.interpret(inputs[0][:1], n_boundaries=8)
        attr = ri.attribute(inputs[0][:2], n_boundaries=8)
    assert region.heatmap_layer == "input" and attr.shape == (2, 1, 6, 6)
    hand = _input_x_grad(model, model.relu, inputs[0][:1], region.direction)
    torch.testing.assert_close(region.heatmap(inputs[0][:1]), hand)
    torch.testing.assert_close(attr[:1], hand)


def test_audit_takes_interprets_default_heatmap_layer_as_left_out(tiny):
    from captum_repinterp.auditing import audit
    from captum_repinterp.options import DEFAULT_HEATMAP_LAYER

    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1], head=model.head)
    ri.fit(x[:120], progress=False)
    kw = dict(target=int(ri.predictions_[0]), max_regions=1, subgroup_by="none", n_boundaries=8)
    kw["features"] = (ri.features_, ri.predictions_)
    got = audit(ri, x[:120], heatmap_layer=DEFAULT_HEATMAP_LAYER, **kw)
    want = audit(ri, x[:120], **kw)
    [region] = got[kw["target"]].regions
    assert region.interpretation == want[kw["target"]].regions[0].interpretation
    assert region.interpretation.heatmap_layer is None
    with pytest.raises(ValueError, match="heatmap_layer"):
        audit(ri, x[:120], heatmap_layer="input", **kw)
