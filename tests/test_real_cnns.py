"""Situations from real models: layers that are not cuts, plain forward functions in
training mode, empty batches, regions without boundaries."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerGradCam
from torch import nn

from captum_repinterp import (
    NoBoundaryWarning,
    NotACutError,
    NotACutWarning,
    RepresentativeInterpretation,
)


def _spread(fc: nn.Linear, x_feats: torch.Tensor, scale: float = 20.0) -> None:
    """Re-draw a final Linear so that random inputs spread over the classes."""
    with torch.no_grad():
        fc.weight.mul_(scale)
        logits = x_feats @ fc.weight.T
        fc.bias.copy_(-logits.mean(0))


class ResBlockNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.conv1, self.relu1 = nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.out_relu = nn.ReLU()
        self.fc = nn.Linear(16, 4)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.out_relu(self.conv2(self.relu1(self.conv1(s))) + s).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


@pytest.fixture(scope="module")
def resblock():
    torch.manual_seed(0)
    model = ResBlockNet().eval()
    x = torch.randn(300, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _spread(model.fc, model.pooled(x))
    return model, x


def test_layer_inside_a_residual_block_is_refused(resblock):
    model, x = resblock
    ri = RepresentativeInterpretation(model, model.conv2)
    with pytest.raises(NotACutError, match=r"out_relu") as info:
        ri.fit(x[:200], progress=False)
    assert "conv2" in str(info.value) and "inputs" in str(info.value)
    with pytest.warns(NotACutWarning):
        RepresentativeInterpretation(model, model.conv2).fit(
            x[:200], progress=False, cut_check="warn"
        )
    RepresentativeInterpretation(model, model.conv2).fit(x[:200], progress=False, cut_check="off")
    with pytest.raises(ValueError, match="cut_check"):
        ri.fit(x[:200], progress=False, cut_check="maybe")


def test_block_output_gives_pure_regions(resblock):
    model, x = resblock
    ri = RepresentativeInterpretation(model, model.out_relu).fit(x[:200], progress=False)
    assert len(ri.predictions_.unique()) >= 3
    regions = ri.interpret(x[200:208])
    assert min(r.purity for r in regions) == 1.0
    feats, preds = ri.transform(x[208:])
    precision = [r.evaluate_features(feats, preds)["precision"] for r in regions]
    assert min(p for p in precision if p == p) >= 0.95


class MetaNet(nn.Module):
    """An image branch and a metadata vector concatenated before the final Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 6 * 6 + 3, 3)

    def forward(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.features(x).flatten(1), meta], dim=1))


def test_extra_input_after_the_layer_is_refused():
    torch.manual_seed(0)
    model = MetaNet().eval()
    x = torch.randn(50, 1, 6, 6)
    meta = torch.randn(50, 3) * 5
    ri = RepresentativeInterpretation(model, model.features)
    with pytest.raises(NotACutError, match="additional_forward_args"):
        ri.fit(x, additional_forward_args=(meta,), progress=False)


class BNDropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5)
        )
        self.fc = nn.Linear(6 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def test_plain_function_in_training_mode_runs_in_eval_mode():
    torch.manual_seed(0)
    model = BNDropNet()
    x = torch.randn(120, 1, 6, 6)
    with torch.no_grad():
        model.eval()
        _spread(model.fc, model.features(x).flatten(1), scale=5.0)
        eval_preds = model(x).argmax(1)
    model.train()
    bn = model.features[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    fwd = lambda inp: model(inp)  # noqa: E731
    ri = RepresentativeInterpretation(fwd, model.features)
    with pytest.warns(UserWarning, match="training mode"):
        ri.fit(x[:100], progress=False)
    assert torch.equal(ri.predictions_, eval_preds[:100])
    with pytest.warns(UserWarning, match="training mode"):
        a = ri.attribute(x[100:104])
    with pytest.warns(UserWarning, match="training mode"):
        b = ri.attribute(x[100:104])
    assert torch.equal(a, b)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]
    assert all(m.training for m in model.modules())


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()
    x = torch.randn(80, 1, 6, 6)
    with torch.no_grad():
        _spread(model[3], model[:3](x))
    ri = RepresentativeInterpretation(model, model[1]).fit(x[:60], progress=False)
    return model, x, ri


def test_empty_batch(small):
    model, x, ri = small
    attr = ri.attribute(x[:0])
    full = LayerGradCam(model, model[1]).attribute(x[:2], target=0)
    assert attr.shape == (0, *full.shape[1:])
    assert ri.interpret(x[:0]) == []
    region = ri.interpret(x[60:61])
    assert region.contains(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="inputs"):
        ri.attribute(x[:0], heatmap_layer=model[0])


def test_region_without_boundary_is_reported(small):
    model, x, ri = small
    seed = x[60:61]
    c = int(model(seed).argmax(1))
    n_negatives = int((ri.predictions_ != c).sum())
    kwargs = {"delta": n_negatives, "refine": "none"}  # nothing needs cutting off
    with pytest.warns(NoBoundaryWarning, match="has_boundaries is False"):
        region = ri.interpret(seed, **kwargs)
    assert not region.has_boundaries and len(region) == ri.n_references_
    with pytest.warns(NoBoundaryWarning):
        assert float(ri.attribute(seed, **kwargs).abs().sum()) == 0.0
    assert ri.interpret(seed).has_boundaries
