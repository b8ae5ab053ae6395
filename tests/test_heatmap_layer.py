"""The elementwise rule drawn at an earlier layer (``heatmap_layer=``)."""

import copy

import pytest
import torch
from captum.attr import LayerGradCam
from torch import nn

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.heatmap import HEATMAP_RULES
from captum_repinterp.interpretation import Interpretation

EW = "elementwise"  # the rule heatmap_layer draws by gradient times activation


@pytest.fixture(scope="module")
def fitted(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1], head=model.head)
    return model, x, ri.fit(x[:200], progress=False)


def test_at_the_split_layer_it_is_the_elementwise_rule(fitted):
    model, x, ri = fitted
    reg = ri.interpret(x[200:201], heatmap_rule=EW, heatmap_layer=None)
    plain = reg.heatmap(x[210:220])
    reg.heatmap_layer = model.features[-1]
    torch.testing.assert_close(reg.heatmap(x[210:220]), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", [None, "elementwise-positive", "elementwise-members"])
def test_rule_at_the_split_layer_is_its_own_map(fitted, rule):
    model, x, ri = fitted
    kw = {} if rule is None else {"heatmap_rule": rule}  # None: the default rule
    reg = ri.interpret(x[200:201], heatmap_layer=None, **kw)
    plain = reg.heatmap(x[210:220], relu_attributions=False)
    assert plain.abs().sum() > 0
    at_split = ri.interpret(x[200:201], heatmap_layer=model.features[-1], **kw)
    pulled = at_split.heatmap(x[210:220], relu_attributions=False)
    torch.testing.assert_close(pulled, plain, rtol=1e-5, atol=1e-6)


def test_default_rule_at_an_earlier_layer(fitted):
    model, x, ri = fitted
    f0 = model.features[0]
    at_f0 = ri.attribute(x[210:213], heatmap_layer=f0)
    assert at_f0.shape == ri.attribute(x[210:213], heatmap_layer=f0, heatmap_rule=EW).shape


def test_earlier_layer_is_gradient_times_activation_of_the_region_score(fitted):
    model, x, ri = fitted
    f0 = model.features[0]
    reg = ri.interpret(x[200:201], heatmap_layer=f0, heatmap_rule=EW)
    maps = reg.heatmap(x[210:216])
    # by hand: A' = features[0](x), score = v . flatten(features[1](A'))
    with torch.enable_grad():
        a = f0(x[210:216]).detach().requires_grad_(True)
        score = (model.features[1](a).flatten(1) * reg.direction).sum()
        (g,) = torch.autograd.grad(score, a)
    expected = torch.relu((g * a.detach()).sum(1, keepdim=True))
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6)
    # shaped like LayerGradCam on that layer, and so is attribute()
    gc = LayerGradCam(model, f0).attribute(x[210:216], target=0)
    assert maps.shape == gc.shape
    attr = ri.attribute(x[210:213], heatmap_layer=f0, heatmap_rule=EW)
    assert attr.shape == (3, *gc.shape[1:])
    # attribute's map of an image = its own region's map on itself
    own = ri.interpret(x[211:212], heatmap_layer=f0, heatmap_rule=EW).heatmap(x[211:212])
    torch.testing.assert_close(attr[1:2], own, rtol=1e-4, atol=1e-6)


def test_bad_heatmap_layers_and_no_side_effects(fitted):
    model, x, ri = fitted
    flags = [m.training for m in model.modules()]
    with pytest.raises(ValueError, match="heatmap_layer must be an nn.Module, 'input', 'auto'"):
        ri.interpret(x[200:201], heatmap_layer="features.0", heatmap_rule=EW)
    with pytest.raises(ValueError, match="heatmap_rule"):
        ri.interpret(x[200:201], heatmap_layer=model.features[0], heatmap_rule="channel")
    with pytest.raises(ValueError, match="not part of forward_func"):
        ri.interpret(x[200:201], heatmap_layer=nn.Conv2d(1, 2, 3), heatmap_rule=EW)
    # after the split: refused by interpret too, not only by the map drawn later
    with pytest.raises(ValueError, match="heatmap_layer: the score at layer does not depend"):
        ri.interpret(x[200:201], heatmap_layer=model.head[1], heatmap_rule=EW)
    reg = ri.interpret(x[200:201], heatmap_layer=model.features[0], heatmap_rule=EW)
    with pytest.raises(ValueError, match="heatmap"):
        reg.heatmap_from_activations((torch.zeros(1, 8, 6, 6),))
    # wrongly shaped inputs get the same clear errors as on the split-layer path
    with pytest.raises(ValueError, match="inputs: the model failed on tensor"):
        reg.heatmap(torch.zeros(2, 3, 12, 12))
    with pytest.raises(ValueError, match="inputs"):
        reg.heatmap(x[210])  # no batch dimension
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_save_and_load_keep_the_heatmap_layer(fitted, tmp_path):
    model, x, ri = fitted
    reg = ri.interpret(x[200:201], heatmap_layer=model.features[0], heatmap_rule=EW)
    reg.save(tmp_path / "r.npz")
    back = Interpretation.load(tmp_path / "r.npz", explainer=ri)
    assert back.heatmap_layer is model.features[0]
    torch.testing.assert_close(back.heatmap(x[210:214]), reg.heatmap(x[210:214]))
    with pytest.raises(ValueError, match="explainer"):
        Interpretation.load(tmp_path / "r.npz")
    # compared where the map is drawn: same region, other layer or the input differ
    assert back == reg and copy.deepcopy(reg) == reg
    at_split = ri.interpret(x[200:201], heatmap_layer=None, heatmap_rule=EW)
    at_input = ri.interpret(x[200:201], heatmap_layer="input", heatmap_rule=EW)
    at_other = ri.interpret(x[200:201], heatmap_layer=model.features[1], heatmap_rule=EW)
    assert torch.equal(at_split.members, reg.members)  # the region is the same
    assert reg != at_split and reg != at_input and reg != at_other and at_split != at_input


# ---------------------------------------------------------- the split layer named as heatmap_layer
@pytest.mark.parametrize("to_input", [False, True])
def test_split_layer_as_heatmap_layer_is_the_split_layer_for_every_rule(tiny, to_input):
    """``heatmap_layer=ri.layer`` draws each rule's own map at the split layer, as None
    does, for every registered rule (``"channel"`` and the others drawn only at the
    split layer included)."""
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    ri.fit(x[:240], batch_size=64, progress=False, attribute_to_layer_input=to_input)
    seeds = x[244:246]
    nb = {"n_boundaries": 16}  # the identity checked needs no more
    for rule in HEATMAP_RULES:
        at_none = ri.attribute(seeds, heatmap_rule=rule, heatmap_layer=None, **nb)
        at_layer = ri.attribute(seeds, heatmap_rule=rule, heatmap_layer=ri.layer, **nb)
        torch.testing.assert_close(at_layer, at_none, rtol=0, atol=0, msg=rule)
        region = ri.interpret(seeds[:1], heatmap_rule=rule, heatmap_layer=ri.layer, **nb)
        assert region.heatmap_layer is None, rule


def test_audit_takes_the_split_layer_as_heatmap_layer(tiny):
    """``heatmap_layer=ri.layer`` is the split layer, as in ``interpret``: audit gives the
    same result as without it (it said the maps cannot be drawn "at another layer")."""
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    ri.fit(x[:240], batch_size=64, progress=False)
    plain = ri.audit(x[240:300], target=0, progress=False)
    named = ri.audit(x[240:300], target=0, progress=False, heatmap_layer=ri.layer)
    assert len(plain[0].regions) == len(named[0].regions) > 0
    for a, b in zip(plain[0].regions, named[0].regions):
        assert (a.size, a.purity) == (b.size, b.purity)
        assert a.interpretation == b.interpretation
    with pytest.raises(ValueError, match="heatmap_layer"):
        ri.audit(x[240:300], target=0, progress=False, heatmap_layer=model.features[0])


class _SharedReLU(nn.Module):
    """conv -> ReLU -> conv -> the same ReLU (split) -> linear: the ReLU runs twice."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.act, self.split = nn.ReLU(), nn.Identity()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * 12 * 12, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.split(self.act(self.c2(self.act(self.c1(x))))))


@pytest.mark.parametrize("where", ["after the split", "run twice"])
def test_a_layer_the_map_cannot_be_drawn_at_is_refused_before_the_search(
    fitted, tiny, monkeypatch, where
):
    """A ``heatmap_layer`` after the split layer (or one the model runs twice) was
    accepted by ``interpret`` (the error came later, from ``heatmap``) and refused by
    ``attribute`` only after every seed's region had been searched. Both now refuse it
    before any region search, with the error the map would give; nothing is left on
    the model."""
    from captum_repinterp import region as region_module

    if where == "after the split":
        model, x, ri = fitted
        layer, match = model.head[1], "does not depend on heatmap_layer's output"
    else:
        torch.manual_seed(0)
        model = _SharedReLU().eval()
        _, x = tiny
        with torch.no_grad():
            out = model(x[:200])
            model.fc[1].bias.sub_(out.mean(0))  # every class predicted somewhere
        ri = RepresentativeInterpretation(model, model.split).fit(x[:200], progress=False)
        layer, match = model.act, "runs 2 times per forward pass"
    searched = []
    real = region_module.find_region
    monkeypatch.setattr(
        region_module, "find_region", lambda *a, **k: searched.append(1) or real(*a, **k)
    )
    for call in (ri.interpret, ri.attribute):
        with pytest.raises(ValueError, match=match):
            call(x[200:203], heatmap_layer=layer, heatmap_rule=EW)
    assert not searched
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    ri.interpret(x[200:201], heatmap_layer=None)
    assert searched  # the search itself is the one counted
