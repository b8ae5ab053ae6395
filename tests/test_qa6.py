"""Maps at the input take the region's score on the layer's tensors as fit read them."""

from __future__ import annotations

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
    kw = {"n_boundaries": 10, "heatmap_rule": "elementwise-positive", "heatmap_layer": "input"}
    region = ri.interpret(x[:1], **kw)
    assert region.heatmap_layer == "input"
    hand = _input_x_grad(model, layer, x[:4], region.direction, to_layer_input)
    torch.testing.assert_close(region.heatmap(x[:4]), hand)
    attr = ri.attribute(x[:1], **kw)
    torch.testing.assert_close(attr, hand[:1])
