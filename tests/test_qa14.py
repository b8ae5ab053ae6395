"""Breaker round 6: tensors without values, layers read at their input, models that mix
the examples of a batch, integer references. Each test is a call that used to go wrong."""

import warnings

import pytest
import torch
from torch import nn

from captum_repinterp import RepresentativeInterpretation, find_layer
from captum_repinterp.cuts import check_cut


@pytest.fixture(scope="module")
def fitted(tiny, one_thread):
    model, x = tiny
    return RepresentativeInterpretation(model, model.features).fit(x[:60], progress=False)


def test_meta_tensors_are_refused_naming_the_argument(tiny, fitted):
    """A tensor on the meta device has a shape and no values: every entry point says so,
    naming its argument (the NaN check raised torch's "Tensor.item() cannot be called on
    meta tensors")."""
    model, x = tiny
    meta = x[:2].to("meta")
    with pytest.raises(ValueError, match="references: a tensor on the meta device"):
        RepresentativeInterpretation(model, model.features).fit(meta, progress=False)
    for call in (fitted.attribute, fitted.interpret, fitted.transform):
        with pytest.raises(ValueError, match="inputs: a tensor on the meta device"):
            call(meta)
    with pytest.raises(ValueError, match="example_input: a tensor on the meta device"):
        find_layer(model, meta)
    with pytest.raises(ValueError, match="inputs: a tensor on the meta device"):
        check_cut(model, model.features, meta)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 1)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return torch.relu(self.conv(x)) * scale


class _CallsBlock(nn.Module):
    """Calls its block with the features as a keyword, or with an extra float."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())
        self.block = _Block()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.block(x=h) if self.how == "keyword" else self.block(h, 2.0)
        return self.head(h)


@pytest.mark.parametrize(
    ("how", "error", "says"),
    [
        ("keyword", ValueError, "called without positional arguments"),
        ("float", TypeError, "positional arguments include a float"),
    ],
)
def test_layer_input_that_cannot_be_read(tiny, one_thread, how, error, says):
    """attribute_to_layer_input=True reads the layer's positional arguments (a forward
    pre-hook does not see keywords): a layer called with its input as a keyword gave
    torch's "torch.cat(): expected a non-empty list of Tensors", one called with an
    extra float "the layer produced a float". Both name the layer and the option; at
    the layer's output the same models fit."""
    _, x = tiny
    torch.manual_seed(0)
    model = _CallsBlock(how).eval()
    with pytest.raises(error, match=f"layer: attribute_to_layer_input=True, but the .*{says}"):
        RepresentativeInterpretation(model, model.block).fit(
            x[:20], progress=False, attribute_to_layer_input=True
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random model may predict one class
        try:
            RepresentativeInterpretation(model, model.block).fit(x[:20], progress=False)
        except ValueError as exc:
            assert "single class" in str(exc)


def _spread(model: nn.Module, images: torch.Tensor) -> None:
    """Refit the model's last linear map to the tiny set's labels (``i % 4``, the images
    have class structure), so that its predictions cover the classes."""
    last = model.head[-1]
    with torch.no_grad():
        h = model.head[:-1](model.features(images))
        labels = torch.arange(images.shape[0]) % 4
        sol = torch.linalg.lstsq(
            torch.cat([h, torch.ones(len(h), 1)], 1), nn.functional.one_hot(labels, 4).float()
        ).solution
        last.weight.copy_(sol[:-1].T)
        last.bias.copy_(sol[-1])


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


def test_features_that_depend_on_the_batch_are_warned_about(tiny, one_thread):
    """With batch statistics before the layer a reference's features depend on its
    batch: fits with batch_size 40 and 8 differ, and so do one image's features read
    alone and in a batch (transform), while seeds are read one at a time. fit warned of
    nothing; it now compares the first reference alone with its row of the first batch.
    The same model with running statistics, and a fit in batches of one, get no warning."""
    _, x = tiny
    torch.manual_seed(0)
    model = _BatchStatsCNN().eval()
    refs = x[:40]
    _spread(model, refs)
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


def test_integer_references_say_why_auto_keeps_the_split_layer(one_thread):
    """uint8 references (the model scales them itself): ``heatmap_layer="auto"`` keeps
    the split layer because the input's maps need float inputs; the reason said "the
    references are not one N x C x H x W batch", which they are."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x.float() / 255 - 0.5))

    torch.manual_seed(0)
    model = Scaled().eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 8, 8), generator=gen, dtype=torch.uint8)
    with torch.no_grad():  # spread the predictions over the classes
        z = model.head[:2](model.features(images.float() / 255 - 0.5))
        model.head[2].weight.copy_(torch.randn(4, 24, generator=gen) / z.std(0).clamp_min(1e-6))
        model.head[2].bias.copy_(-(z @ model.head[2].weight.T).mean(0))
    ri = RepresentativeInterpretation(model, model.features).fit(images, progress=False)
    with pytest.warns(UserWarning, match="torch.uint8 images"):
        choice = ri.heatmap_resolution_
    assert choice.heatmap_layer is None
    assert "floating-point inputs" in choice.reason
    assert ri.attribute(images[:2]).shape == (2, 1, 8, 8)


class _JumpHead(nn.Module):
    """The tiny CNN's features, then an activation between two linear maps."""

    def __init__(self, features: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), act, nn.Linear(16, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize(
    ("act", "named"),
    [
        (nn.Threshold(0.1, 20.0), "threshold (a jump from 20 to 0.1)"),
        (nn.Hardshrink(0.3), "hardshrink (jumps at +-0.3)"),
        (nn.Threshold(0.1, 0.1), None),  # a shifted ReLU: continuous
        (nn.Softshrink(0.3), None),  # continuous
        (nn.ReLU6(), None),
    ],
)
def test_heads_that_jump_are_warned_about(tiny, one_thread, act, named):
    """A threshold whose value is not its threshold, or a hard shrink, makes the head
    piecewise linear but discontinuous: a boundary found at the jump is no linear piece
    of the logits' difference, and on such a head the regions' purity fell to 0.1-0.4
    without any warning. The trace now names the jump; continuous ones stay silent."""
    from captum_repinterp.layers import NonPiecewiseLinearWarning

    model, x = tiny
    torch.manual_seed(0)
    jumpy = _JumpHead(model.features, act).eval()
    _spread(jumpy, x[:40])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ri = RepresentativeInterpretation(jumpy, jumpy.features).fit(x[:40], progress=False)
    said = [str(w.message) for w in caught if issubclass(w.category, NonPiecewiseLinearWarning)]
    if named is None:
        assert said == [] and ri.head_nonlinear_ == ()
    else:
        assert len(said) == 1 and named in said[0]
        assert ri.head_nonlinear_ == (f"head.3 ({type(act).__name__}): {named}",)


def test_a_model_on_the_meta_device_is_refused_naming_it(tiny):
    """A model built on the meta device has no weights: fit said the references failed
    in the model ("check that references have the shape ... the model expects"), after
    moving them to the meta device; it now names forward_func and the cause."""
    import copy

    model, x = tiny
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match="forward_func: the model's parameters are on the meta"):
        RepresentativeInterpretation(meta, meta.features).fit(x[:8], progress=False)


def test_a_reader_of_another_layout_is_refused_even_with_as_many_features(tiny, fitted):
    """``reader`` is a documented attribute: set to the reader of another model's layer
    shaped 2 x 12 x 12 (288 features, as many as the tiny CNN's 8 x 6 x 6), contains,
    distance and heatmap reshaped that layer's tensors into this layout and answered;
    load refused such an explainer, a reader set by hand was not checked."""
    model, x = tiny
    region = fitted.interpret(x[60:61], n_boundaries=10)
    other = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4)
    ).eval()
    _spread_sequential(other, x[:40])
    ri = RepresentativeInterpretation(other, other[1]).fit(x[:40], progress=False)
    assert ri.layout_.dim == region.layout.dim and ri.layout_ != region.layout
    region.reader = ri.reader_
    for call in (region.contains, region.distance, region.heatmap):
        with pytest.raises(ValueError, match="reader: its layer gives tensors shaped"):
            call(x[:2])
    region.reader = fitted.reader_
    assert region.contains(x[60:61]).tolist() == [True]


def _spread_sequential(model: nn.Sequential, images: torch.Tensor) -> None:
    """Refit the last linear map of a Sequential to the tiny set's labels."""
    with torch.no_grad():
        h = model[:-1](images)
        labels = torch.arange(images.shape[0]) % 4
        sol = torch.linalg.lstsq(
            torch.cat([h, torch.ones(len(h), 1)], 1), nn.functional.one_hot(labels, 4).float()
        ).solution
        model[-1].weight.copy_(sol[:-1].T)
        model[-1].bias.copy_(sol[-1])
