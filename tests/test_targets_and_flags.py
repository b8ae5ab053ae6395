"""Arguments given in another type: labels from NumPy arrays as targets, flags that must
be booleans (NumPy booleans are), an empty batch to ``transform`` and to the audit, and a
Dataset given to ``contains``."""

from __future__ import annotations

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
