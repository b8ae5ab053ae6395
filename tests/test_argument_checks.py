"""Bad inputs get a ValueError or TypeError naming the argument: seeds, images, extra
forward arguments, ``random_state``, ``k``, predictions, the audit's and the figures'
arguments, ``find_layer``'s example input, labels given with the references, tensors on the
meta device, a layer read at its input through keywords or non-tensors, an
interpretation's reader set by hand to another layer; and NumPy integers are ints."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import fit as _fit
from conftest import refit_last_linear
from torch import nn

from captum_repinterp import (
    RepresentativeInterpretation,
    audit,
    find_layer,
)
from captum_repinterp.cuts import check_cut
from captum_repinterp.visualization import compare_methods, plot_audit, plot_region

NB = {"n_boundaries": 12, "bisection_steps": 12}

RANDOM_STATE = {"random_state": 0}


# ------------------------ seeds, random_state, k, predictions, extra arguments
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_random_state_out_of_range_names_it(last_block_fit, seed):
    ri, _, x = last_block_fit
    with pytest.raises(ValueError, match="random_state"):
        ri.interpret(x[200:201], random_state=seed, **NB)


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("heatmap_rule", ["elementwise"], ValueError),
        ("heatmap_rule", {"elementwise": 1}, ValueError),
        ("attribute_to_layer_input", 0, TypeError),
        ("attribute_to_layer_input", "no", TypeError),
    ],
)
def test_options_of_another_type_are_named(last_block_fit, name, value, error):
    """An unhashable heatmap_rule is named as other unknown rules are (it failed in the
    registry's lookup); attribute_to_layer_input must be a bool as in fit (0 was taken
    as False, "no" was compared with fit's value)."""
    ri, _, x = last_block_fit
    with pytest.raises(error, match=name):
        ri.attribute(x[200:201], **{name: value}, **NB)
    if name == "heatmap_rule":
        with pytest.raises(error, match=name):
            ri.interpret(x[200:201], **{name: value}, **NB)


@pytest.mark.usefixtures("one_thread")
def test_similar_takes_numpy_ints_and_names_k(last_block_fit):
    import numpy as np

    ri, _, x = last_block_fit
    region = ri.interpret(x[200:201], **NB)
    assert torch.equal(region.similar(np.int64(3)), region.members[:3])
    with pytest.raises(TypeError, match="k must be"):
        region.similar(2.0)
    with pytest.raises(ValueError, match="k must be"):
        region.similar(-1)


@pytest.mark.usefixtures("one_thread")
def test_evaluate_features_names_predictions(last_block_fit):
    ri, _, x = last_block_fit
    region = ri.interpret(x[200:201], **NB)
    with pytest.raises(TypeError, match="predictions"):
        region.evaluate_features(ri.features_, ri.predictions_.tolist())


@pytest.mark.usefixtures("one_thread")
def test_extra_argument_of_another_length_is_named(tiny):
    """A per-example extra tensor with too few rows was broadcast against one seed and
    failed deep inside with "HookHead needs the inputs of exactly one example"."""
    model, x = tiny

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.inner(z * scale.view(-1, 1, 1, 1))

    scaled = Scaled().eval()
    scale = torch.linspace(0.5, 1.5, 300)
    ri = RepresentativeInterpretation(scaled, model.features[-1])
    ri.fit(x[:200], additional_forward_args=(scale[:200],), progress=False, cut_check="off")
    good = ri.attribute(x[200:204], additional_forward_args=(scale[200:204],), **NB)
    one_by_one = [
        ri.attribute(x[i : i + 1], additional_forward_args=(scale[i : i + 1],), **NB)
        for i in range(200, 204)
    ]
    assert torch.equal(good, torch.cat(one_by_one))  # each image's map drawn alone
    with pytest.raises(ValueError, match="^additional_forward_args"):
        ri.attribute(x[200:204], additional_forward_args=(scale[200:203],), **NB)
    with pytest.raises(ValueError, match="^additional_forward_args"):
        ri.transform(x[:8], additional_forward_args=(scale[:3],), batch_size=1)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("rule", ["channel-members", "region-score"])
def test_an_extra_tensor_that_is_not_per_example_is_passed_whole(tiny, rule):
    """An extra tensor of another length than the batch is passed whole (fit's rule, and
    LayerGradCam's), also where the model runs a seed's batch of points: it was
    repeated once per point (Captum's expansion, for per-example tensors) and the model
    failed with a size mismatch deep in the boundary search."""
    model, x = tiny

    class ClassBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return self.inner(z) + bias  # one value per class, shared by the batch

    net = ClassBias().eval()
    bias = torch.tensor([0.0, 0.3, -0.3, 0.1])
    ri = RepresentativeInterpretation(net, model.features[-1])
    ri.fit(x[:200], additional_forward_args=(bias,), progress=False)
    opts = {"heatmap_layer": None, "heatmap_rule": rule, **NB}
    maps = ri.attribute(x[200:203], additional_forward_args=(bias,), **opts)
    one = [
        ri.attribute(x[i : i + 1], additional_forward_args=(bias,), **opts) for i in range(200, 203)
    ]
    assert torch.equal(maps, torch.cat(one))
    regions = ri.interpret(x[200:203], additional_forward_args=(bias,), **opts)
    with torch.no_grad():
        assert [r.target for r in regions] == net(x[200:203], bias).argmax(1).tolist()


@pytest.mark.usefixtures("one_thread")
def test_numpy_integers_are_ints(tiny):
    """``batch_size must be a positive int, got np.int64(64)``: NumPy integers (from a
    config or np.arange) were refused with a message that contradicted itself."""
    import numpy as np

    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    ri.fit(x[:200], batch_size=np.int64(64), progress=False)
    a = ri.attribute(x[200:202], n_boundaries=np.int64(12), bisection_steps=np.int32(12))
    assert torch.equal(a, ri.attribute(x[200:202], **NB))


# ----------------------------------------------------------------------- audit
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("seed", [-1, 2**32])
def test_audit_random_state_out_of_range_fails_first(last_block_fit, seed):
    ri, _, x = last_block_fit
    with pytest.raises(ValueError, match="^random_state"):  # not scikit-learn's, later
        audit(ri, x[200:260], target=0, random_state=seed, **NB)


@pytest.mark.usefixtures("one_thread")
def test_audit_names_images_and_heldout(last_block_fit):
    ri, _, x = last_block_fit
    with pytest.raises(ValueError, match="^images"):
        audit(ri, x[200:260, 0], target=0, **NB)
    with pytest.raises(ValueError, match="^images"):
        audit(ri, x[200:200], **NB)
    with pytest.raises(ValueError, match="^heldout"):
        audit(ri, x[200:260], target=0, heldout=x[260:270] * float("nan"), **NB)


@pytest.mark.usefixtures("one_thread")
def test_audit_refuses_heatmap_layer_before_any_region(last_block_fit):
    ri, model, x = last_block_fit
    with pytest.raises(ValueError, match="^heatmap_layer"):
        audit(ri, x[200:260], target=0, heatmap_layer=model.features[0], **NB)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("kwargs", "err", "word"),
    [
        ({"n_boundaries": 0}, ValueError, "^n_boundaries"),
        ({"heatmap_rule": "pixels"}, ValueError, "^heatmap_rule"),
        ({"delta": -1}, ValueError, "^delta"),
        ({"refine": "all"}, ValueError, "^refine"),
        ({"n_boundary": 10}, TypeError, r"^audit\(\) got an unexpected keyword argument"),
        ({"heldout": [1, 2]}, TypeError, "^heldout"),
        ({"target": "cat"}, TypeError, "^target"),
        ({"target": None, "heldout": 3}, TypeError, "^heldout"),
    ],
)
def test_audit_checks_interpret_options_before_reading_the_images(
    last_block_fit, kwargs, err, word
):
    """The options passed on to ``interpret`` are checked before the images are read
    (they were checked at the first region, after a forward pass over every image, and a
    misspelt one was named as ``interpret()``'s), as are the types of ``target`` and
    ``heldout``; under ``torch.inference_mode()`` audit is refused first too."""
    ri, model, x = last_block_fit
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(err, match=word):
            audit(ri, x[200:260], **{"target": 0, **kwargs})
        with torch.inference_mode(), pytest.raises(RuntimeError, match="^audit takes gradients"):
            audit(ri, x[200:260], target=0, **NB)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.usefixtures("one_thread")
def test_audit_features_of_the_wrong_type_are_named(last_block_fit):
    ri, _, x = last_block_fit
    with pytest.raises(TypeError, match="features"):
        audit(ri, x[:200], features=(ri.features_.numpy(), ri.predictions_), **NB)


# --------------------------------------------------------------------- figures
@pytest.mark.usefixtures("one_thread")
def test_plot_region_checks_the_seed_and_labels(last_block_fit):
    ri, _, x = last_block_fit
    region = ri.interpret(x[200:201], **NB)
    with pytest.raises(ValueError, match="seed_image"):
        plot_region(region, x[200:202], x[:200])  # two seeds
    with pytest.raises(ValueError, match="seed_image"):
        plot_region(region, x[200, 0, :6], x[:200])  # not shaped like the references
    with pytest.raises(ValueError, match="reference_labels"):
        plot_region(region, x[200], x[:200], reference_labels=torch.zeros(5, dtype=torch.long))


@pytest.mark.usefixtures("one_thread")
def test_plot_audit_names_its_arguments(last_block_fit):
    ri, _, x = last_block_fit
    result = audit(ri, x[200:260], target=0, subgroup_by="none", **NB)
    with pytest.raises(TypeError, match="class_audit.*result\\[c\\]"):
        plot_audit(result, x[200:260])
    with pytest.raises(ValueError, match="images"):
        plot_audit(result[0], x[200:203])


@pytest.mark.usefixtures("one_thread")
def test_compare_methods_names_badly_shaped_images(last_block_fit):
    ri, model, x = last_block_fit
    with pytest.raises(ValueError, match="images"):
        compare_methods(model, model.features[-1], ri, x[200], **NB)


# ---------------------- forward arguments, find_layer, references, image sizes
class _Scaled(torch.nn.Module):
    """A model with a second forward argument."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, scale):
        return self.model(x * scale)


def test_wrong_additional_forward_args_name_the_argument(tiny):
    model, x = tiny
    refs, seeds = x[:80], x[200:202]
    ri = _fit(model, model.features, refs)
    with pytest.raises(TypeError, match="^additional_forward_args: "):
        ri.attribute(seeds, additional_forward_args=(2.0,), **RANDOM_STATE)
    with pytest.raises(TypeError, match="^additional_forward_args: "):
        _fit(model, model.features, refs, additional_forward_args=(2.0,))
    scaled = _Scaled(model).eval()
    ri2 = _fit(scaled, model.features, refs, additional_forward_args=(1.0,))
    assert torch.equal(ri2.predictions_, ri.predictions_)
    with pytest.raises(TypeError, match="^additional_forward_args: "):
        ri2.attribute(seeds, **RANDOM_STATE)
    with pytest.raises(TypeError, match="^additional_forward_args: "):
        ri2.interpret(seeds, additional_forward_args=(1.0, 2.0), **RANDOM_STATE)
    with pytest.raises(TypeError, match="^additional_forward_args: "):
        _fit(scaled, model.features, refs)


def test_a_per_example_argument_of_another_length_says_so(tiny):
    """A per-example tensor argument with 3 rows for 2 seeds is passed whole (Captum
    slices only tensors with one row per example) and broadcast against each seed; the
    error said "for 1 example(s) the layer and the model gave [3] rows", which named
    neither the tensor's length nor why 1. It now gives both."""
    model, x = tiny
    scaled = _Scaled(model).eval()
    refs = x[:80]
    ri = _fit(scaled, model.features, refs, additional_forward_args=(torch.ones(80, 1, 1, 1),))
    with pytest.raises(ValueError, match=r"^additional_forward_args: a tensor of \[3\] rows"):
        ri.interpret(x[200:202], additional_forward_args=(torch.ones(3, 1, 1, 1),), **RANDOM_STATE)
    ok = ri.interpret(x[200:202], additional_forward_args=(torch.ones(2, 1, 1, 1),), **RANDOM_STATE)
    assert len(ok) == 2


def test_find_layer_bad_example_input_names_it(tiny):
    from captum_repinterp import find_layer

    model, x = tiny
    assert find_layer(model, x[:1]) is model.features
    for bad in (x[0], x[:1, :, :7, :7], torch.randn(1, 3, 12, 12)):
        with pytest.raises(ValueError, match="^example_input: "):
            find_layer(model, bad)
    with pytest.raises(TypeError, match="^example_input: "):
        find_layer(model, (x[:1] * 100).to(torch.uint8))
    with pytest.raises(ValueError, match="^example_input: "):
        find_layer(model, x[:0])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_find_layer_on_one_image_without_its_batch_dimension_says_so(tiny):
    from captum_repinterp import find_layer

    model, x = tiny
    with pytest.raises(ValueError, match=r"shape \(1, 12, 12\).*add the batch dimension"):
        find_layer(model, x[0])


def test_labels_given_with_the_references_get_a_clear_error(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    labels = torch.arange(80) % 4
    with pytest.raises(TypeError, match=r"references: a tuple of 2 tensors .* labels"):
        ri.fit((x[:80], labels), progress=False)
    with pytest.raises(ValueError, match=r"batch_size must be .* a Tensor of shape \(80,\)"):
        ri.fit(x[:80], labels, progress=False)


class _Pooled(torch.nn.Module):
    """Any image size runs (global average pooling after the split layer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_a_wrong_image_size_names_the_input_shapes(tiny):
    _, x = tiny
    model = _Pooled().eval()
    with torch.no_grad():  # spread the predictions over the classes
        h = model.head[:2](model.features(x[:60]))
        y = torch.nn.functional.one_hot(torch.arange(60) % 3, 3).float()
        sol = torch.linalg.lstsq(torch.cat([h, torch.ones(60, 1)], 1), y).solution
        model.head[2].weight.copy_(sol[:-1].T)
        model.head[2].bias.copy_(sol[-1])
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:60], progress=False)
    small = torch.nn.functional.interpolate(x[:2], size=(8, 8))
    with pytest.raises(ValueError, match=r"examples of shape \(1, 8, 8\).*\(1, 12, 12\)"):
        ri.interpret(small[:1], heatmap_layer=None)


# ------------------------------------- meta tensors, layer inputs, readers


@pytest.fixture(scope="module")
def features_fit(tiny, one_thread):
    """The tiny CNN split after its whole ``features`` block, fitted on 60 images."""
    model, x = tiny
    return RepresentativeInterpretation(model, model.features).fit(x[:60], progress=False)


def test_meta_tensors_are_refused_naming_the_argument(tiny, features_fit):
    """A tensor on the meta device has a shape and no values: every entry point says so,
    naming its argument (the NaN check raised torch's "Tensor.item() cannot be called on
    meta tensors")."""
    model, x = tiny
    meta = x[:2].to("meta")
    with pytest.raises(ValueError, match="references: a tensor on the meta device"):
        RepresentativeInterpretation(model, model.features).fit(meta, progress=False)
    for call in (features_fit.attribute, features_fit.interpret, features_fit.transform):
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


def test_a_reader_of_another_layout_is_refused_even_with_as_many_features(tiny, features_fit):
    """``reader`` is a documented attribute: set to the reader of another model's layer
    shaped 2 x 12 x 12 (288 features, as many as the tiny CNN's 8 x 6 x 6), contains,
    distance and heatmap reshaped that layer's tensors into this layout and answered;
    load refused such an explainer, a reader set by hand was not checked."""
    model, x = tiny
    region = features_fit.interpret(x[60:61], n_boundaries=10)
    other = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4)
    ).eval()
    with torch.no_grad():
        refit_last_linear(other[-1], other[:-1](x[:40]))
    ri = RepresentativeInterpretation(other, other[1]).fit(x[:40], progress=False)
    assert ri.layout_.dim == region.layout.dim and ri.layout_ != region.layout
    region.reader = ri.reader_
    for call in (region.contains, region.distance, region.heatmap):
        with pytest.raises(ValueError, match="reader: its layer gives tensors shaped"):
            call(x[:2])
    region.reader = features_fit.reader_
    assert region.contains(x[60:61]).tolist() == [True]


@pytest.mark.usefixtures("one_thread")
def test_heatmap_from_activations_checks_the_activations(last_block_fit):
    """A bare tensor of the split layer's outputs was iterated over its images, each
    read as a batch: the maps of 2 images came back as one 8 x 1 x 6 x 6 map of nobody;
    another layer's outputs ended in torch's size mismatch. A tensor now stands for a
    tuple of one (the same maps as the tuple), other shapes are refused naming
    ``activations``."""
    ri, model, x = last_block_fit
    region = ri.interpret(x[200:201], n_boundaries=10, heatmap_layer=None)
    with torch.no_grad():
        acts = model.features(x[:2])
    (want,) = region.heatmap_from_activations((acts,))
    assert want.shape == (2, 1, 6, 6)
    (got,) = region.heatmap_from_activations(acts)
    assert torch.equal(got, want)
    assert torch.allclose(region.heatmap(x[:2]), want, atol=1e-6)  # one image a pass
    with torch.no_grad():
        first = model.features[0](x[:2])  # 6 x 6 x 6: another layer
    for bad in ((first,), (acts, acts), (acts[0],)):
        with pytest.raises(ValueError, match="activations: shaped"):
            region.heatmap_from_activations(bad)
    with pytest.raises(TypeError, match="activations must be a tensor or a tuple"):
        region.heatmap_from_activations(acts.numpy())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("lengths", [(4,), (4, 3), (2,)])
def test_the_cut_check_tells_a_shared_extra_tensor_from_a_per_example_one(tiny, lengths):
    """The cut check runs four references and took a shared extra tensor of 4 entries
    (one value per class) for one row per example, then warned that it entered the
    model after the layer. It now runs a number of references no shared tensor's
    length equals; a real bypass (a per-example tensor added to the logits) is still
    caught."""
    model, x = tiny

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, z: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
            out = self.inner(z)
            # shared by the batch, order-dependent (a permutation of its entries shows)
            return out + sum((e * torch.arange(len(e))).sum() * 0.01 for e in extra)

    shared = tuple(torch.linspace(-1, 1, n) for n in lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RepresentativeInterpretation(Shared().eval(), model.features[-1]).fit(
            x[:200], additional_forward_args=shared, progress=False
        )

    class Bypass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, z: torch.Tensor, shift: torch.Tensor, bias: torch.Tensor):
            return self.inner(z) + shift[:, None] + bias

    shift = torch.randn(200)  # per example, enters after the layer: not a cut
    with pytest.raises(ValueError, match="not a cut"):
        RepresentativeInterpretation(Bypass().eval(), model.features[-1]).fit(
            x[:200], additional_forward_args=(shift, torch.zeros(4)), progress=False
        )
