"""The Captum facade: shapes, determinism, batch independence, no side effects."""

import copy
import random
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam
from captum.attr import visualization as viz
from conftest import fit
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import TensorDataset

from captum_repinterp import (
    Interpretation,
    NotFittedError,
    RepresentativeInterpretation,
    audit,
)
from captum_repinterp.saving import TENSORS


@pytest.fixture(scope="module")
def fitted(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    ri.fit(x[:240], batch_size=64, progress=False)
    return ri, model, x


def test_fit_stores_features_and_predictions(fitted):
    ri, model, x = fitted
    assert ri.features_.shape == (240, 8 * 6 * 6) and ri.features_.dtype == torch.float32
    with torch.no_grad():
        feats = model.features(x[:240]).reshape(240, -1)
        preds = model(x[:240]).argmax(1)
    torch.testing.assert_close(ri.features_, feats)
    assert torch.equal(ri.predictions_, preds)
    assert preds.unique().numel() == 4


def test_fit_accepts_dataset_and_dataloader(fitted, tiny):
    ri, model, x = fitted
    ds = torch.utils.data.TensorDataset(x[:240], torch.zeros(240))
    ri2 = RepresentativeInterpretation(model, model.features[-1]).fit(ds, 50, progress=False)
    torch.testing.assert_close(ri2.features_, ri.features_)
    dl = torch.utils.data.DataLoader(ds, batch_size=33)
    ri3 = RepresentativeInterpretation(model, model.features[-1]).fit(dl, progress=False)
    assert torch.equal(ri3.predictions_, ri.predictions_)


def test_shape_matches_layergradcam(fitted):
    ri, model, x = fitted
    seeds = x[240:245]
    attr = ri.attribute(seeds, heatmap_layer=None)  # at the split layer
    gc = LayerGradCam(model, model.features[-1]).attribute(seeds, target=0)
    assert attr.shape == gc.shape == (5, 1, 6, 6)
    # the default draws where "auto" chose (the input here: 12 x 12)
    assert ri.heatmap_resolution_.heatmap_layer == "input"
    assert ri.attribute(seeds).shape == (5, 1, 12, 12)
    assert (attr >= 0).all()
    per_channel = ri.attribute(
        seeds, attr_dim_summation=False, relu_attributions=False, heatmap_layer=None
    )
    assert per_channel.shape == (5, 8, 6, 6)
    torch.testing.assert_close(per_channel.sum(1, keepdim=True).clamp_min(0), attr)


def test_non_spatial_layer_shape(tiny):
    model, x = tiny
    layer = model.head[2]  # ReLU after the hidden linear layer: N x 24
    ri = RepresentativeInterpretation(model, layer).fit(x[:200], progress=False)
    attr = ri.attribute(x[200:203], heatmap_layer=None)
    gc = LayerGradCam(model, layer).attribute(x[200:203], target=1)
    assert attr.shape == gc.shape == (3, 1)
    # the default ("auto"): the split layer here (a layer without a spatial layout), said
    with pytest.warns(UserWarning, match="draws the maps at the split layer"):
        assert ri.attribute(x[200:203]).shape == (3, 1)


def test_batch_equals_per_sample_and_seed_determinism(fitted):
    ri, model, x = fitted
    seeds = x[240:246]
    batch = ri.attribute(seeds, random_state=3)
    single = torch.cat([ri.attribute(seeds[i : i + 1], random_state=3) for i in range(6)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-6)
    assert torch.equal(batch, ri.attribute(seeds, random_state=3))
    regions_batch = ri.interpret(seeds, random_state=3)
    for i, reg in enumerate(regions_batch):
        one = ri.interpret(seeds[i : i + 1], random_state=3)
        assert torch.equal(reg.members, one.members)
        assert torch.equal(reg.weight, one.weight)


def test_interpretation_counts_against_hand_computation(fitted):
    ri, model, x = fitted
    reg = ri.interpret(x[241:242], random_state=0)
    assert isinstance(reg, Interpretation)
    c = reg.target
    assert c == int(model(x[241:242]).argmax())
    inside = ((ri.features_ @ reg.weight.T + reg.bias) > 0).all(1)
    members = set(torch.nonzero(inside).flatten().tolist())
    assert set(reg.members.tolist()) == members
    pos = ri.predictions_ == c
    n_pos_in = int((pos & inside).sum())
    assert reg.purity == pytest.approx(n_pos_in / max(1, int(inside.sum())))
    assert reg.coverage == pytest.approx(n_pos_in / int(pos.sum()))
    # ranking by semantic distance, computed by hand
    psi = model.features(x[241:242]).reshape(-1).detach()
    proj = reg.weight.double() @ psi.double()
    d = (ri.features_[reg.members].double() @ reg.weight.double().T - proj).abs().sum(1)
    torch.testing.assert_close(reg.member_distances, d, rtol=1e-4, atol=1e-3)
    assert torch.all(reg.member_distances[1:] >= reg.member_distances[:-1])
    assert torch.equal(reg.similar(3), reg.members[:3])
    # membership test: the references it contains are exactly the members
    assert torch.equal(
        reg.contains(x[:240]).nonzero().flatten().sort().values, reg.members.sort().values
    )
    # the seed is in its own region
    assert bool(reg.contains(x[241:242])[0])


def test_heatmap_reuse_is_shared_direction(fitted):
    ri, model, x = fitted
    reg = ri.interpret(x[242:243], heatmap_rule="elementwise", heatmap_layer=None)
    maps = reg.heatmap(x[:4], relu_attributions=False)
    acts = model.features(x[:4]).detach()
    v = reg.direction.reshape(8, 6, 6)
    torch.testing.assert_close(maps, (v * acts).sum(1, keepdim=True), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        reg.heatmap(x[242:243]),
        ri.attribute(x[242:243], heatmap_rule="elementwise", heatmap_layer=None),
    )
    # elementwise-positive draws the positive part of the same direction
    positive = ri.interpret(x[242:243], heatmap_rule="elementwise-positive", heatmap_layer=None)
    torch.testing.assert_close(
        positive.heatmap(x[:4], relu_attributions=False),
        (v.clamp_min(0) * acts).sum(1, keepdim=True),
        rtol=1e-4,
        atol=1e-5,
    )
    # elementwise-members divides each channel of the same direction by its mean level
    # over the seed and its 8 nearest reference members, weights of mean 1
    default = ri.interpret(x[242:243], heatmap_rule="elementwise-members", heatmap_layer=None)
    assert torch.equal(default.direction, reg.direction)
    nearest = default.members[:8]  # nearest first; the seed is not a reference here
    levels = torch.cat([model.features(x[242:243]), model.features(x[nearest])]).detach()
    inv = 1.0 / levels.mean(dim=(0, 2, 3)).double()
    w = (inv / inv.mean()).float()
    torch.testing.assert_close(
        default.heatmap(x[:4], relu_attributions=False),
        (v * w[:, None, None] * acts).sum(1, keepdim=True),
        rtol=1e-4,
        atol=1e-5,
    )


def test_save_load_roundtrip(fitted, tmp_path):
    ri, model, x = fitted
    reg = ri.interpret(x[243:244])
    path = tmp_path / "region.npz"
    reg.save(path)
    back = Interpretation.load(path, explainer=ri)
    for name in TENSORS:
        assert torch.equal(getattr(back, name), getattr(reg, name))
    assert back.metadata() == reg.metadata()
    assert torch.equal(back.contains(x[:50]), reg.contains(x[:50]))
    with np.load(path, allow_pickle=False) as data:
        assert "metadata" in data.files
    orphan = Interpretation.load(path)
    with pytest.raises(RuntimeError, match="explainer"):
        orphan.contains(x[:2])


def test_targets_in_every_captum_form(fitted):
    ri, model, x = fitted
    seeds = x[240:244]
    preds = model(seeds).argmax(1)
    ref = ri.attribute(seeds)
    torch.testing.assert_close(ri.attribute(seeds, target=preds), ref)
    torch.testing.assert_close(ri.attribute(seeds, target=preds.tolist()), ref)
    one = ri.attribute(seeds[:1], target=int(preds[0]))
    torch.testing.assert_close(one, ri.attribute(seeds[:1], target=torch.tensor(int(preds[0]))))
    torch.testing.assert_close(one, ri.attribute(seeds[:1], target=torch.tensor([int(preds[0])])))
    with pytest.raises(ValueError, match="target"):
        ri.attribute(seeds, target=17)
    with pytest.raises(ValueError, match="target"):
        ri.attribute(seeds, target=[0, 1])


def test_other_target_region_excludes_seed(fitted):
    ri, model, x = fitted
    seed = x[240:241]
    pred = int(model(seed).argmax())
    other = (pred + 1) % 4
    reg = ri.interpret(seed, target=other)
    assert reg.target == other and not reg.seed_in_class
    assert not bool(reg.contains(seed)[0])
    if len(reg) > 0:
        assert reg.purity > 0.5


def test_explicit_head_equals_hook_head(fitted, tiny):
    ri, model, x = fitted
    ri_head = RepresentativeInterpretation(model, model.features[-1], head=model.head)
    ri_head.fit(x[:240], progress=False)
    a = ri.attribute(x[240:243])
    b = ri_head.attribute(x[240:243])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_under_no_grad_and_wrapped(fitted):
    ri, model, x = fitted
    with torch.no_grad():
        a = ri.attribute(x[240:242])
    torch.testing.assert_close(a, ri.attribute(x[240:242]))
    assert hasattr(RepresentativeInterpretation.attribute, "__wrapped__")
    assert not ri.has_convergence_delta() and ri.multiplies_by_inputs is False


def test_interpolate_and_visualize(fitted):
    ri, model, x = fitted
    attr = ri.attribute(x[240:242])
    up = LayerAttribution.interpolate(attr, (12, 12), "bilinear")
    assert up.shape == (2, 1, 12, 12)
    fig = Figure()
    ax = fig.subplots()
    out_fig, _ = viz.visualize_image_attr(
        up[0].permute(1, 2, 0).detach().numpy(),
        x[240].permute(1, 2, 0).numpy(),
        method="blended_heat_map",
        sign="positive",
        plt_fig_axis=(fig, ax),
        use_pyplot=False,
    )
    assert out_fig is fig


def test_no_side_effects_on_success_and_error(tiny, boom_cls):
    model, x = tiny
    model.train()
    model.features[0].eval()  # a mixed state must come back as it was
    flags = {name: m.training for name, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.head[1].weight.requires_grad_(False)
    grads["head.1.weight"] = False
    ri = RepresentativeInterpretation(model, model.features[-1])
    with pytest.warns(UserWarning, match="training mode"):
        ri.fit(x[:200], progress=False)
    with pytest.warns(UserWarning, match="training mode"):
        ri.attribute(x[200:202])
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    model.head[1].weight.requires_grad_(True)
    model.eval()

    boom = boom_cls(model).train()
    ri = RepresentativeInterpretation(boom, model.features[-1])
    with pytest.warns(UserWarning):
        ri.fit(x[:200], progress=False)
    boom.armed = True
    with pytest.raises(RuntimeError, match="boom"), pytest.warns(UserWarning):
        ri.attribute(x[200:201])
    assert boom.training and model.training
    for m in boom.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    model.eval()


def test_tuple_inputs_and_additional_args(tiny):
    model, x = tiny

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
            return self.m(a + scale * b)

    net = TwoInputs().eval()
    b = torch.zeros_like(x)
    ri = RepresentativeInterpretation(net, model.features[-1])
    ri.fit((x[:200], b[:200]), additional_forward_args=(1.0,), progress=False)
    plain = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    # at the split layer: "auto" cannot score a model with extra arguments (it warns)
    a1 = ri.attribute((x[200:202], b[200:202]), additional_forward_args=(1.0,), heatmap_layer=None)
    torch.testing.assert_close(a1, plain.attribute(x[200:202], heatmap_layer=None))


def test_errors_before_fit_and_for_bad_arguments(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    with pytest.raises(NotFittedError, match="fit"):
        ri.attribute(x[:1])
    ri.fit(x[:200], progress=False)
    with pytest.raises(ValueError, match="n_boundaries"):
        ri.attribute(x[:1], n_boundaries=0)
    with pytest.raises(ValueError, match="delta"):
        ri.attribute(x[:1], delta=-1)
    with pytest.raises(ValueError, match="NaN"):
        ri.attribute(torch.full((1, 1, 12, 12), float("nan")))
    with pytest.raises(TypeError, match="inputs"):
        ri.attribute([1, 2, 3])
    with pytest.raises(ValueError, match="layer"):
        RepresentativeInterpretation(model, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="single class"):
        RepresentativeInterpretation(model, model.features[-1]).fit(
            x[:1].repeat(10, 1, 1, 1), progress=False
        )


def test_region_score_rule_against_hand_computation(fitted, tmp_path):
    ri, model, x = fitted
    seed = x[244:245]
    reg = ri.interpret(seed, heatmap_rule="region-score")
    assert reg.channel_weights is not None and reg.channel_weights.shape == (8,)
    # by hand: mask the seed with each channel's upsampled, min-max scaled activation
    acts = model.features(seed).detach()[0]
    scores = []
    for k in range(8):
        m = torch.nn.functional.interpolate(
            acts[k][None, None], size=(12, 12), mode="bilinear", align_corners=False
        )[0, 0]
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        f = model.features(seed * m).detach().reshape(-1)
        h = (reg.weight @ f + reg.bias) / reg.weight.norm(dim=1)
        scores.append(float(h.min()))
    alpha = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).float()
    torch.testing.assert_close(reg.channel_weights, alpha, rtol=1e-4, atol=1e-6)
    # reused on other images: relu(sum_k alpha_k A_k)
    maps = reg.heatmap(x[:3])
    expect = (alpha[None, :, None, None] * model.features(x[:3]).detach()).sum(1, keepdim=True)
    torch.testing.assert_close(maps, expect.clamp_min(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ri.attribute(seed, heatmap_rule="region-score"), reg.heatmap(seed))
    # batch equals per sample
    batch = ri.attribute(x[244:247], heatmap_rule="region-score")
    single = torch.cat(
        [ri.attribute(x[i : i + 1], heatmap_rule="region-score") for i in range(244, 247)]
    )
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-6)
    reg.save(tmp_path / "r.npz")
    back = Interpretation.load(tmp_path / "r.npz", explainer=ri)
    assert torch.equal(back.channel_weights, reg.channel_weights)
    torch.testing.assert_close(back.heatmap(x[:3]), maps)


def test_region_score_rule_needs_a_conv_layer(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.head[2]).fit(x[:200], progress=False)
    with pytest.raises(ValueError, match="region-score"):
        ri.attribute(x[200:201], heatmap_rule="region-score")


def test_fit_preallocated_and_dataloader_drop_last(fitted):
    ri, model, x = fitted
    ds = torch.utils.data.TensorDataset(x[:240])
    dl = torch.utils.data.DataLoader(ds, batch_size=50, drop_last=True)
    ri2 = RepresentativeInterpretation(model, model.features[-1]).fit(dl, progress=False)
    assert ri2.features_.shape[0] == 200
    torch.testing.assert_close(ri2.features_, ri.features_[:200])
    assert torch.equal(ri2.predictions_, ri.predictions_[:200])


def test_evaluate_features_by_hand_and_exclude(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    reg = ri.interpret(x[200:201])
    feats, preds = ri.transform(x[200:])
    inside = reg.contains_features(feats)
    pos = preds == reg.target
    score = reg.evaluate_features(feats, preds)
    assert score["n_inside"] == int(inside.sum())
    assert score["precision"] == int((inside & pos).sum()) / int(inside.sum())
    assert score["coverage"] == int((inside & pos).sum()) / int(pos.sum())
    # leaving out row 0 (the seed itself, inside its own region) is the same as slicing
    assert bool(inside[0])
    keep = torch.arange(len(preds)) != 0
    assert reg.evaluate_features(feats, preds, exclude=0) == reg.evaluate_features(
        feats[keep], preds[keep]
    )
    assert reg.evaluate_features(feats, preds, exclude=[0, 1]) == reg.evaluate_features(
        feats[2:], preds[2:]
    )
    with pytest.raises(ValueError, match="exclude"):
        reg.evaluate_features(feats, preds, exclude=len(preds))
    with pytest.raises(ValueError, match="predictions"):
        reg.evaluate_features(feats, preds[1:])


def test_fit_from_a_stream_of_unknown_length_keeps_every_batch(fitted):
    """An iterable without ``len``: features are gathered batch by batch (the layer's
    copies are reused from one batch to the next, so each must be kept as a copy)."""
    ri, model, x = fitted

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for s in range(0, 240, 50):
                yield (x[s : min(s + 50, 240)],)

    ri2 = RepresentativeInterpretation(model, model.features[-1])
    ri2.fit(torch.utils.data.DataLoader(Stream(), batch_size=None), progress=False)
    torch.testing.assert_close(ri2.features_, ri.features_)
    assert torch.equal(ri2.predictions_, ri.predictions_)


# --------------------------------------------- state, random generators, batches and memory format
NB = {"n_boundaries": 10}


_fit = partial(fit, ignore_warnings=UserWarning)


@pytest.mark.usefixtures("one_thread")
def test_fit_on_a_dataset_leaves_the_global_rng_alone(tiny):
    """fit wraps a Dataset in its own DataLoader; iterating it drew a base seed from the
    global generator, so fitting changed the random numbers the user gets next."""
    model, x = tiny
    dataset = TensorDataset(x[:200])
    state = torch.get_rng_state()
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(dataset, progress=False)
    ri.transform(dataset)
    assert torch.equal(torch.get_rng_state(), state)


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
    """For 30 seeds: the seed is inside, ``members`` is exactly the references inside
    by their stored features (and, for five seeds, those ``contains`` accepts reading
    each image again: one forward pass per image, 240 per seed), purity and coverage
    are the shares by the stored predictions, and a batch gives what its seeds give one
    at a time (regions and maps)."""
    model, x = tiny
    ri = _fit(model, model.features[-1], x[:240])
    pred = ri.predictions_
    seeds = x[240:270]
    regions = ri.interpret(seeds, **NB)
    inside = torch.stack([r.contains_features(ri.features_) for r in regions])
    for i in (0, 7, 14, 21, 29):
        assert torch.equal(regions[i].contains(x[:240]), inside[i])
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
