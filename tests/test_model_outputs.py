"""What the model returns and how it computes: one score per example, a tuple or a dict,
NaN logits for some references or a seed, a final log_softmax, affine map or softmax
(whose boundary normals are in probabilities, said by ProbabilityOutputWarning), a model
on the meta device, batch statistics before the layer (features that depend on the
batch, warned about), a frozen backbone run under ``torch.no_grad()`` in forward, and a
model that changes its input in place."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial

import pytest
import torch
from conftest import fit, refit_last_linear
from torch import Tensor, nn

from captum_repinterp import (
    ProbabilityOutputWarning,
    RepresentativeInterpretation,
)
from captum_repinterp.features import forward_with_layer

NB = {"n_boundaries": 10}


_fit = partial(fit, ignore_warnings=UserWarning)


@pytest.mark.usefixtures("one_thread")
def test_one_score_per_example_is_refused_with_a_reason(tiny):
    """A binary model with one logit: "predicts a single class" did not say why."""
    model, x = tiny

    class OneLogit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            out = self.inner(z)
            return out[:, :1] - out[:, 1:2]

    wrapped = OneLogit().eval()
    with pytest.raises(ValueError, match="forward_func.*one score"):
        RepresentativeInterpretation(wrapped, model.features[-1]).fit(x[:50], progress=False)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_model_returning_a_tuple_or_dict_says_what_to_do(tiny, kind):
    from captum_repinterp.layers import find_layer

    model, x = tiny

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, z: torch.Tensor):
            out = self.inner(z)
            return (out, out.sum()) if kind == "tuple" else {"logits": out}

    wrapped = Wrapped().eval()
    with pytest.raises(TypeError, match=f"got {kind}; wrap the model"):
        RepresentativeInterpretation(wrapped, model.features[-1]).fit(x[:50], progress=False)
    with pytest.raises(TypeError, match=f"got {kind}; wrap the model"):
        find_layer(wrapped, x[:1])


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


# --------------------------------------------- meta device, batch statistics


def test_a_model_on_the_meta_device_is_refused_naming_it(tiny):
    """A model built on the meta device has no weights: fit said the references failed
    in the model ("check that references have the shape ... the model expects"), after
    moving them to the meta device; it now names forward_func and the cause."""
    import copy

    model, x = tiny
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match="forward_func: the model's parameters are on the meta"):
        RepresentativeInterpretation(meta, meta.features).fit(x[:8], progress=False)


def _spread(model: nn.Module, images: torch.Tensor) -> None:
    """Spread the predictions of a model with ``features`` and a ``head`` ending in a
    Linear layer over the classes."""
    with torch.no_grad():
        refit_last_linear(model.head[-1], model.head[:-1](model.features(images)))


class _BatchStatsCNN(nn.Module):
    """A batch norm with batch statistics before the split layer (eval mode keeps them)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.BatchNorm2d(6, track_running_stats=False),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _batch_stats_model(refs: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """A :class:`_BatchStatsCNN` (seed 0) whose predictions are spread over ``refs``."""
    torch.manual_seed(0)
    model = _BatchStatsCNN().eval()
    _spread(model, refs)
    return model, refs


def test_features_that_depend_on_the_batch_are_warned_about(tiny, one_thread):
    """With batch statistics before the layer a reference's features depend on its
    batch: fits with batch_size 40 and 8 differ, and so do one image's features read
    alone and in a batch (transform), while seeds are read one at a time. fit warned of
    nothing; it now compares the first reference alone with its row of the first batch.
    The same model with running statistics, and a fit in batches of one, get no warning."""
    model, refs = _batch_stats_model(tiny[1][:40])
    with pytest.warns(UserWarning, match="differ when it runs alone and in its batch"):
        big = RepresentativeInterpretation(model, model.features).fit(
            refs, batch_size=40, progress=False
        )
    with pytest.warns(UserWarning, match="differ when it runs alone and in its batch"):
        small = RepresentativeInterpretation(model, model.features).fit(
            refs, batch_size=8, progress=False
        )
    assert (big.features_ - small.features_).abs().max() > 1e-2  # what the warning is for
    alone = torch.cat([big.transform(refs[i : i + 1])[0] for i in range(3)])
    assert (big.transform(refs[:3])[0] - alone).abs().max() > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ones = RepresentativeInterpretation(model, model.features).fit(
            refs, batch_size=1, progress=False
        )
        assert torch.allclose(ones.features_[:3], alone, atol=1e-5)
        model.features[1] = nn.BatchNorm2d(6).eval()  # running statistics
        _spread(model, refs)
        RepresentativeInterpretation(model, model.features).fit(refs, progress=False)


class _SubtractBatchMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=0, keepdim=True)


class _BatchMeanCNN(nn.Module):
    """Bias-free convolutions around an optional layer that subtracts the batch's mean:
    the features scale with the inputs, so tiny inputs give tiny features."""

    def __init__(self, mix: bool) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1, bias=False),
            _SubtractBatchMean() if mix else nn.Identity(),
            nn.Conv2d(6, 8, 3, padding=1, bias=False),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_batch_dependence_is_found_at_any_feature_scale(tiny, one_thread, scale):
    """The comparison's tolerance follows the features' own scale: inputs (and so
    features) of size 1e-4 hid a batch-mean subtraction that changes them by about 100%
    (the tolerance had a floor of 1e-3 in absolute terms); without the subtraction no
    scale warns."""
    _, x = tiny
    refs = x[:40] * scale
    for mix in (True, False):
        torch.manual_seed(0)
        model = _BatchMeanCNN(mix).eval()
        _spread(model, refs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            RepresentativeInterpretation(model, model.features).fit(
                refs, batch_size=40, progress=False
            )
        said = [w for w in caught if "differ when it runs alone" in str(w.message)]
        assert bool(said) == mix, (mix, [str(w.message) for w in caught])


def test_a_store_of_a_batch_dependent_model_says_why(tiny, one_thread, tmp_path):
    """A fresh store of a model with batch statistics failed the check of its first
    rows (recomputed in a batch of four) with "holds the features of other references
    ... use a new path", which a new path does not cure; it now names the batch mixing,
    and a fit in batches of one works."""
    model, refs = _batch_stats_model(tiny[1][:40])
    ri = RepresentativeInterpretation(model, model.features)
    with pytest.raises(ValueError, match="store: .*mixes the examples of a batch"):
        ri.fit(refs, batch_size=16, progress=False, store=tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ri.fit(refs, batch_size=1, progress=False, store=tmp_path / "b")
    assert ri.features_.shape[0] == 40


def test_appended_rows_of_a_batch_dependent_model_are_checked(tiny, one_thread, tmp_path):
    """fit(..., append=True) ran neither the batch-dependence warning nor the check of
    the store's rows, so a model with batch statistics appended rows that depend on
    batch_size without a word. The rows this call wrote are now recomputed and
    compared, as for a new store; an append in batches of one passes."""
    model, refs = _batch_stats_model(tiny[1][:40])
    ri = RepresentativeInterpretation(model, model.features)
    ri.fit(refs[:20], batch_size=1, progress=False, store=tmp_path / "s")
    with pytest.raises(ValueError, match="store: .*mixes the examples of a batch"):
        ri.fit(refs[20:], batch_size=16, progress=False, store=tmp_path / "s", append=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ri.fit(refs[20:], batch_size=1, progress=False, store=tmp_path / "t")
        ri.fit(refs[:20], batch_size=1, progress=False, store=tmp_path / "t", append=True)
    assert ri.features_.shape[0] == 40


class _NoisyCNN(_BatchMeanCNN):
    """Noise added to the inputs in forward: other features on every run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + 0.1 * torch.randn_like(x))


@pytest.mark.parametrize("append", [False, True])
def test_rows_a_fit_cannot_reproduce_are_not_called_stale(tiny, one_thread, tmp_path, append):
    """A model that gives other features each run failed a new store's check with
    "holds the features of other references ... use a new path", which points at a stale
    store that does not exist (and an append was not checked at all). Rows this call
    wrote now get their own error, naming the model's randomness."""
    _, x = tiny
    torch.manual_seed(0)
    model = _NoisyCNN(mix=False).eval()
    refs = x[:40]
    _spread(model, refs)
    path = tmp_path / "s"
    if append:
        still = _BatchMeanCNN(mix=False).eval()
        still.load_state_dict(model.state_dict())  # same weights: the fingerprint agrees
        RepresentativeInterpretation(still, still.features).fit(
            refs[:20], progress=False, store=path
        )
    ri = RepresentativeInterpretation(model, model.features)
    with pytest.raises(ValueError, match="does not give the same values from one run"):
        ri.fit(refs[20:], batch_size=16, progress=False, store=path, append=append)


class FrozenBackbone(nn.Module):
    """The tiny CNN with its convolutional part run under ``torch.no_grad()`` in forward
    (a frozen feature extractor) while ``frozen``: the same logits, no gradient at the
    last block."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.frozen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            z = self.inner.features(x)
        return self.inner.head(z)


def test_a_layer_run_without_gradients_is_named_and_head_is_the_way_out(tiny, one_thread):
    """Split inside a ``torch.no_grad()`` block of the model's forward, fit accepted the
    model and the boundary search then got autograd's "differentiated Tensor ... not
    used in the graph"; now fit refuses it with a ValueError naming ``layer`` that says
    why and what to do (also under the caller's no_grad), so does a seed's head through
    the model (a model frozen after fit, when the head needs the model), and with
    ``head=`` the regions are those of the plain model."""
    model, x = tiny
    frozen = FrozenBackbone(model).eval()
    layer = model.features[-1]
    message = "^layer: forward_func runs the layer with gradients off"
    with pytest.raises(ValueError, match=message):
        RepresentativeInterpretation(frozen, layer).fit(x[:200], progress=False)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        RepresentativeInterpretation(frozen, layer).fit(x[:200], progress=False)
    z = torch.zeros(1, model.features(x[:1]).numel(), requires_grad=True)
    layout = RepresentativeInterpretation(model, layer).fit(x[:200], progress=False).layout_
    with pytest.raises(ValueError, match=message):  # what a seed's head runs
        forward_with_layer(frozen, layer, (x[:1],), None, replace=z, layout=layout)
    assert all(p.grad is None for p in model.parameters())
    with_head = RepresentativeInterpretation(frozen, layer, head=model.head).fit(
        x[:200], progress=False
    )
    plain = fit(model, layer, x[:200], ignore_warnings=Warning)
    kw = {"n_boundaries": 12, "heatmap_layer": None}
    assert with_head.interpret(x[200:202], **kw) == plain.interpret(x[200:202], **kw)
    # "auto" cannot draw the input's maps through such a model and says why (it gave
    # autograd's "One of the differentiated Tensors does not require grad")
    with pytest.warns(UserWarning, match="runs the split layer with gradients off"):
        assert with_head.heatmap_resolution_.heatmap_layer is None
    maps = with_head.attribute(x[200:202], n_boundaries=12)
    assert maps.shape == (2, 1, *model.features(x[:1]).shape[2:])


class _ChangesItsInput(nn.Module):
    """conv -> ReLU(inplace) -> linear, after ``first`` applied to the input itself."""

    def __init__(self, first: Callable) -> None:
        super().__init__()
        self.first = first
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)  # in place on an inner tensor: fine
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.relu(self.conv(self.first(x))))


@pytest.mark.parametrize(
    "first",
    [lambda t: t.mul_(2), nn.LeakyReLU(0.1, inplace=True), lambda t: t.sub_(t.mean())],
    ids=["mul_", "LeakyReLU(inplace)", "sub_"],
)
def test_a_model_that_changes_its_input_in_place_is_refused(first):
    """fit changed the user's references (and the search would run each seed on changed
    values), with only a misleading not-a-cut warning; now a ValueError naming
    forward_func, the references left as they were."""
    torch.manual_seed(0)
    model = _ChangesItsInput(first).eval()
    x = torch.randn(60, 1, 8, 8)
    before = x.clone()
    with pytest.raises(ValueError, match=r"^forward_func changed its input in place .*x\.clone"):
        RepresentativeInterpretation(model, model.relu).fit(x, progress=False)
    assert torch.equal(x, before)
    # the way out the message gives works, and in-place operations inside the model are fine
    wrapped = RepresentativeInterpretation(lambda t: model(t.clone()), model.relu)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a plain callable: modes not managed
        wrapped.fit(x, progress=False)
    assert torch.equal(x, before)
    plain = _ChangesItsInput(nn.Identity()).eval()
    RepresentativeInterpretation(plain, plain.relu).fit(x, progress=False)
