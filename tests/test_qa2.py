"""Second round of misuse found by hand: each test is a call that used to go wrong."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_repinterp import Interpretation, NotFittedError, RepresentativeInterpretation
from captum_repinterp.auditing import audit
from captum_repinterp.visualization import compare_methods, plot_audit, plot_region

NB = {"n_boundaries": 12, "bisection_steps": 12}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(tiny, one_thread):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    return ri, model, x


# ---------------------------------------------------------------------- global state
def test_fit_on_a_dataset_leaves_the_global_rng_alone(tiny):
    """fit wraps a Dataset in its own DataLoader; iterating it drew a base seed from the
    global generator, so fitting changed the random numbers the user gets next."""
    model, x = tiny
    dataset = TensorDataset(x[:200])
    state = torch.get_rng_state()
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(dataset, progress=False)
    ri.transform(dataset)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_random_state_out_of_range_names_it(fitted, seed):
    ri, _, x = fitted
    with pytest.raises(ValueError, match="random_state"):
        ri.interpret(x[200:201], random_state=seed, **NB)


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


# ---------------------------------------------------------------------- saved regions
def test_interpretations_compare_by_value(fitted, tmp_path):
    ri, _, x = fitted
    region = ri.interpret(x[200:201], heatmap_rule="region-score", **NB)
    region.save(tmp_path / "r.npz")
    loaded = Interpretation.load(tmp_path / "r.npz")
    assert loaded == region and region == copy.deepcopy(region)
    other = ri.interpret(x[201:202], **NB)
    assert region != other and region != "region"
    changed = copy.deepcopy(region)
    changed.members = changed.members.flip(0)
    assert changed != region


def test_load_with_the_explainer_of_another_layer_is_refused(fitted, tmp_path):
    ri, model, x = fitted
    ri.interpret(x[200:201], **NB).save(tmp_path / "r.npz")
    other = RepresentativeInterpretation(model, model.features[0]).fit(x[:200], progress=False)
    with pytest.raises(ValueError, match="explainer"):
        Interpretation.load(tmp_path / "r.npz", explainer=other)


def test_load_with_a_wrong_or_unfitted_explainer_names_it(fitted, tmp_path):
    ri, model, x = fitted
    ri.interpret(x[200:201], **NB).save(tmp_path / "r.npz")
    for wrong in (model, "ri"):
        with pytest.raises(TypeError, match="explainer"):
            Interpretation.load(tmp_path / "r.npz", explainer=wrong)
    with pytest.raises(NotFittedError):
        Interpretation.load(
            tmp_path / "r.npz", explainer=RepresentativeInterpretation(model, model.features[-1])
        )
    # the fitted explainer and its reader both work
    a = Interpretation.load(tmp_path / "r.npz", explainer=ri).contains(x[:20])
    b = Interpretation.load(tmp_path / "r.npz", explainer=ri.reader_).contains(x[:20])
    assert torch.equal(a, b)


# ---------------------------------------------------------------------- audit
@pytest.mark.parametrize("seed", [-1, 2**32])
def test_audit_random_state_out_of_range_fails_first(fitted, seed):
    ri, _, x = fitted
    with pytest.raises(ValueError, match="^random_state"):  # not scikit-learn's, later
        audit(ri, x[200:260], target=0, random_state=seed, **NB)


def test_audit_names_images_and_heldout(fitted):
    ri, _, x = fitted
    with pytest.raises(ValueError, match="^images"):
        audit(ri, x[200:260, 0], target=0, **NB)
    with pytest.raises(ValueError, match="^images"):
        audit(ri, x[200:200], **NB)
    with pytest.raises(ValueError, match="^heldout"):
        audit(ri, x[200:260], target=0, heldout=x[260:270] * float("nan"), **NB)


def test_audit_refuses_heatmap_layer_before_any_region(fitted):
    ri, model, x = fitted
    with pytest.raises(ValueError, match="^heatmap_layer"):
        audit(ri, x[200:260], target=0, heatmap_layer=model.features[0], **NB)


def test_audit_features_of_the_wrong_type_are_named(fitted):
    ri, _, x = fitted
    with pytest.raises(TypeError, match="features"):
        audit(ri, x[:200], features=(ri.features_.numpy(), ri.predictions_), **NB)


# ---------------------------------------------------------------------- figures
def test_plot_region_checks_the_seed_and_labels(fitted):
    ri, _, x = fitted
    region = ri.interpret(x[200:201], **NB)
    with pytest.raises(ValueError, match="seed_image"):
        plot_region(region, x[200:202], x[:200])  # two seeds
    with pytest.raises(ValueError, match="seed_image"):
        plot_region(region, x[200, 0, :6], x[:200])  # not shaped like the references
    with pytest.raises(ValueError, match="reference_labels"):
        plot_region(region, x[200], x[:200], reference_labels=torch.zeros(5, dtype=torch.long))


def test_plot_audit_names_its_arguments(fitted):
    ri, _, x = fitted
    result = audit(ri, x[200:260], target=0, subgroup_by="none", **NB)
    with pytest.raises(TypeError, match="class_audit.*result\\[c\\]"):
        plot_audit(result, x[200:260])
    with pytest.raises(ValueError, match="images"):
        plot_audit(result[0], x[200:203])


def test_compare_methods_names_badly_shaped_images(fitted):
    ri, model, x = fitted
    with pytest.raises(ValueError, match="images"):
        compare_methods(model, model.features[-1], ri, x[200], **NB)


# ---------------------------------------------------------------------- command line
@pytest.mark.parametrize("command", ["report", "demo", "evaluate"])
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_cli_random_state_out_of_range_is_a_usage_error(capsys, command, seed):
    """The report's audit hands the seed to scikit-learn, which takes [0, 2**32): a
    seed outside failed with a traceback after the model had run."""
    from captum_repinterp.cli import main

    with pytest.raises(SystemExit) as info:
        main([command, "--random-state", seed])
    assert info.value.code == 2
    assert "--random-state/--seed: must be an int in [0, 2**32)" in capsys.readouterr().err


# ---------------------------------------------------------------------- small API edges
def test_similar_takes_numpy_ints_and_names_k(fitted):
    import numpy as np

    ri, _, x = fitted
    region = ri.interpret(x[200:201], **NB)
    assert torch.equal(region.similar(np.int64(3)), region.members[:3])
    with pytest.raises(TypeError, match="k must be"):
        region.similar(2.0)
    with pytest.raises(ValueError, match="k must be"):
        region.similar(-1)


def test_evaluate_features_names_predictions(fitted):
    ri, _, x = fitted
    region = ri.interpret(x[200:201], **NB)
    with pytest.raises(TypeError, match="predictions"):
        region.evaluate_features(ri.features_, ri.predictions_.tolist())


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
    # at the input (the default) the batched backward pass rounds differently
    torch.testing.assert_close(good, torch.cat(one_by_one), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="^additional_forward_args"):
        ri.attribute(x[200:204], additional_forward_args=(scale[200:203],), **NB)
    with pytest.raises(ValueError, match="^additional_forward_args"):
        ri.transform(x[:8], additional_forward_args=(scale[:3],), batch_size=1)


# ---------------------------------------------------------------------- warnings
def _warned_here(call, category) -> list[str]:
    """Files the warnings of ``category`` given by ``call()`` point at; "helper" for
    this function's own line (one frame too far up from the lambda)."""
    import inspect
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        call()
    return [
        "helper" if (w.filename, w.lineno) == (__file__, line) else w.filename
        for w in caught
        if issubclass(w.category, category)
    ]


def test_training_mode_warning_points_at_the_users_call(tiny):
    """It pointed at the package's own ``with eval_mode(...)`` lines (reader.py,
    references.py), so Python's default filter showed it once per session."""
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    region = ri.interpret(x[200:201], **NB)
    model.train()
    try:
        calls = {
            "fit": lambda: RepresentativeInterpretation(model, model.features[-1]).fit(
                x[:200], progress=False
            ),
            "interpret": lambda: ri.interpret(x[200:201], **NB),
            "attribute": lambda: ri.attribute(x[200:201], **NB),
            "contains": lambda: region.contains(x[:4]),
            "heatmap": lambda: region.heatmap(x[:4]),
        }
        for name, call in calls.items():
            assert _warned_here(call, UserWarning) == [__file__], name
    finally:
        model.eval()


def _tanh_head(model):
    curved = copy.deepcopy(model)
    curved.head[2] = nn.Tanh()
    return curved.eval()


def test_curved_head_warning_points_at_the_users_call(tiny):
    from captum_repinterp.layers import NonPiecewiseLinearWarning, find_layer

    model, x = tiny
    curved = _tanh_head(model)
    assert _warned_here(lambda: find_layer(curved, x[:1]), NonPiecewiseLinearWarning) == [__file__]
    ri = RepresentativeInterpretation(curved, curved.features[-1])
    assert _warned_here(lambda: ri.fit(x[:200], progress=False), NonPiecewiseLinearWarning) == [
        __file__
    ]
    assert _warned_here(lambda: ri.attribute(x[200:201], **NB), NonPiecewiseLinearWarning) == [
        __file__
    ]


def test_curved_head_warning_of_interpret_points_at_the_users_call(tiny):
    from captum_repinterp.layers import NonPiecewiseLinearWarning

    model, x = tiny
    curved = _tanh_head(model)
    ri = RepresentativeInterpretation(curved, curved.features[-1]).fit(x[:200], progress=False)
    assert _warned_here(lambda: ri.interpret(x[200:201], **NB), NonPiecewiseLinearWarning) == [
        __file__
    ]


def test_no_boundary_warning_points_at_the_users_call(tiny):
    from captum_repinterp.region import NoBoundaryWarning

    model, x = tiny
    keep = model(x[:200]).argmax(1) <= 1  # no reference of class 3
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200][keep], progress=False)
    assert _warned_here(lambda: ri.interpret(x[200:201], target=3, **NB), NoBoundaryWarning) == [
        __file__
    ]


def test_numpy_integers_are_ints(tiny):
    """``batch_size must be a positive int, got np.int64(64)``: NumPy integers (from a
    config or np.arange) were refused with a message that contradicted itself."""
    import numpy as np

    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    ri.fit(x[:200], batch_size=np.int64(64), progress=False)
    a = ri.attribute(x[200:202], n_boundaries=np.int64(12), bisection_steps=np.int32(12))
    assert torch.equal(a, ri.attribute(x[200:202], **NB))


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


def test_transform_warns_about_training_mode_like_the_other_calls(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    model.train()
    try:
        assert _warned_here(lambda: ri.transform(x[:4]), UserWarning) == [__file__]
    finally:
        model.eval()
