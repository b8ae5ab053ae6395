"""Rescaling the split layer's features changes nothing the user sees.

The model ``x -> head(features(x))`` and ``x -> head(features(x) * s / s)``, split after the
multiplication by ``s``, compute the same function and have the same decision regions in
input space; only the features' units differ. Regions (their members, purity and
boundaries) and the heat maps in logit units must not depend on ``s`` (``region-members``,
in the layer's units, scales with it). Features
of very different sizes are common: a random-weight Inception-v3 has features around 1e6,
a small CNN's around 1. Two tolerances once broke this: near-duplicate boundaries were
compared on ``[w, b]`` (large features merged every boundary into the first one) and the
members' rules had an absolute floor on "the seed's own features" (small features took
every member for the seed).
"""

import pytest
import torch
from conftest import Scale
from torch import nn

from captum_repinterp import RepresentativeInterpretation

pytestmark = pytest.mark.usefixtures("one_thread")

SCALES = [1e-6, 1e-3, 1e3, 1e6]
RULES = ["channel-members", "elementwise-members", "elementwise", "channel", "region-members"]


class Rescaled(nn.Module):
    """The tiny CNN with its features multiplied by ``s`` and its head undoing it."""

    def __init__(self, model: nn.Module, s: float) -> None:
        super().__init__()
        self.features = nn.Sequential(model.features, Scale(s))
        self.head = nn.Sequential(Scale(1 / s), model.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _explain(model: nn.Module, x: torch.Tensor, s: float):
    net = Rescaled(model, s).eval()
    ri = RepresentativeInterpretation(net, net.features).fit(x[:200], progress=False)
    seeds = [*range(200, 215), 3, 17]  # held-out seeds and two references
    regions = [ri.interpret(x[i : i + 1], random_state=0) for i in seeds]
    maps = {
        (rule, where): ri.attribute(x[200:204], heatmap_rule=rule, heatmap_layer=where)
        for rule in RULES
        for where in (None, "input")
        if where is None or "channel" not in rule and "region" not in rule
    }
    return regions, maps


@pytest.fixture(scope="module")
def unscaled(tiny):
    model, x = tiny
    return _explain(model, x, 1.0)


@pytest.mark.parametrize("s", SCALES)
def test_regions_and_maps_do_not_depend_on_the_features_scale(tiny, unscaled, s):
    model, x = tiny
    regions, maps = _explain(model, x, s)
    base_regions, base_maps = unscaled
    for r, b in zip(regions, base_regions):
        assert r.n_boundaries == b.n_boundaries
        assert torch.equal(r.members.sort().values, b.members.sort().values)
        assert r.purity == b.purity and r.coverage == b.coverage
        # the normals, in feature units, scale by 1 / s; the margins do not
        assert torch.allclose(r.weight * s, b.weight, rtol=1e-3, atol=1e-5 * b.weight.abs().max())
    for key, m in maps.items():
        # region-members' maps are channel weights (sum 1) times activations: in the
        # layer's units, so they scale with s; the others are in logit units
        ref = base_maps[key] * (s if key[0] == "region-members" else 1.0)
        assert ref.abs().max() > 0, key
        assert torch.allclose(m, ref, rtol=1e-4, atol=1e-5 * ref.abs().max()), key
