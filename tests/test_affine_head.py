"""Exact regions when the head is affine (a ResNet split at ``layer4``: pool + fc)."""

from functools import partial

import pytest
import torch
import torchvision
from conftest import fit
from torch import nn

from captum_repinterp import (
    RepresentativeInterpretation,
)
from captum_repinterp.projection import find_affine_head


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(160, 3, 32, 32, generator=gen)
    with torch.no_grad():
        # re-draw fc so that the predictions spread over the 10 classes
        feats = nn.Sequential(*list(model.children())[:-1])(x).flatten(1)
        w = torch.randn(10, feats.shape[1], generator=gen)
        logits = feats @ w.T
        model.fc.weight.copy_(w)
        model.fc.bias.copy_(-logits.mean(0))
    return model, x


def test_affine_head_found_and_exact(resnet, one_thread):
    model, x = resnet
    refs, seeds = x[:140], x[140:]
    ri = RepresentativeInterpretation(model, model.layer4).fit(refs, progress=False)
    affine = ri.references_.affine
    assert affine is not None and affine.weight.shape == (10, 512)
    preds = ri.predictions_
    assert len(preds.unique()) >= 5
    # the affine map gives the head's logits on the references
    with torch.no_grad():
        logits = model(refs)
    torch.testing.assert_close(affine.predict(ri.features_).float(), logits, rtol=1e-4, atol=1e-4)
    for reg in ri.interpret(seeds[:6]):
        assert reg.delta == 0
        assert reg.purity == 1.0
        # the region is the class's whole decision region: every reference of the
        # class is a member (up to references tied within rounding)
        positive = preds == reg.target
        assert reg.coverage == 1.0 or int(positive.sum()) - len(reg.members) <= 1
        assert set(reg.runner_up.tolist()) <= set(range(10)) - {reg.target}
        # each boundary is the difference of two rows of the affine map
        for w, b, k in zip(reg.weight, reg.bias, reg.runner_up):
            torch.testing.assert_close(w, affine.weight[reg.target] - affine.weight[k])
            torch.testing.assert_close(
                b.double(), affine.bias[reg.target] - affine.bias[k], rtol=1e-5, atol=1e-4
            )


def test_layer3_head_is_not_affine(resnet):
    model, x = resnet
    ri = RepresentativeInterpretation(model, model.layer3).fit(x[:40], progress=False)
    assert ri.references_.affine is None


def test_affine_detection_on_small_heads():
    torch.manual_seed(0)
    feats = torch.randn(20, 12)
    lin = nn.Sequential(nn.Linear(12, 5), nn.Linear(5, 3))  # affine
    found = find_affine_head(lin, lin, feats)
    assert found is not None
    w = lin[1].weight @ lin[0].weight
    torch.testing.assert_close(found.weight, w.detach())
    relu = nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    assert find_affine_head(relu, relu, feats) is None
    assert find_affine_head(lin, lin, feats, max_entries=10) is None
    assert find_affine_head(lin.bfloat16(), lin, feats) is None


# ----------------------------------- heads taken for affine or not: kinks, ties, terms that cancel
_fit = partial(fit, ignore_warnings=UserWarning)


class _KinkedHead(nn.Module):
    """``psi = pre(x) = x`` (2-D); logits ``(psi1, -psi1, 10 relu(psi0 - 5) - 10)``:
    piecewise linear with one kink at ``psi0 = 5``, where class 2 starts."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(2, 2)
        self.l1 = nn.Linear(2, 1)
        self.l2 = nn.Linear(3, 3)
        with torch.no_grad():
            self.pre.weight.copy_(torch.eye(2))
            self.pre.bias.zero_()
            self.l1.weight.copy_(torch.tensor([[1.0, 0.0]]))
            self.l1.bias.fill_(-5.0)
            self.l2.weight.copy_(torch.tensor([[0, 1, 0], [0, -1, 0], [0, 0, 10.0]]))
            self.l2.bias.copy_(torch.tensor([0.0, 0.0, -10.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pre(x)
        return self.l2(torch.cat([p, torch.relu(self.l1(p))], 1))


def _kinked_data() -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 300
    x = torch.stack([torch.rand(n, generator=g) * 3, torch.rand(n, generator=g) * 4 - 2], 1)
    rare = torch.arange(n) % 10 == 7  # not rows 0, n/3, n/2, n-1: the affine probes
    x[rare, 0] = 6.5 + 1.5 * torch.rand(int(rare.sum()), generator=g)
    x[rare, 1] = 0.5 * torch.rand(int(rare.sum()), generator=g)  # class 2, psi1 > 0
    return _KinkedHead().eval(), x


def test_a_kink_the_affine_probes_miss_does_not_let_another_class_in():
    model, x = _kinked_data()
    pred = model(x).argmax(1)
    assert pred.bincount().tolist() == [141, 129, 30]
    ri = _fit(model, model.pre, x)
    seed = torch.tensor([[1.0, 1.0]])
    for rs in range(4):
        region = ri.interpret(seed, n_boundaries=50, random_state=rs, heatmap_layer=None)
        assert int((pred[region.members] == 2).sum()) == 0, rs
        assert region.purity == 1.0, rs


def test_the_kinked_head_sampled_gives_a_pure_region():
    """The same seed with a random_state whose first candidate is past the kink: the
    head is sampled and the region shuts class 2 out (what the test above asks of all)."""
    model, x = _kinked_data()
    pred = model(x).argmax(1)
    ri = _fit(model, model.pre, x)
    region = ri.interpret(torch.tensor([[1.0, 1.0]]), n_boundaries=50, heatmap_layer=None)
    assert region.purity == 1.0
    assert int((pred[region.members] == 2).sum()) == 0
    assert set(region.members.tolist()) == set((pred == 0).nonzero().flatten().tolist())


def test_affine_check_runs_the_head_when_no_logits_are_kept():
    """Without recorded logits the head itself is run on every reference's features:
    the kinked head is refused, its affine left part accepted."""
    from captum_repinterp.projection import find_affine_head
    from captum_repinterp.references import _affine_everywhere

    model, x = _kinked_data()
    affine = find_affine_head(model, model, x)
    assert affine is not None  # the probes miss the kink
    assert not _affine_everywhere(affine, model, model, x, None, None, chunk=64)
    left = x[x[:, 0] < 5]
    assert _affine_everywhere(affine, model, model, left, None, None, chunk=64)
    torch.testing.assert_close(affine.predict(left), model(left).double(), rtol=1e-5, atol=1e-5)


def _tied_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """Logits (x0, x1, -x0 - x1) of ReLU(x): classes 0 and 1 tie on the line x0 = x1."""
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 3)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        model[1].bias.zero_()
    refs = torch.rand(200, 2, generator=torch.Generator().manual_seed(0)) * 2
    return model, refs


@pytest.mark.usefixtures("one_thread")
def test_a_seed_on_a_tie_is_warned_about_and_outside_its_region():
    from captum_repinterp import SeedOnBoundaryWarning

    model, refs = _tied_model()
    ri = RepresentativeInterpretation(model, model[0]).fit(refs, progress=False)
    assert ri.affine_ is not None  # exact boundaries: x0 > x1 and 2 x0 + x1 > 0
    seed = torch.tensor([[1.0, 1.0]])  # logits (1, 1, -2): argmax picks class 0
    with pytest.warns(SeedOnBoundaryWarning, match="smallest margin 0 logits"):
        region = ri.interpret(seed, heatmap_layer=None)
    assert region.target == 0 and not bool(region.contains(seed)[0])
    # the region is class 0's decision region among the references, by hand: x0 > x1
    assert torch.equal(region.contains(refs), refs[:, 0] > refs[:, 1])
    # a seed off the tie: no warning, inside its region
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", SeedOnBoundaryWarning)
        off = ri.interpret(torch.tensor([[1.0, 0.5]]), heatmap_layer=None)
    assert bool(off.contains(torch.tensor([[1.0, 0.5]]))[0])


def _cancelling(kinked: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    """Features around 100 in 4096 dimensions and a head whose terms cancel: logits of
    order 1 from sums of |terms| near 5000, as a ResNet's fc on layer4 at 224 px (terms
    800 times the logits), so float32 rounds the logits by ~1e-4, above 1e-5 of their
    scale. ``kinked``: a hidden ReLU layer that the references switch on and off."""
    g = torch.Generator().manual_seed(0)
    d = 4096
    refs = 100 + torch.randn(600, d, generator=g)
    if kinked:
        hidden = torch.nn.Linear(d, 16)
        head = torch.nn.Sequential(hidden, torch.nn.ReLU(), torch.nn.Linear(16, 5))
        with torch.no_grad():
            hidden.weight.copy_(torch.randn(16, d, generator=g) / d**0.5)
            hidden.bias.copy_(-(refs @ hidden.weight.T).mean(0))  # half the rows off
    else:
        head = torch.nn.Linear(d, 5)
    model = torch.nn.Sequential(torch.nn.ReLU(), head).eval()
    last = head if not kinked else head[2]
    with torch.no_grad():
        last.weight.copy_(torch.randn(5, last.in_features, generator=g) / last.in_features**0.5)
        last.bias.zero_()
        last.bias.copy_(-model(refs).mean(0))
    return model, refs


@pytest.mark.usefixtures("one_thread")
def test_an_affine_head_whose_terms_cancel_is_found_affine():
    from captum_repinterp.projection import close_logits

    model, refs = _cancelling(kinked=False)
    ri = RepresentativeInterpretation(model, model[0]).fit(refs, progress=False)
    assert ri.affine_ is not None
    with torch.no_grad():
        logits = model(refs)
    # the tolerance of the logits' scale alone rejects this head's own rounding
    assert not close_logits(ri.affine_.predict(refs), logits.double())
    preds = logits.argmax(1)
    for i in (0, 1, 2):
        region = ri.interpret(refs[i : i + 1], heatmap_layer=None)
        # exact regions: the class's decision region among the references, by brute force
        assert torch.equal(region.contains(refs), preds == preds[i])
        assert region.purity == 1.0 and region.coverage == 1.0


@pytest.mark.usefixtures("one_thread")
def test_a_kinked_head_at_the_same_scale_is_not_taken_for_affine():
    model, refs = _cancelling(kinked=True)
    with torch.no_grad():
        on = model[1][1](model[1][0](refs)) > 0
    assert on.any(0).all() and (~on).any(0).all()  # every unit crosses its kink
    ri = RepresentativeInterpretation(model, model[0]).fit(refs, progress=False)
    assert ri.affine_ is None
