"""Maps at the input (``heatmap_layer="input"``) and the resolution ``"auto"`` chooses."""

import warnings

import pytest
import torch
from torch import nn

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.interpretation import Interpretation
from captum_repinterp.options import InterpretOptions
from captum_repinterp.resolution import (
    INSERTION_SHARES,
    ResolutionChoice,
    choose_heatmap_layer,
    insertion_scores,
    margin_maps,
)


@pytest.fixture(scope="module")
def fitted(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1], head=model.head)
    return model, x, ri.fit(x[:200], progress=False)


def test_insertion_scores_by_hand():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    model[1].weight.data = w
    images = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.5], [0.5, 2.0]]]])
    maps = torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]], [[[0.0, 1.0], [2.0, 3.0]]]])
    got = insertion_scores(model, images, maps, torch.tensor([0, 0]), shares=(0.25, 0.5, 1.0))
    # keep the top 1, 2, 4 pixels by the map, the rest 0; p = sigmoid(z0 - z1) = sigmoid(z0)
    kept = [
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]],
        [[0, 0, 0, 2], [0, 0, 0.5, 2], [2, 0.5, 0.5, 2]],
    ]
    z = torch.tensor(kept, dtype=torch.float64) @ w[0].double()
    torch.testing.assert_close(got, torch.sigmoid(z))
    # maps at a coarser resolution are upsampled (bilinear) before the ranking
    coarse = insertion_scores(model, images, maps[:, :, :1, :1], torch.tensor([0, 0]), (1.0,))
    torch.testing.assert_close(coarse, got[:, 2:])


def test_margin_maps_are_gradient_times_activation_of_the_margin(tiny):
    model, x = tiny
    images, top, ru = x[:5], torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 2, 3, 0, 2])
    at_layer, at_input = margin_maps(model, model.features[-1], images, top, ru)
    xi = images.clone().requires_grad_(True)
    acts = model.features(xi)
    acts.retain_grad()
    out = model.head(acts)
    margin = out[torch.arange(5), top] - out[torch.arange(5), ru]
    margin.sum().backward()
    torch.testing.assert_close(at_layer, (acts.grad * acts).sum(1, keepdim=True).clamp_min(0))
    torch.testing.assert_close(at_input, (xi.grad * xi).sum(1, keepdim=True).clamp_min(0))
    assert at_layer.shape == (5, 1, 6, 6) and at_input.shape == (5, 1, 12, 12)


class _Pooled(nn.Module):
    """Class scores from the mean of each channel: the split layer (1 x 1) cannot say
    where the evidence is, the input can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1))
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 4.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def test_auto_picks_the_input_when_the_layer_has_no_spatial_detail():
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(32, 1, 8, 8)
    for i in range(32):  # a few strong pixels (positive or negative) somewhere
        idx = torch.randperm(64, generator=gen)[:4]
        images[i].view(-1)[idx] = 3.0 if i % 2 == 0 else -3.0
    model = _Pooled().eval()
    choice = choose_heatmap_layer(model, model.pool, images, n_images=16)
    assert choice.heatmap_layer == "input" and choice.n_images == 16
    assert choice.scores["input"] > choice.scores["layer"] and choice.p_value < 0.05
    again = choose_heatmap_layer(model, model.pool, images, n_images=16)
    assert again == choice  # seeded sample: the same choice


def test_auto_reads_datasets_and_loaders_like_the_tensor(tiny):
    """A Dataset of (image, label) items and a shuffled DataLoader over it give the same
    sample of images, so the same choice and scores as the tensor."""
    from torch.utils.data import DataLoader, TensorDataset

    model, x = tiny
    ds = TensorDataset(x[:200], torch.arange(200) % 4)
    by_tensor = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    for refs in (ds, DataLoader(ds, batch_size=64, shuffle=True)):
        ri = RepresentativeInterpretation(model, model.features[-1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the shuffled loader's member-order warning
            ri.fit(refs, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            assert ri.heatmap_resolution_ == by_tensor.heatmap_resolution_


def test_auto_keeps_the_split_layer_when_it_cannot_score(tiny):
    model, x = tiny
    layer = model.features[-1]
    assert choose_heatmap_layer(model, layer, None).heatmap_layer is None
    assert choose_heatmap_layer(model, layer, (x[:20],)).heatmap_layer is None  # a tuple
    flat = choose_heatmap_layer(model, layer, x[:20].flatten(1))
    assert flat.heatmap_layer is None and "N x C x H x W" in flat.reason
    assert isinstance(flat, ResolutionChoice) and flat.scores == {}


def test_auto_resolves_once_per_fit_and_by_rule(fitted, monkeypatch):
    model, x, ri = fitted
    import captum_repinterp.resolution as res

    calls = []
    real = res.choose_heatmap_layer

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(res, "choose_heatmap_layer", counting)
    ri.__dict__.pop("_resolution", None)
    choice = ri.heatmap_resolution_
    assert ri.heatmap_resolution_ is choice and len(calls) == 1  # kept
    reg = ri.interpret(x[200:201], heatmap_layer="auto")
    assert reg.heatmap_layer == choice.heatmap_layer and len(calls) == 1
    chan = ri.interpret(x[200:201], heatmap_layer="auto", heatmap_rule="channel")
    assert chan.heatmap_layer is None  # rules that cannot be drawn at the input
    # auto equals the resolution it chose
    at = "input" if choice.heatmap_layer == "input" else None
    torch.testing.assert_close(
        ri.attribute(x[200:203], heatmap_layer="auto"), ri.attribute(x[200:203], heatmap_layer=at)
    )
    ri.fit(x[:200], progress=False)  # a new fit chooses again
    assert ri.heatmap_resolution_.n_images == choice.n_images
    assert len(calls) == 2


def test_input_map_is_input_times_gradient_of_the_region_score(fitted):
    model, x, ri = fitted
    for rule in ("elementwise", "elementwise-members"):
        reg = ri.interpret(x[200:201], heatmap_rule=rule, heatmap_layer="input")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning of Captum's about requires_grad
            maps = reg.heatmap(x[210:216], relu_attributions=False)
        u = reg.rule.score_direction(reg.direction, reg.channel_weights, ri.layout_)
        xi = x[210:216].clone().requires_grad_(True)
        (model.features(xi).flatten(1) @ u).sum().backward()
        torch.testing.assert_close(maps, xi.grad * xi, rtol=1e-4, atol=1e-6)
        assert not x.requires_grad and x.grad is None
    # attribute on the seed is the region's map on the seed
    torch.testing.assert_close(
        ri.attribute(x[200:201], heatmap_rule="elementwise-members", heatmap_layer="input"),
        reg.heatmap(x[200:201]),
    )


def test_input_map_survives_save_and_load(fitted, tmp_path):
    model, x, ri = fitted
    reg = ri.interpret(x[200:201], heatmap_layer="input")
    reg.save(tmp_path / "r.zip")
    back = Interpretation.load(tmp_path / "r.zip", explainer=ri)
    assert back.heatmap_layer == "input"
    torch.testing.assert_close(back.heatmap(x[210:213]), reg.heatmap(x[210:213]))
    with pytest.raises(ValueError, match="heatmap_layer"):
        back.heatmap_from_activations(ri.layout_.unflatten(ri.features_[:2]))


def test_bad_heatmap_layer_values():
    with pytest.raises(
        ValueError,
        match="heatmap_layer must be an nn.Module, .input., .auto. or None, got .inputs.",
    ):
        InterpretOptions(heatmap_layer="inputs")
    with pytest.raises(TypeError, match="heatmap_layer must be an nn.Module, 'input'"):
        InterpretOptions(heatmap_layer=3)
    for rule in ("channel", "region-score", "region-members"):
        with pytest.raises(ValueError, match="heatmap_layer"):
            InterpretOptions(heatmap_rule=rule, heatmap_layer="input")
        assert (
            InterpretOptions(heatmap_rule=rule, heatmap_layer="auto")
            .resolved("input")
            .heatmap_layer
            is None
        )


def test_choice_leaves_the_model_as_it_was(tiny):
    model, x = tiny
    model.train()
    model.zero_grad(set_to_none=True)
    flags = [p.requires_grad for p in model.parameters()]
    try:
        choose_heatmap_layer(model, model.features[-1], x[:40], n_images=8)
        assert model.training and all(m.training for m in model.modules())
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()
    assert INSERTION_SHARES == (0.1, 0.3, 0.5, 0.7, 0.9)


@pytest.mark.slow
def test_auto_on_the_bundled_models():
    """The choice on real models and images: the input for the digits (strokes on
    black), the split layer for the faces (grey background)."""
    from captum_repinterp.evaluation.setups import load_setup

    for name, expected in (("digits", "input"), ("faces", None)):
        s = load_setup(name)
        choice = choose_heatmap_layer(s.model, s.layer, s.references)
        assert choice.heatmap_layer == expected, (name, choice)


def test_the_input_needs_a_significant_lead():
    """A near tie keeps the split layer; a consistent lead picks the input (one-sided
    Wilcoxon signed-rank test, checked against scipy on the same differences)."""
    from scipy.stats import wilcoxon

    from captum_repinterp.resolution import input_better_p_value

    layer = torch.linspace(0.5, 0.9, 16)
    tiny_lead = layer + torch.tensor([0.02, -0.02, 0.001, -0.001] * 4) + 1e-4
    assert input_better_p_value(tiny_lead, layer) > 0.05
    clear_lead = layer + 0.05 + 0.01 * torch.rand(16, generator=torch.Generator().manual_seed(0))
    p = input_better_p_value(clear_lead, layer)
    d = (clear_lead.double() - layer.double()).numpy()
    assert p == pytest.approx(wilcoxon(d, alternative="greater").pvalue) and p < 1e-3
    assert input_better_p_value(layer, layer) == 1.0  # all equal: the split layer


def _stack(inplace: bool) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


def test_margin_maps_take_the_gradient_before_an_in_place_op_after_the_layer():
    """A ReLU(inplace=True) after the split layer must not change the maps: they equal
    those of the same model with out-of-place ReLUs, at the layer's output and input."""
    x = torch.randn(4, 2, 8, 8)
    top, ru = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2])
    inplace, plain = _stack(True), _stack(False)
    for a, b in zip(
        margin_maps(inplace, inplace[2], x, top, ru),
        margin_maps(plain, plain[2], x, top, ru),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    # the layer's input (the first ReLU's output) is the first ReLU's output in plain
    got = margin_maps(inplace, inplace[2], x, top, ru, attribute_to_layer_input=True)
    want = margin_maps(plain, plain[1], x, top, ru)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert not any(p.grad is not None for p in inplace.parameters())
    assert not inplace[2]._forward_hooks and not inplace[2]._forward_pre_hooks


def test_margin_maps_refuse_a_layer_that_runs_twice_and_leave_no_hook():
    conv = nn.Conv2d(2, 2, 3, padding=1)
    model = nn.Sequential(conv, conv, nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    with pytest.raises(ValueError, match="once per forward pass"):
        x, top, ru = torch.randn(2, 2, 8, 8), torch.tensor([0, 1]), torch.tensor([1, 0])
        margin_maps(model, conv, x, top, ru)
    assert not conv._forward_hooks


def _fake_scores(monkeypatch, lead, noise: float = 0.05):
    """Replace the model-based scoring by per-image scores ``layer`` ~ U(0.4, 0.6) and
    ``input = layer + lead + noise * N(0, 1)``, a fixed function of each image's value
    (images are ``n x 1 x 1 x 1`` tensors holding their row index); records the rows."""
    import captum_repinterp.resolution as res

    calls: list[list[int]] = []

    def fake(forward_func, layer, images, attribute_to_layer_input, shares, baseline, per):
        rows = images.flatten().long()
        calls.append(rows.tolist())
        gen = torch.Generator().manual_seed(0)
        base = 0.4 + 0.2 * torch.rand(1000, generator=gen, dtype=torch.float64)
        eps = torch.randn(1000, generator=gen, dtype=torch.float64)
        per["layer"].append(base[rows])
        per["input"].append(base[rows] + lead + noise * eps[rows])
        return ""

    monkeypatch.setattr(res, "_score_both", fake)
    return calls


def _sample(n: int = 1000) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1)


@pytest.mark.parametrize(
    ("lead", "chosen", "looks"),
    [
        (0.2, "input", [16]),  # a clear lead: decided on the first 16
        (-0.2, None, [16]),  # the split layer clearly better: decided on 16 too
        (0.0, None, [16, 32, 64]),  # a tie: every look, then the split layer
    ],
)
def test_the_sample_grows_only_while_the_choice_is_unclear(monkeypatch, lead, chosen, looks):
    calls = _fake_scores(monkeypatch, lead)
    choice = choose_heatmap_layer(lambda x: x, nn.Identity().eval(), _sample())
    assert choice.heatmap_layer == chosen
    sizes = [len(c) for c in calls]
    assert [sum(sizes[: k + 1]) for k in range(len(sizes))] == looks
    assert choice.n_images == looks[-1]
    # the rows are the first of one seeded permutation, never scored twice
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    assert sum(calls, []) == order[: looks[-1]].tolist()
    assert "each of 3 looks" in choice.reason


def test_a_small_lead_is_found_on_more_images(monkeypatch):
    """A lead the test cannot see on 16 images at the per-look level (0.05 / 3) is found
    on 32 or 64, where the input is chosen; the p-value is that of every image scored."""
    from captum_repinterp.resolution import input_better_p_value

    calls = _fake_scores(monkeypatch, 0.016)
    choice = choose_heatmap_layer(lambda x: x, nn.Identity().eval(), _sample())
    assert len(calls[0]) == 16 and len(calls) > 1
    assert choice.heatmap_layer == "input" and choice.n_images == 64
    assert choice.p_value < 0.05 / 3
    # on the first 16 alone the same test does not decide
    gen = torch.Generator().manual_seed(0)
    base = 0.4 + 0.2 * torch.rand(1000, generator=gen, dtype=torch.float64)
    eps = torch.randn(1000, generator=gen, dtype=torch.float64)
    first = torch.tensor(calls[0])
    assert input_better_p_value(base[first] + 0.016 + 0.05 * eps[first], base[first]) > 0.05 / 3


def test_looks_stop_at_the_references_and_bad_sizes_are_refused(monkeypatch):
    calls = _fake_scores(monkeypatch, 0.0)
    choice = choose_heatmap_layer(lambda x: x, nn.Identity().eval(), _sample(40))
    assert [len(c) for c in calls] == [16, 16, 8] and choice.n_images == 40
    for kw in ({"n_images": 0}, {"max_images": 8}, {"n_images": True}, {"max_images": 2.5}):
        with pytest.raises(ValueError, match="n_images|max_images"):
            choose_heatmap_layer(lambda x: x, nn.Identity().eval(), _sample(40), **kw)
    one = choose_heatmap_layer(lambda x: x, nn.Identity().eval(), _sample(1))
    assert one.heatmap_layer is None and "fewer than two" in one.reason


def test_too_few_references_say_so(monkeypatch):
    """With 4 references the exact test's smallest p (1/16) is above 0.05: the reason
    says the references are too few, not that the maps tie."""
    _fake_scores(monkeypatch, 0.3)
    choice = choose_heatmap_layer(lambda x: x, nn.Identity().eval(), _sample(4))
    assert choice.heatmap_layer is None and choice.n_images == 4
    assert "too few references to decide on" in choice.reason and "at one look" in choice.reason
    many = choose_heatmap_layer(lambda x: x, nn.Identity().eval(), _sample(6))
    assert many.heatmap_layer == "input"  # 1/64 < 0.05 at one look


def test_non_finite_scores_keep_the_split_layer_and_say_why(tiny):
    """A model whose outputs on masked images are NaN gives no p-value to decide on: the
    choice keeps the split layer with a reason (so the explainer warns), not p = nan."""
    model, x = tiny

    class NanOnMasked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model
            self.features = model.features

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            out = self.m(z)
            masked = (z == 0).flatten(1).any(1)  # insertion sets pixels to 0
            return torch.where(masked[:, None], torch.full_like(out, float("nan")), out)

    net = NanOnMasked().eval()
    choice = choose_heatmap_layer(net, net.features[-1], x[:40] + 10.0)
    assert choice.heatmap_layer is None and not choice.scores
    assert "not finite" in choice.reason


def test_float_noise_is_a_tie_not_a_lead():
    """A degenerate model (logits about 1e-13) scores 0.25 with every map, up to float
    noise: differences of at most SCORE_TIE are ties, so the split layer is kept; one
    real difference among them still counts."""
    from captum_repinterp.resolution import SCORE_TIE, input_better_p_value

    layer = torch.full((16,), 0.25, dtype=torch.float64)
    noise = layer + torch.linspace(1e-13, 1e-10, 16, dtype=torch.float64)
    assert input_better_p_value(noise, layer) == 1.0
    assert input_better_p_value(layer + 0.5 * SCORE_TIE, layer) == 1.0
    lead = layer + torch.linspace(0.01, 0.05, 16, dtype=torch.float64)
    assert input_better_p_value(lead, layer) < 1e-3


@pytest.mark.parametrize("lead", [-0.01, 0.01])
def test_an_unclear_lead_of_the_split_layer_is_said_to_be_one(monkeypatch, lead):
    """When neither map is clearly better the split layer is kept; when it also scored
    higher on average the reason says so, with its p-value, instead of a bare "no clear
    difference" next to a higher layer score (a new user read that as a contradiction).
    An unclear lead of the input keeps the plain wording."""
    from captum_repinterp.resolution import input_better_p_value

    _fake_scores(monkeypatch, lead)
    choice = choose_heatmap_layer(lambda x: x, nn.Identity().eval(), _sample())
    assert choice.heatmap_layer is None and choice.n_images == 64
    layer, inp = choice.scores["layer"], choice.scores["input"]
    assert (layer > inp) == (lead < 0)
    if lead < 0:
        gen = torch.Generator().manual_seed(0)
        base = 0.4 + 0.2 * torch.rand(1000, generator=gen, dtype=torch.float64)
        eps = torch.randn(1000, generator=gen, dtype=torch.float64)
        rows = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:64]
        p_layer = input_better_p_value(base[rows], base[rows] + lead + 0.05 * eps[rows])
        assert 0.05 / 3 <= p_layer < 0.5  # higher, not clearly
        assert (
            "no clear difference at this level (the split layer's maps scored higher on "
            f"average, p = {p_layer:.2g} for them): the split layer is kept" in choice.reason
        )
    else:
        assert "no clear difference: the split layer is kept (" in choice.reason


def _fake_differences(monkeypatch, diff):
    """Per-image scores ``layer = 0.5`` and ``input = 0.5 + diff(row)``."""
    import captum_repinterp.resolution as res

    def fake(forward_func, layer, images, attribute_to_layer_input, shares, baseline, per):
        rows = images.flatten().long()
        per["layer"].append(torch.full((len(rows),), 0.5, dtype=torch.float64))
        per["input"].append(0.5 + diff(rows).double())
        return ""

    monkeypatch.setattr(res, "_score_both", fake)


def test_tied_references_do_not_shrink_the_p_value(monkeypatch):
    """Ties are left out before the test: with the zeros passed on, scipy switched to
    its normal approximation and gave p = .023 for 4 differing images of 16 (the exact
    test's smallest p on 4 is 1/16), so the input was chosen on 4 images. Now the p is
    the exact one, and the reason says the differing references are too few."""
    from captum_repinterp.resolution import input_better_p_value

    layer = torch.full((16,), 0.5, dtype=torch.float64)
    lead = torch.tensor([0.1] * 4 + [0.0] * 12, dtype=torch.float64)
    assert input_better_p_value(layer + lead, layer) == pytest.approx(1 / 16)
    assert input_better_p_value(layer[:4] + lead[:4], layer[:4]) == pytest.approx(1 / 16)
    _fake_differences(monkeypatch, lambda rows: torch.where(rows < 4, 0.1, 0.0))
    choice = choose_heatmap_layer(lambda x: x, nn.Identity().eval(), _sample(16))
    assert choice.heatmap_layer is None and choice.p_value == pytest.approx(1 / 16)
    assert "too few references to decide on (4 of 16 score differently)" in choice.reason


@pytest.mark.parametrize("sign", [1, -1])
def test_a_lead_on_most_references_with_a_lower_mean_says_so(monkeypatch, sign):
    """The test is on signed ranks: one map can win on 15 of 16 references by a little
    and lose on one by a lot, so that it is chosen (or the split layer is) while its
    mean score is lower. The reason said "the input's maps score higher" next to a
    lower input score; it now says "on most references, though lower on average"."""
    _fake_differences(monkeypatch, lambda rows: sign * torch.where(rows == 0, -0.4, 0.01))
    choice = choose_heatmap_layer(lambda x: x, nn.Identity().eval(), _sample(16))
    winner = "input" if sign == 1 else "layer"
    assert choice.heatmap_layer == ("input" if sign == 1 else None)
    assert choice.scores[winner] < choice.scores["layer" if sign == 1 else "input"]
    said = "the input's maps" if sign == 1 else "the split layer's maps"
    assert f"{said} score higher on most references, though lower on average" in choice.reason
    # where the mean agrees, the plain wording
    _fake_differences(monkeypatch, lambda rows: sign * torch.full((len(rows),), 0.01))
    plain = choose_heatmap_layer(lambda x: x, nn.Identity().eval(), _sample(16))
    assert f"{said} score higher (" in plain.reason
