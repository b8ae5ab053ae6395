"""A finished store reused by a second ``fit`` gives what the first fit gave (head=None)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from captum_repinterp import NonPiecewiseLinearWarning, RepresentativeInterpretation


class TanhNet(nn.Module):
    """A conv trunk and a head with a Tanh: the head is not piecewise linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.fc1 = nn.Linear(4 * 6 * 6, 8)
        self.fc2 = nn.Linear(8, 3)
        with torch.no_grad():  # large logits, so that random images spread over the classes
            self.fc2.weight.mul_(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.features(x).flatten(1))))


class LinearHeadNet(TanhNet):
    """The same without the Tanh: the head starts with an affine map (projection)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.features(x).flatten(1))))


def _fit(model: nn.Module, x: torch.Tensor, store) -> tuple[RepresentativeInterpretation, list]:
    ri = RepresentativeInterpretation(model, model.features)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ri.fit(x, batch_size=16, progress=False, store=store)
    return ri, [w for w in caught if issubclass(w.category, NonPiecewiseLinearWarning)]


def test_second_fit_on_a_finished_store_warns_and_checks_like_the_first(tmp_path):
    x = torch.randn(60, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    model = TanhNet().eval()
    first, warned_first = _fit(model, x, tmp_path / "s")
    second, warned_second = _fit(model, x, tmp_path / "s")
    assert len(warned_first) == 1 and len(warned_second) == 1
    assert second.head_nonlinear_ == first.head_nonlinear_ != ()
    assert second.input_spec_ == first.input_spec_ == (((1, 6, 6), torch.float32),)
    # a missing batch dimension gets the clear message, not a model failure
    with pytest.raises(ValueError, match="add the batch dimension first"):
        second.attribute(x[0])


def test_second_fit_on_a_finished_store_keeps_the_projection(tmp_path):
    x = torch.randn(60, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    model = LinearHeadNet().eval()
    first, _ = _fit(model, x, tmp_path / "s")
    second, _ = _fit(model, x, tmp_path / "s")
    assert first.projection_ is not None and second.projection_ is not None
    assert torch.equal(first.projection_.projected, second.projection_.projected)
    a, b = first.interpret(x[:3]), second.interpret(x[:3])
    for r1, r2 in zip(a, b):
        assert torch.equal(r1.members, r2.members) and torch.equal(r1.weight, r2.weight)
