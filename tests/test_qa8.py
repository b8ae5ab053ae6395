"""Breaker round: curved heads the trace misses, a head taken for affine, NaN logits, a
final softmax, loading against fewer references; and state, RNG, memory-format and
batch-consistency checks that pass."""

from __future__ import annotations

import copy
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from captum_repinterp import (
    Interpretation,
    ProbabilityOutputWarning,
    RepresentativeInterpretation,
    audit,
)
from captum_repinterp.layers import nonlinear_ops_after

NB = {"n_boundaries": 10}


def _fit(model, layer, refs, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return RepresentativeInterpretation(model, layer).fit(refs, progress=False, **kwargs)


# --------------------------------------------------------------- curved heads unseen


class _CurvedAfter(nn.Module):
    """The tiny CNN with a curved operation between its features and its head, made of
    calls the trace does not list (products of two feature tensors, a division by a
    norm, logsumexp, cos)."""

    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner = inner
        self.kind = kind
        self.gate = nn.Linear(8, 8)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        f = self.inner.features(z)
        if self.kind == "relu-gated":  # squeeze-and-excitation gated by a ReLU
            f = f * torch.relu(self.gate(f.mean((2, 3))))[:, :, None, None]
        elif self.kind == "hardsigmoid-gated":  # MobileNetV3's gate
            f = f * nn.functional.hardsigmoid(self.gate(f.mean((2, 3))))[:, :, None, None]
        elif self.kind == "square":
            f = f * f
        elif self.kind == "l2-normalised":  # a cosine classifier written by hand
            f = f / (f.flatten(1).norm(dim=1)[:, None, None, None] + 1e-3)
        elif self.kind == "logsumexp":
            f = f - torch.logsumexp(f, 1, keepdim=True)
        elif self.kind == "cos":
            f = torch.cos(f)
        return self.inner.head(f)


@pytest.mark.parametrize(
    "kind", ["relu-gated", "hardsigmoid-gated", "square", "l2-normalised", "logsumexp", "cos"]
)
def test_curved_heads_without_a_listed_op_are_warned(tiny, kind):
    """The trace that decides fit's NonPiecewiseLinearWarning (and find_layer's
    choice) finds nothing after ``features``; a listed op (``pow``) is found."""
    model, x = tiny
    torch.manual_seed(0)
    curved = _CurvedAfter(model, kind).eval()
    assert nonlinear_ops_after(curved, model.features, (x[:1],)) != []


def test_a_listed_curved_op_after_the_layer_is_found(tiny):
    model, x = tiny

    class Pow(nn.Module):
        def forward(self, z):
            return model.head(model.features(z) ** 2)

    assert nonlinear_ops_after(Pow(), model.features, (x[:1],)) == ["pow"]


# --------------------------------------------------------------- a head taken for affine


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


# --------------------------------------------------------------- NaN logits


class _NaNWhere(nn.Module):
    """The tiny CNN, with NaN logits for images whose first pixel is above 1.5."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.inner(z)
        bad = z.flatten(1)[:, :1] > 1.5
        return torch.where(bad, torch.full_like(out, float("nan")), out)


def test_references_with_nan_logits_are_refused(tiny):
    model, x = tiny
    nan_model = _NaNWhere(model).eval()
    refs = x[:240]
    assert int((refs.flatten(1)[:, 0] > 1.5).sum()) == 15
    bad = (refs.flatten(1)[:, 0] > 1.5).nonzero().flatten().tolist()
    with pytest.raises(ValueError, match="references") as info:
        # batches of 64: the indices are counted from the first reference, not the batch's
        RepresentativeInterpretation(nan_model, model.features[-1]).fit(
            refs, batch_size=64, progress=False
        )
    first_batch = [i for i in bad if i < 64]  # the fit stops at the first bad batch
    assert first_batch
    assert f"example(s) {', '.join(map(str, first_batch[:10]))}" in str(info.value)


def test_a_seed_with_nan_logits_names_inputs(tiny):
    model, x = tiny
    nan_model = _NaNWhere(model).eval()
    refs = x[:240][x[:240].flatten(1)[:, 0] <= 1.5]
    ri = _fit(nan_model, model.features[-1], refs)
    seed = x[240:300][x[240:300].flatten(1)[:, 0] > 1.5][:1]
    with pytest.raises(ValueError, match="inputs"):
        ri.interpret(seed, **NB)


# --------------------------------------------------------------- monotone output maps


class _Out(nn.Module):
    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner = inner
        self.kind = kind

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.inner(z)
        if self.kind == "softmax":
            return out.softmax(1)
        if self.kind == "log_softmax":
            return out.log_softmax(1)
        return 2 * out + 1  # "affine": a shift and a scale shared by all classes


@pytest.mark.parametrize("kind", ["log_softmax", "affine"])
def test_log_softmax_output_gives_the_logits_regions_and_maps(tiny, kind):
    """log_softmax shifts every logit of a row alike: members, their order and the maps
    are those of the logits model (a common scale 2 scales distances by 2)."""
    model, x = tiny
    seeds = x[250:254]
    base = _fit(model, model.features[-1], x[:240])
    other = _fit(_Out(model, kind).eval(), model.features[-1], x[:240])
    for a, b in zip(base.interpret(seeds, **NB), other.interpret(seeds, **NB)):
        assert a.members.tolist() == b.members.tolist()
    ma = base.attribute(seeds, heatmap_layer=None, **NB)
    mb = other.attribute(seeds, heatmap_layer=None, **NB)
    scale = 2.0 if kind == "affine" else 1.0
    torch.testing.assert_close(mb, scale * ma, rtol=1e-4, atol=1e-6)


def test_final_softmax_warns_that_normals_are_in_probabilities(tiny):
    """A final softmax keeps the regions (same members) but scales each boundary's
    normal by the softmax's slope at its tie point, so the member order and the maps
    are not the logits model's: fit says so (ProbabilityOutputWarning); log_softmax,
    which gives the logits' normals exactly, does not warn."""
    model, x = tiny
    seeds = x[250:256]
    base = _fit(model, model.features[-1], x[:240])
    with pytest.warns(ProbabilityOutputWarning, match="softmax"):
        soft = RepresentativeInterpretation(_Out(model, "softmax").eval(), model.features[-1])
        soft.fit(x[:240], progress=False)
    assert soft.references_.head_output_op == "softmax"
    for a, b in zip(base.interpret(seeds, **NB), soft.interpret(seeds, **NB)):
        assert set(a.members.tolist()) == set(b.members.tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbabilityOutputWarning)
        log = RepresentativeInterpretation(_Out(model, "log_softmax").eval(), model.features[-1])
        log.fit(x[:240], progress=False)
    assert log.references_.head_output_op is None


# --------------------------------------------------------------- loading


def test_load_with_an_explainer_of_fewer_references_is_refused(tiny, tmp_path):
    model, x = tiny
    ri = _fit(model, model.features[-1], x[:240])
    region = ri.interpret(x[250:251], **NB)
    assert int(region.members.max()) >= 60
    path = tmp_path / "region.npz"
    region.save(path)
    small = _fit(model, model.features[-1], x[:60])
    with pytest.raises(ValueError, match="explainer"):
        Interpretation.load(path, small)


# --------------------------------------------------------------- state and determinism


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
        )  # fmt: skip
        self.h = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(288, 24), nn.ReLU(), nn.Linear(24, 4)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.h(self.f(z))


def _snapshot(m: nn.Module) -> dict:
    return {
        "training": {n: s.training for n, s in m.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in m.named_parameters()},
        "grad": {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()},
        "state": {k: v.clone() for k, v in m.state_dict().items()},
        "hooks": {
            n: (
                tuple(s._forward_hooks),
                tuple(s._forward_pre_hooks),
                tuple(s._backward_hooks),
                tuple(s._backward_pre_hooks),
            )
            for n, s in m.named_modules()
        },
        "attrs": {n: sorted(s.__dict__) for n, s in m.named_modules()},
    }


def _assert_same(a: dict, b: dict, what: str) -> None:
    for key in ("training", "requires_grad", "hooks", "attrs"):
        assert a[key] == b[key], (what, key)
    for key in ("grad", "state"):
        for name, va in a[key].items():
            vb = b[key][name]
            assert (va is None) == (vb is None), (what, key, name)
            if va is not None:
                assert torch.equal(va, vb), (what, key, name)


def test_every_call_leaves_a_training_bn_model_as_it_was(tiny):
    """A model in training mode with batch norm, dropout, a frozen conv, a gradient left
    in a Linear and user hooks: after fit, attribute (every resolution and the
    forward-pass rules), interpret, heatmap, transform, audit and a failing call, the
    flags, requires_grad, grads, BN running statistics, hooks and module attributes are
    those of before; the user's hook saw the calls."""
    _, x = tiny
    torch.manual_seed(0)
    m = _BNNet()
    with torch.no_grad():
        m.train()
        for _ in range(2):
            m(x)
        m.h[4].weight.mul_(10)
    m.f[0].weight.requires_grad_(False)
    m.h[2].weight.grad = torch.ones_like(m.h[2].weight)
    calls = []
    m.f[4].register_forward_hook(lambda *a: calls.append(1))
    m.f.register_forward_pre_hook(lambda *a: None)
    before = _snapshot(m)
    seeds = x[250:252]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ri = RepresentativeInterpretation(m, m.f[6]).fit(x[:200], progress=False)
        _assert_same(before, _snapshot(m), "fit")
        for hl in ("auto", None, "input", m.f[2]):
            ri.attribute(seeds, heatmap_layer=hl, **NB)
            _assert_same(before, _snapshot(m), f"attribute {hl}")
        ri.attribute(seeds, heatmap_rule="region-members", **NB)
        _assert_same(before, _snapshot(m), "region-members")
        region = ri.interpret(seeds[:1], **NB)
        region.heatmap(x[:3])
        region.contains(x[:20])
        ri.transform(x[:3])
        _assert_same(before, _snapshot(m), "interpret")
        audit(ri, x[240:300], target=int(ri.predictions_.mode().values), **NB)
        _assert_same(before, _snapshot(m), "audit")
        with pytest.raises(ValueError, match="inputs"):
            ri.attribute(torch.randn(2, 1, 10, 10))
        _assert_same(before, _snapshot(m), "error")
    assert calls


def test_calls_leave_every_global_rng_alone(tiny):
    model, x = tiny
    ri = _fit(model, model.features[-1], x[:240])
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    py_state = random.getstate()
    ri.attribute(x[250:253], **NB)
    ri.interpret(x[250:253], **NB)
    audit(ri, x[240:300], target=0, **NB)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(np_state, np.random.get_state()[1])
    assert random.getstate() == py_state


def test_regions_hold_their_seed_and_their_members_are_those_inside(tiny):
    """For 30 seeds: the seed is inside, ``members`` is exactly the references
    ``contains`` accepts, purity and coverage are the shares by the stored predictions,
    and a batch gives what its seeds give one at a time (regions and maps)."""
    model, x = tiny
    ri = _fit(model, model.features[-1], x[:240])
    pred = ri.predictions_
    seeds = x[240:270]
    regions = ri.interpret(seeds, **NB)
    inside = torch.stack([r.contains(x[:240]) for r in regions])
    for i, r in enumerate(regions):
        assert bool(r.contains(seeds[i : i + 1]))
        assert set(r.members.tolist()) == set(inside[i].nonzero().flatten().tolist())
        same = (pred[r.members] == r.target).double()
        assert r.purity == pytest.approx(float(same.mean()) if len(r) else 1.0)
        n_class = int((pred == r.target).sum())
        assert r.coverage == pytest.approx(float(same.sum()) / n_class)
    for i in (0, 7, 29):
        assert ri.interpret(seeds[i : i + 1], **NB) == regions[i]
    maps = ri.attribute(seeds[:4], heatmap_layer="input", **NB)
    one = torch.cat([ri.attribute(seeds[i : i + 1], heatmap_layer="input", **NB) for i in range(4)])
    torch.testing.assert_close(maps, one, rtol=1e-5, atol=1e-6)
    for i, r in enumerate(ri.interpret(seeds[:4], heatmap_layer="input", **NB)):
        torch.testing.assert_close(r.heatmap(seeds[i : i + 1]), maps[i : i + 1])


def test_channels_last_model_and_inputs_match_contiguous():
    """A torchvision ResNet-18 (weights=None, 32 px) converted to channels_last, fitted
    and explained on channels_last images: the same features, members and maps as the
    contiguous model (float rounding only)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # spread the random logits over the classes
        net.fc.weight.mul_(30)
        net.fc.bias.sub_(net(x).mean(0))
    assert len(net(x).argmax(1).unique()) > 1
    a = _fit(net, net.layer3, x[:20])
    net2 = copy.deepcopy(net).to(memory_format=torch.channels_last)
    xc = x.to(memory_format=torch.channels_last)
    b = _fit(net2, net2.layer3, xc[:20])
    torch.testing.assert_close(a.features_, b.features_, rtol=1e-4, atol=1e-4)
    ra, rb = a.interpret(x[20:22], n_boundaries=6), b.interpret(xc[20:22], n_boundaries=6)
    assert [r.members.tolist() for r in ra] == [r.members.tolist() for r in rb]
    ma = a.attribute(x[20:22], n_boundaries=6, heatmap_layer=None)
    mb = b.attribute(xc[20:22], n_boundaries=6, heatmap_layer=None)
    torch.testing.assert_close(ma, mb, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------- after the fixes


def test_parameter_functions_and_a_hand_written_relu_are_not_curved(tiny):
    """The trace follows input dependence: a norm of the weights after the layer (weight
    normalisation) and ``f * (f > 0)`` (a ReLU written by hand) are piecewise linear in
    the features; ``f * f`` next to them is not."""
    model, x = tiny

    class Normed(nn.Module):
        def __init__(self, square: bool) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.ones(8, 1, 1))
            self.square = square

        def forward(self, z):
            f = model.features(z)
            f = f * (self.g / self.g.norm()) * (f > 0).float()
            if self.square:
                f = f * f
            return model.head(f)

    assert nonlinear_ops_after(Normed(False), model.features, (x[:1],)) == []
    assert nonlinear_ops_after(Normed(True), model.features, (x[:1],)) == [
        "mul (of two tensors that depend on the layer)"
    ]


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


def test_labels_given_with_the_references_get_a_clear_error(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    labels = torch.arange(80) % 4
    with pytest.raises(TypeError, match=r"references: a tuple of 2 tensors .* labels"):
        ri.fit((x[:80], labels), progress=False)
    with pytest.raises(ValueError, match=r"batch_size must be .* a Tensor of shape \(80,\)"):
        ri.fit(x[:80], labels, progress=False)


def test_find_layer_on_one_image_without_its_batch_dimension_says_so(tiny):
    from captum_repinterp import find_layer

    model, x = tiny
    with pytest.raises(ValueError, match=r"shape \(1, 12, 12\).*add the batch dimension"):
        find_layer(model, x[0])


def test_report_data_errors_name_what_was_given(tiny):
    from captum_repinterp.report import audit_regions, resolve_data

    model, x = tiny
    with pytest.raises(TypeError, match=r"got a ndarray of shape \(80, 1, 12, 12\).*from_numpy"):
        resolve_data((x[:80].numpy(), x[80:100]))
    with pytest.raises(ValueError, match="reference_labels must be class indices >= 0"):
        resolve_data((x[:80], x[80:100], torch.arange(80) - 5, torch.zeros(20, dtype=int)))
    ri = _fit(model, model.features[-1], x[:240])
    with pytest.warns(UserWarning, match=r"classes: \[9\] not predicted on heldout"):
        rows, _ = audit_regions(ri, x[240:], [0, 9], 1, **NB)
    assert {r.target for r in rows} == {0}


def test_training_that_learns_nothing_warns():
    from captum_repinterp.models import train_small_cnn

    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 12, 12, generator=g)
    labels = torch.arange(64) % 4
    with pytest.warns(UserWarning, match=r"classifies .* training images correctly"):
        train_small_cnn(images, labels, epochs=0, cache=False)
