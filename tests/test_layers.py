"""Layer choice: find_layer picks the last conv block with a piecewise-linear head."""

import logging

import pytest
import torch
from torch import nn

from captum_repinterp.layers import (
    NonPiecewiseLinearWarning,
    find_layer,
    layer_candidates,
    nonlinear_ops_after,
    nonlinear_ops_in,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()) and (
        not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
    )


def test_tiny_cnn_picks_last_block_and_logs(tiny, caplog):
    model, x = tiny
    with caplog.at_level(logging.INFO, logger="captum_repinterp.layers"):
        name, layer = find_layer(model, x[:4], return_name=True)
    # features and features[1] have the same output; the outermost is returned
    assert name == "features" and layer is model.features
    assert "picked 'features'" in caplog.text
    cands = layer_candidates(model, x[:4])
    names = ["features", "features.1", "features.1.0", "features.0", "features.0.0"]
    assert [c.name for c in cands] == names
    shapes = [(1, 8, 6, 6)] * 3 + [(1, 6, 6, 6), (1, 6, 12, 12)]
    assert [c.output_shape for c in cands] == shapes
    assert all(c.nonlinear_after == () for c in cands)
    assert find_layer(model, x[:1]) is model.features
    assert _no_hooks(model)


class GatedNet(nn.Module):
    """Conv blocks, then a block using GELU, then a piecewise-linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GELU())
        self.block3 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block3(self.block2(self.block1(z))).flatten(1))


def test_skips_nothing_when_last_block_is_exact():
    net = GatedNet().eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    # GELU is inside block2, before block3: block3's head is piecewise linear
    assert find_layer(net, x) is net.block3
    cands = {c.name: c for c in layer_candidates(net, x)}
    assert cands["block3"].nonlinear_after == ()
    assert cands["block2"].nonlinear_after == ()  # block2's GELU runs inside block2
    assert cands["block1"].nonlinear_after == ("block2.1 (GELU): gelu",)
    assert cands["block2.0"].nonlinear_after == ("block2.1 (GELU): gelu",)


class SigmoidTail(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.block1(z)
        gate = torch.sigmoid(h.mean())  # not piecewise linear, but before block2
        h = self.block2(h) * gate
        return self.fc(h.flatten(1))


def test_functional_ops_after_the_layer_are_seen():
    net = SigmoidTail().eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert nonlinear_ops_after(net, net.block2, (x[:1],)) == []
    assert nonlinear_ops_after(net, net.block1, (x[:1],)) == ["sigmoid"]
    assert find_layer(net, x) is net.block2


def test_no_exact_layer_falls_back_with_warning():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3),
                        nn.Tanh()).eval()
    x = torch.randn(1, 1, 5, 5)
    with pytest.warns(NonPiecewiseLinearWarning, match=r"4 \(Tanh\): tanh"):
        assert find_layer(net, x) is net[0]
    assert nonlinear_ops_in(net[2:], torch.zeros(1, 4, 3, 3)) == ["4 (Tanh): tanh"]


def test_find_layer_errors_and_restores_modes(tiny):
    model, x = tiny
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        find_layer(lambda z: z, x[:1])
    with pytest.raises(TypeError, match="example_input must be a torch.Tensor"):
        find_layer(model, x[:1].numpy())
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(144, 3))
    with pytest.raises(ValueError, match="model: found no convolutional block"):
        find_layer(mlp, x[:1])
    model.train()
    try:
        find_layer(model, x[:1])
        assert all(m.training for m in model.modules())
    finally:
        model.eval()
    assert _no_hooks(model)


def test_hooks_removed_when_the_model_raises(tiny):
    model, x = tiny

    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            self.m.features(z)
            raise RuntimeError("boom")

    net = Boom().eval()
    with pytest.raises(RuntimeError, match="boom"):
        find_layer(net, x[:1])
    assert _no_hooks(net)
    # the torch function mode is gone too: ordinary calls are not recorded any more
    assert torch.overrides._get_current_function_mode() is None
