"""Sampling on the output of the head's leading linear layer when it is too wide for the
projection: the same interpretations as sampling on the features."""

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from captum_repinterp import RepresentativeInterpretation, boundaries
from captum_repinterp.features import LayerLayout
from captum_repinterp.heads import UserHead
from captum_repinterp.projection import LeadingMap, find_leading_map, sum_rounding


class WideHeadCNN(nn.Module):
    """Conv trunk, then a VGG-like head: adaptive pooling, a linear layer wider than
    a quarter of the features (no projection), ReLU, linear."""

    def __init__(self, pool: nn.Module | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            pool if pool is not None else nn.AdaptiveAvgPool2d(3),
            nn.Flatten(),
            nn.Linear(72, 48),
            nn.ReLU(),
            nn.Linear(48, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def wide():
    torch.manual_seed(0)
    model = WideHeadCNN().eval()
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(4, 1, 10, 10, generator=gen)
    labels = torch.arange(240) % 4
    x = base[labels] + 0.7 * torch.randn(240, 1, 10, 10, generator=gen)
    with torch.no_grad():
        h = model.head[:4](model.features(x))
        sol = torch.linalg.lstsq(
            torch.cat([h, torch.ones(240, 1)], 1), nn.functional.one_hot(labels, 4).float()
        ).solution
        model.head[4].weight.copy_(sol[:-1].T)
        model.head[4].bias.copy_(sol[-1])
    return model, x


@pytest.mark.parametrize("user_head", [False, True])
def test_leading_map_sampling_matches_plain_sampling(wide, user_head, monkeypatch):
    model, x = wide
    head = model.head if user_head else None
    ri = RepresentativeInterpretation(model, model.features[-1], head=head)
    ri.fit(x[:200], progress=False)
    assert ri.projection_ is None  # 4 r > D
    leading = ri.references_.leading
    assert isinstance(leading, LeadingMap) and leading.module is model.head[2]
    used = []
    orig = LeadingMap.sampling_head

    def spy(self, *args, **kwargs):
        zhead = orig(self, *args, **kwargs)
        used.append(zhead is not None)
        return zhead

    orig_known = boundaries._zhead_matching

    def spy_known(*args, **kwargs):
        zhead, logits = orig_known(*args, **kwargs)
        used.append(zhead is not None)
        return zhead, logits

    monkeypatch.setattr(LeadingMap, "sampling_head", spy)
    # with the references' logits kept by fit, the head on z is checked against them
    monkeypatch.setattr(boundaries, "_zhead_matching", spy_known)
    targets = [i % 4 for i in range(8)]
    fast = ri.interpret(x[200:208], target=targets)
    assert used == [True] * 8
    ri._references = dataclasses.replace(ri.references_, leading=None)
    plain = ri.interpret(x[200:208], target=targets)
    for a, b in zip(fast, plain):
        assert torch.equal(a.members, b.members)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.bias, b.bias, rtol=1e-4, atol=1e-4)


def test_no_leading_map_through_a_kink():
    torch.manual_seed(0)
    feats = torch.randn(50, 8, 4, 4)
    kinked = WideHeadCNN(pool=nn.MaxPool2d(2)).eval()  # max-pool before the linear layer
    kinked.head[2] = nn.Linear(32, 48)
    assert (
        find_leading_map(kinked.head, kinked.head, feats.reshape(50, -1).reshape(50, 8, 4, 4))
        is None
    )
    affine = WideHeadCNN().eval()
    found = find_leading_map(affine.head, affine.head, torch.randn(50, 8, 3, 3))
    assert found is not None and found.module is affine.head[2]


# ----------------------------------------- a split at the input of the head's leading Linear layer
def _spread(model: nn.Module, fc: nn.Linear, x: torch.Tensor) -> None:
    """Re-draw a final Linear so that random inputs spread over its classes."""
    seen = []
    handle = fc.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(x)
        handle.remove()
        fc.weight.mul_(20.0)
        fc.bias.copy_(-(seen[0] @ fc.weight.T).mean(0))


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    ).eval()
    x = torch.randn(300, 10)
    _spread(mlp, mlp[4], x)
    return mlp, x


def test_split_at_the_input_of_the_heads_leading_linear():
    """Split at the input of ``mlp[2]``, the head's first Linear layer (N x 16): the
    region is found (it failed with a reshape error: the leading layer's input was read
    before the head put the points there), holds the seed, and the channel-members map
    at the split layer is ``relu(v . psi)`` by hand (one position per channel)."""
    mlp, x = _mlp()
    ri = RepresentativeInterpretation(mlp, mlp[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ri.fit(x[:200], progress=False, attribute_to_layer_input=True)
    seed = x[200:201]
    region = ri.interpret(seed, heatmap_rule="channel-members", heatmap_layer=None)
    assert region.has_boundaries and bool(region.contains(seed)[0])
    psi = mlp[1](mlp[0](x[:5])).detach()
    expect = (psi @ region.direction).clamp_min(0)[:, None]
    torch.testing.assert_close(region.heatmap(x[:5]), expect, rtol=1e-5, atol=1e-6)


def test_sum_rounding_is_the_probabilistic_bound_of_the_layers_sums():
    # 4 u sqrt(n), u = 2^-24 the float32 unit roundoff (hand computation)
    assert sum_rounding(nn.Linear(25088, 2)) == pytest.approx(4 * 2.0**-24 * 25088**0.5)
    assert sum_rounding(nn.Linear(1152, 2)) < 1e-5  # the small heads keep 1e-5
    assert sum_rounding(nn.Linear(16, 2).double()) == pytest.approx(4 * 2.0**-53 * 4)
    assert sum_rounding(nn.ReLU()) == 0.0


@pytest.mark.parametrize("width, accepted", [(25088, True), (72, False)])
def test_leading_check_allows_the_rounding_of_a_wide_layer(width, accepted):
    """The logits `fit` kept and the head on the leading layer's output sum the layer's
    products in different orders; on a VGG (25,088 inputs) they differ by about 2e-5 of
    the logits' scale. That is rounding, not a different function: accepted for a wide
    layer, still refused for a narrow one, and a real difference (1e-3) always."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    psi = torch.randn(5, width)
    with torch.no_grad():
        head[2].weight.mul_(20.0)  # logits of a few units, as a VGG's
        z = head[0](psi)
        logits = head(psi).double()
    scale = float(logits.abs().max())
    assert scale > 1.0
    nudged = logits.clone()
    nudged[:, 0] += 2e-5 * scale
    user = UserHead(head, LayerLayout(((width,),), False))
    zhead, out = boundaries._zhead_matching(user, head[0], psi[0], z, nudged)
    assert (zhead is not None) is accepted
    if accepted:
        torch.testing.assert_close(out.double(), logits, rtol=1e-5, atol=1e-5 * scale)
    far = logits.clone()
    far[:, 0] += 1e-3 * scale
    assert boundaries._zhead_matching(user, head[0], psi[0], z, far) == (None, None)
