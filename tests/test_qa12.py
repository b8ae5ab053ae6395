"""Lead's round after breaker round 4: labels from NumPy as targets, booleans that must be
booleans, an empty batch to ``transform``."""

import numpy as np
import pytest
import torch

from captum_repinterp import RepresentativeInterpretation

pytestmark = pytest.mark.usefixtures("one_thread")

NB = {"n_boundaries": 12, "heatmap_layer": None}


@pytest.fixture(scope="module")
def fitted(tiny):
    model, x = tiny
    return RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False), x


@pytest.mark.parametrize(
    "as_numpy",
    [
        lambda t: np.int64(t[0]),
        lambda t: np.array(t, dtype=np.int32),
        lambda t: [np.int64(v) for v in t],
        lambda t: [torch.tensor(v) for v in t],
    ],
    ids=["np.int64", "int32 array", "list of np.int64", "list of 0-d tensors"],
)
def test_labels_from_arrays_are_targets_like_ints(fitted, as_numpy):
    ri, x = fitted
    labels = [2, 1]
    given = as_numpy(labels)
    want = labels[0] if isinstance(given, np.integer) else labels
    assert torch.equal(
        ri.attribute(x[200:202], target=given, **NB), ri.attribute(x[200:202], target=want, **NB)
    )
    regions = ri.interpret(x[200:202], target=given, **NB)
    assert [r.target for r in regions] == ([want] * 2 if isinstance(want, int) else want)


def test_a_float_array_target_is_refused(fitted):
    ri, x = fitted
    with pytest.raises(TypeError, match="target must be an integer array"):
        ri.attribute(x[200:202], target=np.array([1.0, 2.0]), **NB)


@pytest.mark.parametrize("name", ["relu_attributions", "attr_dim_summation", "progress"])
def test_attribute_flags_must_be_bools(fitted, name):
    ri, x = fitted
    with pytest.raises(TypeError, match=f"{name} must be True or False, got 'no'"):
        ri.attribute(x[200:201], **{name: "no"}, **NB)
    # NumPy booleans are booleans
    assert ri.attribute(x[200:201], **{name: np.bool_(True)}, **NB).shape[0] == 1


@pytest.mark.parametrize("name", ["relu_attributions", "attr_dim_summation"])
def test_interpretation_heatmap_flags_must_be_bools(fitted, name):
    ri, x = fitted
    region = ri.interpret(x[200:201], **NB)  # one image: one Interpretation
    with pytest.raises(TypeError, match=f"{name} must be True or False, got 'no'"):
        region.heatmap(x[200:202], **{name: "no"})
    with pytest.raises(TypeError, match=f"{name} must be True or False, got 1"):
        region.heatmap_from_activations((model_layer_output(ri, x[200:202]),), **{name: 1})
    flag = {name: np.bool_(False)}
    assert torch.equal(
        region.heatmap(x[200:202], **flag), region.heatmap(x[200:202], **{name: False})
    )


def model_layer_output(ri, images):
    out = []
    handle = ri.layer.register_forward_hook(lambda m, i, o: out.append(o.detach()))
    try:
        with torch.no_grad():
            ri.forward_func(images)
    finally:
        handle.remove()
    return out[0]


def test_fit_and_transform_flags_must_be_bools(tiny, fitted):
    model, x = tiny
    ri, _ = fitted
    fresh = RepresentativeInterpretation(model, model.features[-1])
    with pytest.raises(TypeError, match="progress must be True or False, got 0"):
        fresh.fit(x[:50], progress=0)
    with pytest.raises(TypeError, match="append must be True or False"):
        fresh.fit(x[:50], progress=False, append="yes")
    with pytest.raises(TypeError, match="progress must be True or False"):
        ri.transform(x[:3], progress=None)
    with pytest.raises(TypeError, match="progress must be True or False"):
        ri.interpret(x[200:201], progress="off", **NB)


def test_transform_of_an_empty_batch_is_empty(fitted):
    ri, x = fitted
    features, predictions = ri.transform(x[:0])
    assert features.shape == (0, ri.features_.shape[1]) and features.dtype == torch.float32
    assert predictions.shape == (0,) and predictions.dtype == torch.int64
    # and the rows it gives for a non-empty batch are fit's
    feats, preds = ri.transform(x[:5])
    assert torch.allclose(feats, ri.features_[:5], atol=1e-5) and torch.equal(
        preds, ri.predictions_[:5]
    )


def test_audit_refuses_empty_images_and_empty_heldout(fitted):
    from captum_repinterp.auditing import audit

    ri, x = fitted
    with pytest.raises(ValueError, match="^images: empty"):
        audit(ri, x[200:200], **NB)
    with pytest.raises(ValueError, match="^heldout: empty"):
        audit(ri, x[200:260], target=0, heldout=x[260:260], **NB)


def _tied_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """Logits (x0, x1, -x0 - x1) of ReLU(x): classes 0 and 1 tie on the line x0 = x1."""
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 3)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        model[1].bias.zero_()
    refs = torch.rand(200, 2, generator=torch.Generator().manual_seed(0)) * 2
    return model, refs


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


def test_a_kinked_head_at_the_same_scale_is_not_taken_for_affine():
    model, refs = _cancelling(kinked=True)
    with torch.no_grad():
        on = model[1][1](model[1][0](refs)) > 0
    assert on.any(0).all() and (~on).any(0).all()  # every unit crosses its kink
    ri = RepresentativeInterpretation(model, model[0]).fit(refs, progress=False)
    assert ri.affine_ is None


def test_a_dataset_given_to_contains_points_at_the_batched_route(fitted):
    from torch.utils.data import TensorDataset

    ri, x = fitted
    region = ri.interpret(x[200:201], **NB)
    data = TensorDataset(x[:50])
    with pytest.raises(TypeError, match=r"ri.transform\(data\).*contains_features"):
        region.contains(data)
    # the route it names gives contains' answers
    features, _ = ri.transform(data)
    assert torch.equal(region.contains_features(features), region.contains(x[:50]))
