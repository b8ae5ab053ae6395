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

import copy

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


# --------------------------------------------------------------------- features 2**20 times larger
def affine_copy(tiny: tuple[nn.Module, torch.Tensor]) -> nn.Sequential:
    """The tiny CNN's features with one linear layer fitted to its predictions' classes."""
    model, x = tiny
    features = copy.deepcopy(model.features)
    lin = nn.Linear(8 * 6 * 6, 4)
    with torch.no_grad():
        h = features(x).flatten(1)
        labels = model(x).argmax(1)
        sol = torch.linalg.lstsq(
            torch.cat([h, torch.ones(len(h), 1)], 1), nn.functional.one_hot(labels, 4).float()
        ).solution
        lin.weight.copy_(sol[:-1].T)
        lin.bias.copy_(sol[-1])
    return nn.Sequential(features, nn.Sequential(nn.Flatten(), lin)).eval()


def scaled(model: nn.Sequential, k: float) -> nn.Sequential:
    """``model`` (features, head) with its features times ``k`` and the weights of the
    head's first linear layer divided by ``k``: for a power of two ``k``, the same
    function bit for bit, its features in other units."""
    features, head = copy.deepcopy(model[0]), copy.deepcopy(model[1])
    lin = next(m for m in head.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        lin.weight.div_(k)
    return nn.Sequential(features, Scale(k), head).eval()


@pytest.mark.parametrize("kind", ["affine", "sampled"])
def test_regions_do_not_depend_on_the_features_units(tiny, one_thread, kind):
    """Features 2**20 times larger (the weights after them as much smaller) describe the
    same boundaries, so the regions must be the same. Before, near-duplicate boundaries
    were judged by the cosine of ``[w, b]``, which the offsets dominate once the normals
    are small: every boundary with an offset of the same sign was merged into the first,
    and an affine head's region (exactly the references predicted as the seed's class)
    took in references of every class (a random-weight Inception-v3, whose features
    reach 6e5, had purity 0.14 to 0.38)."""
    model, x = tiny
    base = affine_copy(tiny) if kind == "affine" else nn.Sequential(model.features, model.head)
    refs, seeds = x[:200], x[200:206]
    regions = {}
    for k in (1.0, 2.0**20):
        net = scaled(base, k)
        ri = RepresentativeInterpretation(net, net[1]).fit(refs, progress=False)
        regions[k] = ri.interpret(seeds, n_boundaries=20)
        if kind == "affine":  # exact: the region is {G_c > G_k for every k}
            with torch.no_grad():
                pred = net(refs).argmax(1)
            for r in regions[k]:
                assert sorted(r.members) == torch.nonzero(pred == r.target).flatten().tolist()
                assert r.purity == 1.0
    for a, b in zip(regions[1.0], regions[2.0**20]):
        assert sorted(a.members) == sorted(b.members)
        assert a.weight.shape == b.weight.shape
