"""Bad input gets a clear ValueError/TypeError naming the argument; no side effects.

Every public entry point (constructor, fit, attribute, interpret, transform, and the
interpretation's contains/heatmap/distance) is called with each kind of bad input; the
error must name the argument and say what was expected, never surface as a deep torch
traceback. After success and after every error, the model has no hooks left, and its
train/eval flags, requires_grad flags and .grad fields are as they were.
"""

import warnings

import pytest
import torch
from captum.attr import LayerGradCam
from torch import nn

from captum_repinterp import NotFittedError, RepresentativeInterpretation
from captum_repinterp.layers import NonPiecewiseLinearWarning

NB = 8  # candidate boundaries per seed: enough for the checks, keeps the file fast


def _state(model: nn.Module) -> dict:
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: p.grad is None for n, p in model.named_parameters()},
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
        "global_hooks": (
            len(nn.modules.module._global_forward_hooks),
            len(nn.modules.module._global_forward_pre_hooks),
        ),
    }


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(tiny, one_thread):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    ri.fit(x[:200], batch_size=100, progress=False)
    return ri, model, x


# ---------------------------------------------------------------- before fit, constructor
def test_before_fit_every_entry_point(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    for call in (ri.attribute, ri.interpret, ri.transform):
        with pytest.raises(NotFittedError, match=r"fit\(reference_images\)"):
            call(x[:1])


def test_constructor_bad_arguments(tiny):
    model, _ = tiny
    with pytest.raises(TypeError, match="forward_func must be callable"):
        RepresentativeInterpretation(3, model.features[-1])
    with pytest.raises(TypeError, match="layer must be a torch.nn.Module.*find_layer"):
        RepresentativeInterpretation(model, None)
    with pytest.raises(TypeError, match="layer must be"):
        RepresentativeInterpretation(model, "features.1")
    with pytest.raises(ValueError, match="layer: the given module is not a submodule"):
        RepresentativeInterpretation(model, nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="head must be callable"):
        RepresentativeInterpretation(model, model.features[-1], head=5)


def test_layer_not_called_with_function_forward(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(lambda z: model(z), nn.Conv2d(1, 1, 1).eval())
    with pytest.raises(ValueError, match="layer: the given layer was not called"):
        ri.fit(x[:20], progress=False)


# ---------------------------------------------------------------- reference sets
def test_bad_reference_sets(tiny):
    model, x = tiny
    new = lambda: RepresentativeInterpretation(model, model.features[-1])  # noqa: E731
    with pytest.raises(ValueError, match="references: the reference set is empty"):
        new().fit(x[:0], progress=False)
    with pytest.raises(ValueError, match="references: the reference set is empty"):
        new().fit(torch.utils.data.TensorDataset(x[:0]), progress=False)
    with pytest.raises(ValueError, match=r"references: .*single class"):
        new().fit(x[:1].repeat(30, 1, 1, 1), progress=False)
    # channel count the model cannot take: the model's error is wrapped and chained
    with pytest.raises(ValueError, match=r"references: the model failed on a batch \(30, 3, 12"):
        new().fit(x[:30].repeat(1, 3, 1, 1), progress=False)
    try:
        new().fit(x[:30].repeat(1, 3, 1, 1), progress=False)
    except ValueError as exc:
        assert isinstance(exc.__cause__, RuntimeError) and "channels" in str(exc)
    # spatial size the head cannot take
    with pytest.raises(ValueError, match=r"references: the model failed on a batch \(30, 1, 10"):
        new().fit(x[:30, :, :10, :10], progress=False)
    for bad in (float("nan"), float("inf"), -float("inf")):
        refs = x[:30].clone()
        refs[3, 0, 2, 2] = bad
        with pytest.raises(ValueError, match="references contains NaN or inf"):
            new().fit(refs, progress=False)
    with pytest.raises(TypeError, match="references must be a Tensor, a tuple of Tensors"):
        new().fit([x[:10]], progress=False)
    with pytest.raises(TypeError, match="references must be a Tensor"):
        new().fit(x[:10].numpy(), progress=False)
    with pytest.raises(ValueError, match="references: tensors need a batch dimension"):
        new().fit(torch.tensor(1.0), progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        new().fit(x[:10], batch_size=0, progress=False)
    with pytest.raises(TypeError, match="attribute_to_layer_input must be a bool"):
        new().fit(x[:10], attribute_to_layer_input="yes", progress=False)


def test_dataset_items_of_different_sizes_are_named(tiny):
    model, x = tiny

    class Mixed(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> torch.Tensor:
            return x[i] if i < 2 else x[i, :, :10, :10]

    loader = torch.utils.data.DataLoader(Mixed(), batch_size=2)
    ri = RepresentativeInterpretation(model, model.features[-1])
    with pytest.raises(
        ValueError,
        match=r"references: the model failed on tensor\(s\) of "
        r"shape \(2, 1, 10, 10\).*references had shape \(N, 1, 12, 12\)",
    ):
        ri.fit(loader, progress=False)


def test_integer_references(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    u8 = (x[:30] * 40 + 128).clamp(0, 255).to(torch.uint8)
    with pytest.raises(TypeError, match=r"references: .*torch.uint8.*x.float\(\) / 255") as info:
        ri.fit(u8, progress=False)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_integer_inputs_work_when_the_model_takes_them(tiny):
    """Integer tensors are passed on unchanged: a model that converts them itself works."""
    model, x = tiny

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.m((z.float() - 128) / 40)

    net = Scaled().eval()
    u8 = (x * 40 + 128).round().clamp(0, 255).to(torch.uint8)
    ri = RepresentativeInterpretation(net, model.features[-1]).fit(u8[:200], progress=False)
    # at the split layer: there is no gradient with respect to integer inputs
    attr = ri.attribute(u8[200:202], n_boundaries=NB, heatmap_layer=None)
    plain = RepresentativeInterpretation(model, model.features[-1])
    plain.fit((u8[:200].float() - 128) / 40, progress=False)
    torch.testing.assert_close(
        attr, plain.attribute((u8[200:202].float() - 128) / 40, n_boundaries=NB, heatmap_layer=None)
    )
    with pytest.warns(UserWarning, match="torch.uint8 images"):
        assert ri.attribute(u8[200:202], n_boundaries=NB).shape == attr.shape


# ---------------------------------------------------------------- inputs
def test_bad_inputs_every_entry_point(fitted):
    ri, model, x = fitted
    reg = ri.interpret(x[200:201], n_boundaries=NB)
    entry_points = {
        "attribute": lambda z: ri.attribute(z, n_boundaries=NB),
        "interpret": lambda z: ri.interpret(z, n_boundaries=NB),
        "transform": ri.transform,
        "contains": reg.contains,
        "heatmap": reg.heatmap,
        "distance": reg.distance,
    }
    before = _state(model)
    nan = x[200:202].clone()
    nan[1, 0, 0, 0] = float("nan")
    inf = x[200:202].clone()
    inf[0, 0, 5, 5] = float("inf")
    u8 = (x[200:202] * 40 + 128).clamp(0, 255).to(torch.uint8)
    cases = [
        (nan, ValueError, "inputs contains NaN or inf"),
        (inf, ValueError, "inputs contains NaN or inf"),
        ([x[200]], TypeError, r"inputs must be a (torch.)?Tensor,? (or )?a tuple.*list"),
        (x[200:201].numpy(), TypeError, "inputs must be a (torch.)?Tensor.*ndarray"),
        (None, TypeError, "inputs must be a (torch.)?Tensor.*NoneType"),
        ((x[200:201], "a"), TypeError, "inputs(:| must be).*(T|t)ensor"),
        ((), (ValueError, TypeError), "inputs: expected (at least one tensor|a tensor)"),
        (torch.tensor(0.5), ValueError, "inputs: tensors need a batch dimension"),
        # missing batch dimension: caught before the model runs
        (
            x[200],
            ValueError,
            r"inputs: got a tensor of shape \(1, 12, 12\), but the "
            r"references had shape \(N, 1, 12, 12\).*x\[None\]",
        ),
        (x[200:202, None], ValueError, r"inputs: got a tensor of shape \(2, 1, 1, 12, 12\)"),
        (
            (x[200:201], x[200:201]),
            ValueError,
            r"inputs: got 2 tensor\(s\), but the "
            "references had 1",
        ),
        # wrong channel count / size: the model fails, the error names inputs and shapes
        (
            x[200:201].repeat(1, 3, 1, 1),
            ValueError,
            r"inputs: the model failed on tensor\(s\) "
            r"of shape \(1, 3, 12, 12\).*references had shape \(N, 1, 12, 12\)",
        ),
        (x[200:201, :, :10, :10], ValueError, r"inputs: .*\(1, 1, 10, 10\).*\(N, 1, 12, 12\)"),
        (u8, TypeError, r"inputs: .*torch.uint8.*references were \['torch.float32'\].*255"),
        (x[200:201].double(), TypeError, r"inputs: .*torch.float64.*convert inputs"),
    ]
    for bad, exc_type, pattern in cases:
        for name, call in entry_points.items():
            with pytest.raises(exc_type, match=pattern) as info:
                call(bad)
            if "model failed" in pattern:
                assert isinstance(info.value.__cause__, RuntimeError), name
            assert _state(model) == before, name


def test_inputs_of_another_size_through_an_adaptive_model(tiny):
    """A model that accepts any size: the layer's shape differs, the error says so."""
    model, x = tiny
    net = nn.Sequential(model.features, nn.AdaptiveAvgPool2d(6), model.head).eval()
    ri = RepresentativeInterpretation(net, model.features[-1]).fit(x[:200], progress=False)
    big = nn.functional.interpolate(x[200:201], size=16)
    with pytest.raises(
        ValueError,
        match=r"inputs: examples of shape \(1, 16, 16\) give the layer shapes .*\(8, 8, 8\).*"
        r"references \(examples of shape \(1, 12, 12\)\) gave \(\(8, 6, 6\),\)",
    ):
        ri.attribute(big, n_boundaries=NB)


def test_model_errors_on_reference_like_inputs_propagate_unchanged(tiny):
    """A failure on inputs shaped like the references is the model's own: not rewritten."""
    model, x = tiny

    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            if z.abs().max() > 50:
                raise RuntimeError("value too large for this model")
            return self.m(z)

    net = Picky().eval()
    ri = RepresentativeInterpretation(net, model.features[-1]).fit(x[:200], progress=False)
    with pytest.raises(RuntimeError, match="value too large"):
        ri.attribute(x[200:201] * 100)


# ---------------------------------------------------------------- other arguments
def test_bad_targets(fitted):
    ri, model, x = fitted
    seeds = x[200:203]
    cases = [
        (4, ValueError, "target 4 does not select one class"),
        (100, ValueError, "target 100"),
        ([0, 1], ValueError, "target: list of length 2 for 3 inputs"),
        (torch.tensor([0, 1]), ValueError, "target: tensor with 2 elements for 3 inputs"),
        (torch.tensor([0, 1, 9]), ValueError, "target"),
        (torch.tensor([1.0, 0.0, 2.0]), TypeError, "target must be an integer tensor"),
        (True, TypeError, "target must be an int.*not bool"),
        ("cat", TypeError, "target must be an int, a tuple of ints.*got str"),
        (1.0, TypeError, "target must be an int.*got float"),
        ([0, 1.0, 2], TypeError, r"got a list holding float \(1.0\)"),
        ((0.0,), TypeError, "got tuple"),
    ]
    for target, exc_type, pattern in cases:
        for call in (ri.attribute, ri.interpret):
            with pytest.raises(exc_type, match=pattern):
                call(seeds, target=target, n_boundaries=NB)
    # negative ints index from the end, as in Captum's LayerGradCam
    torch.testing.assert_close(
        ri.attribute(seeds[:1], target=-1, n_boundaries=NB),
        ri.attribute(seeds[:1], target=3, n_boundaries=NB),
    )


def test_bad_method_arguments(fitted):
    ri, model, x = fitted
    seed = x[200:201]
    cases = [
        ({"n_boundaries": 0}, ValueError, "n_boundaries must be a positive int, got 0"),
        ({"n_boundaries": -3}, ValueError, "n_boundaries must be a positive int"),
        ({"n_boundaries": 2.5}, ValueError, "n_boundaries must be a positive int"),
        ({"delta": -1}, ValueError, r"delta must be a count in \[0, "),
        (
            {"delta": 10**6},
            ValueError,
            r"delta must be a count in \[0, \d+\] \(the number of "
            r"negatives\), got 1000000",
        ),
        ({"delta": 1.5}, ValueError, r"delta as a float must be a share in \[0, 1\)"),
        ({"delta": -0.1}, ValueError, r"delta as a float must be a share"),
        ({"delta": "all"}, TypeError, "delta must be an int, a float or None"),
        ({"random_state": 1.0}, TypeError, "random_state must be an int"),
        ({"refine": "best"}, ValueError, "refine must be one of"),
        ({"heatmap_rule": "gradcam"}, ValueError, "heatmap_rule must be one of"),
        ({"combine": "max"}, ValueError, "combine must be one of"),
        ({"bisection_steps": 0}, ValueError, "bisection_steps must be a positive int"),
    ]
    before = _state(model)
    for kwargs, exc_type, pattern in cases:
        for call in (ri.attribute, ri.interpret):
            with pytest.raises(exc_type, match=pattern):
                call(seed, **{"n_boundaries": NB, **kwargs})
    with pytest.raises(ValueError, match="attribute_to_layer_input=True but fit used False"):
        ri.attribute(seed, attribute_to_layer_input=True)
    reg = ri.interpret(seed, n_boundaries=NB)
    with pytest.raises(ValueError, match="k must be a non-negative int"):
        reg.similar(-1)
    with pytest.raises(ValueError, match=r"features must be n x 288"):
        reg.contains_features(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="features must be a tensor"):
        reg.contains_features([0.0] * 288)
    assert _state(model) == before


# ---------------------------------------------------------------- heads
class SigmoidHeadCNN(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 36, 16), act, nn.Linear(16, 3))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(z))


def _refit_last(model: nn.Module, x: torch.Tensor, n_classes: int) -> None:
    with torch.no_grad():
        h = model.head[:-1](model.features(x))
        labels = torch.arange(x.shape[0]) % n_classes
        sol = torch.linalg.lstsq(
            torch.cat([h, torch.ones(len(h), 1)], 1), nn.functional.one_hot(labels).float()
        ).solution
        model.head[-1].weight.copy_(sol[:-1].T)
        model.head[-1].bias.copy_(sol[-1])


@pytest.mark.parametrize(
    "act, op",
    [
        (nn.Sigmoid(), "sigmoid"),
        (nn.Tanh(), "tanh"),
        (nn.GELU(), "gelu"),
        (nn.SiLU(), "silu"),
        (nn.ELU(), "elu"),
        (nn.Softplus(), "softplus"),
        (nn.Mish(), "mish"),
        (nn.Softmax(dim=1), "softmax"),
    ],
)
def test_non_piecewise_linear_head_warns_once_per_call(tiny, act, op):
    _, x = tiny
    torch.manual_seed(0)
    model = SigmoidHeadCNN(act).eval()
    _refit_last(model, x[:120], 3)
    ri = RepresentativeInterpretation(model, model.features)
    with pytest.warns(
        NonPiecewiseLinearWarning,
        match=rf"head\.2 \({type(act).__name__}\): "
        rf"{op}.*local linear approximations",
    ):
        ri.fit(x[:120], progress=False)
    assert ri.head_nonlinear_ == (f"head.2 ({type(act).__name__}): {op}",)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        attr = ri.attribute(x[120:123], n_boundaries=NB)
    hits = [w for w in rec if issubclass(w.category, NonPiecewiseLinearWarning)]
    assert len(hits) == 1  # once per call, not once per seed
    assert attr.shape == (3, 1, 12, 12) and torch.isfinite(attr).all()  # "auto": the input
    # the same check for a user-given head (traced on the first reference's features)
    ri_head = RepresentativeInterpretation(model, model.features, head=model.head)
    with pytest.warns(NonPiecewiseLinearWarning, match=op):
        ri_head.fit(x[:120], progress=False)


def test_functional_nonlinearity_and_piecewise_linear_heads(tiny):
    model, x = tiny

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.m.head[:3](self.m.features(z))) @ self.m.head[3].weight.T

    with pytest.warns(NonPiecewiseLinearWarning, match=r"\btanh\b"):
        RepresentativeInterpretation(Functional().eval(), model.features[-1]).fit(
            x[:200], progress=False
        )
    # piecewise-linear heads (ReLU, PReLU, LeakyReLU, pooling, log_softmax): no warning
    net = nn.Sequential(model, nn.LogSoftmax(dim=1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonPiecewiseLinearWarning)
        ri = RepresentativeInterpretation(net, model.features[-1]).fit(x[:200], progress=False)
        ri.attribute(x[200:201], n_boundaries=NB)
    assert ri.head_nonlinear_ == ()
    # non-piecewise-linear ops *before* the layer do not count
    pre = nn.Sequential(nn.Tanh(), model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonPiecewiseLinearWarning)
        RepresentativeInterpretation(pre, model.features[-1]).fit(x[:200], progress=False)


# ---------------------------------------------------------------- modes, tuple layer
def test_training_mode_warns_and_restores(tiny):
    model, x = tiny
    model.train()
    model.head[1].eval()
    try:
        before = _state(model)
        ri = RepresentativeInterpretation(model, model.features[-1])
        with pytest.warns(UserWarning, match="training mode.*eval mode.*restores"):
            ri.fit(x[:200], progress=False)
        with pytest.warns(UserWarning, match="training mode"):
            reg = ri.interpret(x[200:201], n_boundaries=NB)
        with pytest.warns(UserWarning, match="training mode"):
            reg.contains(x[:3])
        assert _state(model) == before
    finally:
        model.eval()


class TwoOut(nn.Module):
    """A layer returning two tensors, consumed by the rest of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(6, 4, 3, padding=1)
        self.b = nn.Conv2d(6, 5, 3, padding=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(z).relu(), self.b(z).relu()


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.pair = TwoOut()
        self.fc = nn.Linear(9 * 36, 4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p, q = self.pair(self.stem(z))
        return self.fc(torch.cat([p, q], 1).flatten(1))


def test_layer_with_several_outputs(tiny):
    _, x = tiny
    torch.manual_seed(0)
    net = TupleNet().eval()
    with torch.no_grad():
        h = torch.cat(net.pair(net.stem(x[:200])), 1).flatten(1)
        sol = torch.linalg.lstsq(
            torch.cat([h, torch.ones(200, 1)], 1),
            nn.functional.one_hot(torch.arange(200) % 4).float(),
        ).solution
        net.fc.weight.copy_(sol[:-1].T)
        net.fc.bias.copy_(sol[-1])
    ri = RepresentativeInterpretation(net, net.pair).fit(x[:200], progress=False)
    assert ri.layout_.is_tuple and ri.layout_.shapes == ((4, 6, 6), (5, 6, 6))
    # the default ("auto") draws at the split layer here, and says why
    with pytest.warns(UserWarning, match="draws the maps at the split layer"):
        ri.attribute(x[200:201], n_boundaries=NB)
    attr = ri.attribute(x[200:202], n_boundaries=NB, heatmap_layer=None)
    gc = LayerGradCam(net, net.pair).attribute(x[200:202], target=0)
    assert isinstance(attr, tuple) and isinstance(gc, tuple)
    assert [a.shape for a in attr] == [g.shape for g in gc] == [(2, 1, 6, 6)] * 2
    # each part is the shared direction applied to that output, checked by hand
    reg = ri.interpret(x[200:201], n_boundaries=NB, heatmap_rule="elementwise", heatmap_layer=None)
    p, q = net.pair(net.stem(x[200:201]))
    v = reg.direction
    hand = (
        (v[:144].reshape(4, 6, 6) * p).sum(1, keepdim=True).relu(),
        (v[144:].reshape(5, 6, 6) * q).sum(1, keepdim=True).relu(),
    )
    got_maps = ri.attribute(
        x[200:201], n_boundaries=NB, heatmap_rule="elementwise", heatmap_layer=None
    )
    for got, want in zip(got_maps, hand):
        torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-5)
    # a user head taking the tuple gives the same result
    ri_h = RepresentativeInterpretation(
        net, net.pair, head=lambda pq: net.fc(torch.cat(pq, 1).flatten(1))
    ).fit(x[:200], progress=False)
    for a, b in zip(ri_h.attribute(x[200:202], n_boundaries=NB, heatmap_layer=None), attr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- side effects
def test_no_side_effects_after_errors_in_every_entry_point(tiny, boom_cls):
    model, x = tiny
    boom = boom_cls(model)
    boom.train()
    model.features[0].eval()
    model.head[3].weight.requires_grad_(False)
    try:
        before = _state(boom)
        ri = RepresentativeInterpretation(boom, model.features[-1])
        with pytest.warns(UserWarning, match="training mode"):
            ri.fit(x[:200], progress=False)
        with pytest.warns(UserWarning, match="training mode"):
            reg = ri.interpret(x[200:201], n_boundaries=NB)
        assert _state(boom) == before
        boom.armed = True
        calls = {
            "fit": lambda: ri.fit(x[:200], progress=False),
            "attribute": lambda: ri.attribute(x[200:201], n_boundaries=NB),
            "interpret": lambda: ri.interpret(x[200:201], n_boundaries=NB),
            "transform": lambda: ri.transform(x[:10]),
            "contains": lambda: reg.contains(x[:3]),
            "heatmap": lambda: reg.heatmap(x[:3]),
            "distance": lambda: reg.distance(x[:3]),
        }
        for name, call in calls.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises((RuntimeError, ValueError), match="boom") as info:
                    call()
            if name == "fit":  # fit names the references and chains the model's error
                assert info.type is ValueError and "references" in str(info.value)
                assert isinstance(info.value.__cause__, RuntimeError)
            else:  # inputs like the references: the model's own error, unchanged
                assert info.type is RuntimeError
            assert _state(boom) == before, name
        # a failing fit leaves the previous fit in place
        assert ri.features_.shape[0] == 200
    finally:
        model.head[3].weight.requires_grad_(True)
        model.eval()


def test_failure_inside_the_head_restores_everything(tiny):
    """An exception while the head is evaluated (bisection), not in the first forward."""
    model, x = tiny
    calls = {"n": 0}

    def head(a: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("head failed")
        return model.head(a)

    ri = RepresentativeInterpretation(model, model.features[-1], head=head)
    ri.fit(x[:200], progress=False)
    before = _state(model)
    with pytest.raises(RuntimeError, match="head failed"):
        ri.attribute(x[200:201], n_boundaries=NB)
    assert _state(model) == before


def test_dtypes_float64(tiny):
    model, x = tiny
    m64 = TinyDouble(model)
    x64 = x.double()
    ri = RepresentativeInterpretation(m64, m64.m.features[-1]).fit(x64[:200], progress=False)
    assert ri.features_.dtype == torch.float32  # stored as float32 on the CPU
    attr = ri.attribute(x64[200:202], n_boundaries=NB)
    assert attr.dtype == torch.float64 and attr.shape == (2, 1, 12, 12)  # "auto": the input
    ri32 = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    torch.testing.assert_close(
        attr.float(), ri32.attribute(x[200:202], n_boundaries=NB), rtol=1e-3, atol=1e-4
    )
    with pytest.raises(
        TypeError,
        match=r"inputs: .*torch.float32.*references were "
        r"\['torch.float64'\]",
    ):
        ri.attribute(x[200:201])


class TinyDouble(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        import copy

        self.m = copy.deepcopy(model).double()
        self.eval()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.m(z)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_model_with_cpu_references(tiny):
    import copy

    model, x = tiny
    gpu = copy.deepcopy(model).cuda().eval()
    ri = RepresentativeInterpretation(gpu, gpu.features[-1]).fit(x[:200], progress=False)
    assert ri.features_.device.type == "cpu"
    attr = ri.attribute(x[200:202], n_boundaries=NB)  # CPU inputs, model on the GPU
    assert attr.device.type == "cuda"
    cpu = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    torch.testing.assert_close(
        attr.cpu(), cpu.attribute(x[200:202], n_boundaries=NB), rtol=1e-3, atol=1e-4
    )
    reg = ri.interpret(x[200:201].cuda(), n_boundaries=NB)
    assert reg.contains(x[:5]).device.type == "cpu"


@cuda
def test_cuda_float64(tiny):
    model, x = tiny
    m64 = TinyDouble(model).cuda()
    ri = RepresentativeInterpretation(m64, m64.m.features[-1]).fit(
        x[:200].double().cuda(), progress=False
    )
    attr = ri.attribute(x[200:202].double().cuda(), n_boundaries=NB)
    assert attr.dtype == torch.float64 and attr.device.type == "cuda"
