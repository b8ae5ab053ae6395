"""The trace's verdict on the head after the split layer: curved heads it must find
(each checked by a numerical curvature test along a line through the features),
piecewise-linear heads it must pass, and fit's NonPiecewiseLinearWarning.

The one ``xfail(strict=True)`` is a documented limitation: a scripted function runs in the
TorchScript interpreter, which the trace does not see.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import refit_last_linear
from torch import nn

from captum_repinterp import (
    RepresentativeInterpretation,
)
from captum_repinterp.layers import nonlinear_ops_after


# --------------------------------------------------------- a small split model
class Split(nn.Module):
    """features (8 x 6 x 6 from 1 x 12 x 12) -> ``op`` -> a ReLU head of 4 classes."""

    def __init__(self, op: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.op = op if op is not None else nn.Identity()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(288, 24), nn.ReLU(), nn.Linear(24, 4))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.op(self.features(z)))


class Fn(nn.Module):
    """A module running ``fn`` (the operation under test) on the features."""

    def __init__(self, fn, **modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        for k, v in modules.items():
            setattr(self, k, v)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fn(self, f)


def _x(n: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def _trace(op: nn.Module) -> list[str]:
    model = Split(op).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nonlinear_ops_after(model, model.features, (_x(),))


def _curved_share(op: nn.Module, steps: int = 301) -> float:
    """Share of points along a random line through one example's features where the
    head's logits have a non-zero second difference: ~1 for a curved head, ~0 for a
    piecewise-linear one (only the few kinks the line crosses). Float64, one point per
    forward pass (batch statistics stay per example)."""
    model = copy.deepcopy(Split(op)).double().eval()
    x = _x().double()
    with torch.no_grad():
        f0 = model.features(x)
        d = torch.randn(f0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        d = d * f0.abs().mean() / d.abs().mean()
        ts = torch.linspace(-0.05, 0.05, steps, dtype=torch.float64)
        out = torch.stack([model.head(model.op(f0 + t * d))[0] for t in ts])
    second = (out[2:] - 2 * out[1:-1] + out[:-2]).abs().amax(1)
    scale = out.abs().max() + 1
    return float((second > 1e-13 * scale).double().mean())


# -------------------------------------------- curved heads the trace must find
@torch.jit.script
def _jit_mish(f: torch.Tensor) -> torch.Tensor:  # timm-style scripted activation
    return f * torch.tanh(F.softplus(f))


def _mha_pool(self: Fn, f: torch.Tensor) -> torch.Tensor:
    s = f.flatten(2).transpose(1, 2)
    o, _ = self.mha(s, s, s, need_weights=False)
    return o.transpose(1, 2).reshape_as(f)


def _clip_attnpool(self: Fn, f: torch.Tensor) -> torch.Tensor:
    """CLIP's ModifiedResNet attention pooling calls F.multi_head_attention_forward."""
    s = f.flatten(2).permute(2, 0, 1)  # (hw, n, c)
    m = self.mha
    o, _ = F.multi_head_attention_forward(
        s, s, s, 8, 2, m.in_proj_weight, m.in_proj_bias, None, None, False, 0.0,
        m.out_proj.weight, m.out_proj.bias, need_weights=False,
    )  # fmt: skip
    return o.permute(1, 2, 0).reshape_as(f)


def _mha() -> nn.Module:
    torch.manual_seed(3)
    return nn.MultiheadAttention(8, 2, batch_first=True)


#: name -> (factory of the op module, reason). Each head is curved (checked below); the
#: trace returns no operation for any of them.
CURVED_MISSED = {
    "MultiheadAttention": (
        lambda: Fn(_mha_pool, mha=_mha()),
        "nn.MultiheadAttention runs F.multi_head_attention_forward, a Python function the "
        "TorchFunctionMode sees as one unlisted call; its softmax and products run inside "
        "__torch_function__ with the mode off, so they are never recorded",
    ),
    "F.multi_head_attention_forward": (
        lambda: Fn(_clip_attnpool, mha=_mha()),
        "CLIP-style attention pooling: same blind spot (inner ops of a Python-level "
        "function dispatched through __torch_function__ are not traced)",
    ),
    "LPPool2d": (
        lambda: nn.Sequential(nn.LPPool2d(2, 2), nn.Upsample(size=(6, 6))),
        "nn.LPPool2d (power-average pooling, sqrt of a sum of squares) is one unlisted "
        "Python-level call 'lp_pool2d'; its pow/sqrt are not seen",
    ),
    "BatchNorm2d(track_running_stats=False)": (
        lambda: nn.BatchNorm2d(8, track_running_stats=False),
        "a batch norm without running statistics normalises by the batch's std in eval "
        "mode too (curved); 'batch_norm' is not checked for batch statistics",
    ),
    "torch.jit.script activation": (
        lambda: Fn(lambda self, f: _jit_mish(f)),
        "a scripted function (timm's swish_jit/mish_jit pattern) runs in the TorchScript "
        "interpreter, invisible to the TorchFunctionMode",
    ),
    "log_softmax mid-head": (
        lambda: Fn(lambda self, f: F.log_softmax(f, 1)),
        "log_softmax is exempt everywhere, but only a final one over the classes keeps the "
        "boundaries; over channels before a linear layer it is curved",
    ),
    "sqrt_ (in place)": (
        lambda: Fn(lambda self, f: f.abs().add(1).sqrt_()),
        "in-place variants missing from the lists: sqrt_, rsqrt_, reciprocal_, square_, "
        "cos_, sin_, erf_, log1p_, expm1_ ...",
    ),
    "reciprocal_ (in place)": (
        lambda: Fn(lambda self, f: f.abs().add(1).reciprocal_()),
        "in-place reciprocal_ is not listed (reciprocal is)",
    ),
    "cos_ (in place)": (
        lambda: Fn(lambda self, f: f.clone().cos_()),
        "in-place cos_ is not listed (cos is)",
    ),
    "torch.special.expit": (
        lambda: Fn(lambda self, f: f * 0 + torch.special.expit(f)),
        "torch.special.* names (special_expit, special_erf, special_ndtr, special_softmax, "
        "special_logsumexp, special_expm1, special_exp2, special_i0 ...) are not listed",
    ),
    "torch.special.softmax": (
        lambda: Fn(lambda self, f: torch.special.softmax(f, 1)),
        "special_softmax (a mid-head softmax over channels) is not listed",
    ),
    "torch.arctan": (
        lambda: Fn(lambda self, f: torch.arctan(f)),
        "aliases (arctan, arcsin, arcsinh, arctanh, arctan2 ...) are not listed",
    ),
    "2 ** f": (
        lambda: Fn(lambda self, f: 2**-f),
        "__rpow__ (and float_power) are not listed",
    ),
    "logaddexp (softplus)": (
        lambda: Fn(lambda self, f: torch.logaddexp(f, torch.zeros_like(f))),
        "logaddexp/logaddexp2/logcumsumexp are not listed",
    ),
    "hypot": (
        lambda: Fn(lambda self, f: torch.hypot(f, f.flip(1))),
        "hypot (and dist, pdist) are not listed",
    ),
    "mv of two": (
        lambda: Fn(
            lambda self, f: f + torch.mv(f[0, :, :, 0].T, f[0, :, 0, 0])[None, None, :, None]
        ),
        "mv is not a product op (addmv is); linalg.vecdot, cross, linalg.matmul, "
        "multi_dot, matrix_power are missing too",
    ),
    "linalg.inv": (
        lambda: Fn(lambda self, f: torch.linalg.inv(f + 10 * torch.eye(6, dtype=f.dtype))),
        "linalg inverse/solve/det of layer-dependent matrices are not listed",
    ),
    "division by .item()": (
        lambda: Fn(lambda self, f: f / (f.abs().max().item() + 1)),
        "a Python scalar from .item() drops the dependence: f / max|f| is curved",
    ),
}


@pytest.mark.parametrize("name", list(CURVED_MISSED))
def test_the_missed_heads_are_curved(name):
    """Ground truth for the test below: the logits bend along a line almost everywhere."""
    assert _curved_share(CURVED_MISSED[name][0]()) > 0.5


#: What the trace cannot see, documented in docs/models.md: a scripted function runs in
#: the TorchScript interpreter, outside the TorchFunctionMode.
NOT_SEEN = {"torch.jit.script activation"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=reason))
        if name in NOT_SEEN
        else name
        for name, (_, reason) in CURVED_MISSED.items()
    ],
)
def test_the_trace_finds_a_curved_head(name):
    assert _trace(CURVED_MISSED[name][0]()) != []


# ---------------------------------- piecewise-linear heads the trace must pass
class _FrozenBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import FrozenBatchNorm2d

        self.bn = FrozenBatchNorm2d(8)
        g = torch.Generator().manual_seed(4)
        self.bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
        self.bn.running_mean.copy_(torch.randn(8, generator=g))

    def forward(self, f):
        return self.bn(f)


def _temperature() -> nn.Module:
    m = Fn(lambda self, f: f * self.log_scale.exp())
    m.log_scale = nn.Parameter(torch.tensor(0.7))
    return m


def _normalised_weights() -> nn.Module:
    m = Fn(lambda self, f: f * F.normalize(self.w, dim=0))
    m.w = nn.Parameter(torch.randn(8, 1, 1, generator=torch.Generator().manual_seed(5)))
    return m


#: name -> (factory, reason). Each head is piecewise linear (checked below); the trace
#: reports a curved operation for each.
PL_FLAGGED = {
    "FrozenBatchNorm2d": (
        _FrozenBN,
        "torchvision.ops.FrozenBatchNorm2d (detection backbones) is affine, but its "
        "rsqrt of the running variance is counted: listed ops are counted whatever they "
        "depend on",
    ),
    "learned temperature exp()": (
        _temperature,
        "f * log_scale.exp() (CLIP's logit_scale) is linear in f; the module docstring "
        "says functions of the parameters alone are not counted, but 'exp' is",
    ),
    "F.normalize of a weight": (
        _normalised_weights,
        "a weight normalised with F.normalize (a NormFace-style classifier without "
        "feature normalisation) is linear in f; 'normalize' is counted",
    ),
    "f * sign(f) (= |f|)": (
        lambda: Fn(lambda self, f: f * torch.sign(f - 0.1)),
        "a product with a piecewise-constant factor (sign, heaviside, floor, round) is "
        "piecewise linear but counted as a product of two layer-dependent tensors",
    ),
    "floor division": (
        lambda: Fn(
            lambda self, f: f + torch.div(f, 0.5 + f.detach().abs().amax(), rounding_mode="floor")
        ),
        "div with rounding_mode='floor' is piecewise constant, counted as a division",
    ),
}


@pytest.mark.parametrize("name", list(PL_FLAGGED))
def test_the_flagged_heads_are_piecewise_linear(name):
    assert _curved_share(PL_FLAGGED[name][0]()) < 0.1


@pytest.mark.parametrize("name", list(PL_FLAGGED))
def test_the_trace_passes_a_piecewise_linear_head(name):
    assert _trace(PL_FLAGGED[name][0]()) == []


def test_frozen_bn_resnet_split_before_the_last_block():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d).eval()
    assert nonlinear_ops_after(model, model.layer3, (torch.randn(1, 3, 64, 64),)) == []


# ------------------------------------------------------ piecewise-linear forms
PL_PASSED = {
    "f * (f > 0).float()": lambda f: f * (f > 0.1).float(),
    "where": lambda f: torch.where(f > 0.1, f, 0.3 * f),
    "maximum": lambda f: torch.maximum(f, f.flip(1)),
    "gather by argmax": lambda f: (
        f * 0 + f.flatten(2).gather(2, f.flatten(2).argmax(2, keepdim=True)).unsqueeze(-1)
    ),
    "in-place relu": lambda f: F.relu(f.clone() - 0.1, inplace=True),
    "hardsigmoid/hardtanh": lambda f: F.hardsigmoid(f) + F.hardtanh(f),
    "one-hot mask of argmax": lambda f: f * F.one_hot(f.argmax(1), 8).permute(0, 3, 1, 2),
}


@pytest.mark.parametrize("name", list(PL_PASSED))
def test_piecewise_linear_forms_pass(name):
    op = Fn(lambda self, f, g=PL_PASSED[name]: g(f))
    assert _curved_share(op) < 0.1
    assert _trace(op) == []


@pytest.mark.parametrize(
    "wrap",
    ["weight_norm", "spectral_norm", "old_weight_norm", "old_spectral_norm"],
)
def test_normalised_linear_layers_in_the_head_pass(wrap):
    """weight/spectral normalisation (parametrizations and the old hooks) of the head's
    linear layers, in eval mode, are functions of the weights alone."""
    from torch.nn.utils import parametrizations as P

    fn = {
        "weight_norm": P.weight_norm,
        "spectral_norm": P.spectral_norm,
        "old_weight_norm": torch.nn.utils.weight_norm,
        "old_spectral_norm": torch.nn.utils.spectral_norm,
    }[wrap]
    model = Split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.head[1] = fn(model.head[1])
        model.head[3] = fn(model.head[3])
    model.eval()
    assert nonlinear_ops_after(model, model.features, (_x(),)) == []


def test_a_product_with_a_detached_copy_is_curved_and_flagged():
    """``f * f.detach()`` is ``f**2`` in value (the boundaries the method reads off the
    logits bend), so it must be flagged although one factor carries no gradient."""
    op = Fn(lambda self, f: f * f.detach())
    assert _curved_share(op) > 0.5
    assert _trace(op) != []


# --------------------------------------------------------------- fit's warning
def test_fit_warns_for_an_attention_pooled_head():
    from captum_repinterp import NonPiecewiseLinearWarning

    model = Split(CURVED_MISSED["MultiheadAttention"][0]()).eval()
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(80) % 4
    x = torch.randn(4, 1, 12, 12, generator=g)[labels] + 0.5 * torch.randn(
        80, 1, 12, 12, generator=g
    )
    with torch.no_grad():  # re-fit the last layer so that the predictions spread
        z = model.head[:3](model.op(model.features(x)))
        sol = torch.linalg.lstsq(torch.cat([z, torch.ones(80, 1)], 1), F.one_hot(labels).float())
        model.head[3].weight.copy_(sol.solution[:-1].T)
        model.head[3].bias.copy_(sol.solution[-1])
    assert len(model(x).argmax(1).unique()) >= 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RepresentativeInterpretation(model, model.features).fit(x, progress=False)
    assert any(issubclass(w.category, NonPiecewiseLinearWarning) for w in caught)


# ----------------------------- curved operations after the tiny CNN's features
class _CurvedAfter(nn.Module):
    """The tiny CNN with a curved operation between its features and its head, made of
    calls the trace does not list (products of two feature tensors, a division by a
    norm, logsumexp, cos)."""

    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner = inner
        self.kind = kind
        self.gate = nn.Linear(8, 8)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        f = self.inner.features(z)
        if self.kind == "relu-gated":  # squeeze-and-excitation gated by a ReLU
            f = f * torch.relu(self.gate(f.mean((2, 3))))[:, :, None, None]
        elif self.kind == "hardsigmoid-gated":  # MobileNetV3's gate
            f = f * nn.functional.hardsigmoid(self.gate(f.mean((2, 3))))[:, :, None, None]
        elif self.kind == "square":
            f = f * f
        elif self.kind == "l2-normalised":  # a cosine classifier written by hand
            f = f / (f.flatten(1).norm(dim=1)[:, None, None, None] + 1e-3)
        elif self.kind == "logsumexp":
            f = f - torch.logsumexp(f, 1, keepdim=True)
        elif self.kind == "cos":
            f = torch.cos(f)
        return self.inner.head(f)


@pytest.mark.parametrize(
    "kind", ["relu-gated", "hardsigmoid-gated", "square", "l2-normalised", "logsumexp", "cos"]
)
def test_curved_heads_without_a_listed_op_are_warned(tiny, kind):
    """The trace that decides fit's NonPiecewiseLinearWarning (and find_layer's
    choice) finds nothing after ``features``; a listed op (``pow``) is found."""
    model, x = tiny
    torch.manual_seed(0)
    curved = _CurvedAfter(model, kind).eval()
    assert nonlinear_ops_after(curved, model.features, (x[:1],)) != []


def test_a_listed_curved_op_after_the_layer_is_found(tiny):
    model, x = tiny

    class Pow(nn.Module):
        def forward(self, z):
            return model.head(model.features(z) ** 2)

    assert nonlinear_ops_after(Pow(), model.features, (x[:1],)) == ["pow"]


def test_parameter_functions_and_a_hand_written_relu_are_not_curved(tiny):
    """The trace follows input dependence: a norm of the weights after the layer (weight
    normalisation) and ``f * (f > 0)`` (a ReLU written by hand) are piecewise linear in
    the features; ``f * f`` next to them is not."""
    model, x = tiny

    class Normed(nn.Module):
        def __init__(self, square: bool) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.ones(8, 1, 1))
            self.square = square

        def forward(self, z):
            f = model.features(z)
            f = f * (self.g / self.g.norm()) * (f > 0).float()
            if self.square:
                f = f * f
            return model.head(f)

    assert nonlinear_ops_after(Normed(False), model.features, (x[:1],)) == []
    assert nonlinear_ops_after(Normed(True), model.features, (x[:1],)) == [
        "mul (of two tensors that depend on the layer)"
    ]


# ------------------------------------------------- jumps in the head


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
    with torch.no_grad():
        refit_last_linear(jumpy.head[-1], jumpy.head[:-1](jumpy.features(x[:40])))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ri = RepresentativeInterpretation(jumpy, jumpy.features).fit(x[:40], progress=False)
    said = [str(w.message) for w in caught if issubclass(w.category, NonPiecewiseLinearWarning)]
    if named is None:
        assert said == [] and ri.head_nonlinear_ == ()
    else:
        assert len(said) == 1 and named in said[0]
        assert ri.head_nonlinear_ == (f"head.3 ({type(act).__name__}): {named}",)
