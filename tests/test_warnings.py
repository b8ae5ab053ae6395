"""Warnings point at the user's call (not at the package's own lines, which Python's
default filter would show once per session): training mode, a curved head, a target
without boundaries."""

from __future__ import annotations

import copy

import pytest
from torch import nn

from captum_repinterp import RepresentativeInterpretation

NB = {"n_boundaries": 12, "bisection_steps": 12}


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_transform_warns_about_training_mode_like_the_other_calls(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    model.train()
    try:
        assert _warned_here(lambda: ri.transform(x[:4]), UserWarning) == [__file__]
    finally:
        model.eval()


def test_audit_warns_about_training_mode_once_per_call(tiny):
    """An audit runs the reader and one interpret per region: it gave the warning once
    for each of them (five times here), not once per call like the other entry points."""
    from captum_repinterp import audit

    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    images = x[200:260]
    target = int(model(images[:1]).argmax())
    model.train()
    try:
        for call in (
            lambda: audit(ri, images, target=target, max_subgroups=1, **NB),
            lambda: ri.audit(images, target=target, max_subgroups=1, **NB),
        ):
            assert _warned_here(call, UserWarning) == [__file__]
        assert all(m.training for m in model.modules())
    finally:
        model.eval()


def test_a_new_container_around_an_eval_model_is_not_training_mode(tiny):
    """``nn.DataParallel(model)``, ``nn.Sequential(model)`` and a slice ``model.head[:]``
    for ``head=`` are new containers in training mode around modules in eval mode: the
    training-mode warning came although nothing computes otherwise. Containers alone no
    longer warn; a module inside them in training mode still does."""
    import warnings

    model, x = tiny
    wrappers = {
        "DataParallel": (nn.DataParallel(model), None),
        "Sequential": (nn.Sequential(model), None),
        "sliced head": (model, model.head[:]),
    }
    for name, (wrapper, head) in wrappers.items():
        assert wrapper.training or head.training, name
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*training mode")
            ri = RepresentativeInterpretation(wrapper, model.features[-1], head=head)
            ri.fit(x[:200], progress=False).interpret(x[200:201], **NB)
    noisy = nn.Sequential(model, nn.Dropout(0.5))
    with pytest.warns(UserWarning, match="training mode"):
        RepresentativeInterpretation(noisy, model.features[-1]).fit(x[:200], progress=False)
    assert noisy.training and noisy[1].training and not model.training


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
    # and says why: there is no segment at all (it said "none of the 0 segments")
    with pytest.warns(NoBoundaryWarning, match="no reference is predicted as 3") as seen:
        ri.interpret(x[200:201], target=3, **NB)
    assert "none of the 0 segments" not in str(seen[0].message)


def test_training_warning_names_the_modules_in_training_mode(tiny):
    """A model in eval mode with some modules in training mode: the warning names them
    (it said "the model is in training mode"); the whole model still gets the old text."""
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    try:
        model.features[0].train()
        model.head[1].train()
        with pytest.warns(UserWarning, match=r"modules of the model are in training mode "
                          r"\(features\.0, head\.1\)"):  # fmt: skip
            ri.interpret(x[200:201], **NB)
        model.train()
        with pytest.warns(UserWarning, match="^the model is in training mode"):
            ri.interpret(x[200:201], **NB)
    finally:
        model.eval()
