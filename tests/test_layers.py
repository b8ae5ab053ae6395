"""Layer choice: find_layer picks the last conv block that is a cut with a piecewise-linear
head; check_cut tells cuts from layers something bypasses."""

import logging
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captum_repinterp.cuts import (
    NotACutError,
    NotACutWarning,
    check_cut,
    cut_check_examples,
    default_cut_tolerance,
    warn_or_raise_not_cut,
)
from captum_repinterp.layers import (
    NonPiecewiseLinearWarning,
    find_layer,
    layer_candidates,
    nonlinear_ops_after,
    nonlinear_ops_in,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()) and (
        not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
    )


def test_tiny_cnn_picks_last_block_and_logs(tiny, caplog):
    model, x = tiny
    with caplog.at_level(logging.INFO, logger="captum_repinterp.layers"):
        name, layer = find_layer(model, x[:4], return_name=True)
    # features and features[1] have the same output; the outermost is returned
    assert name == "features" and layer is model.features
    assert "picked 'features'" in caplog.text
    cands = layer_candidates(model, x[:4])
    # ReLUs after a convolution end blocks too; the max pool (features.0.2) does not
    names = [
        "features",
        "features.1",
        "features.1.1",
        "features.1.0",
        "features.0",
        "features.0.1",
        "features.0.0",
    ]
    assert [c.name for c in cands] == names
    shapes = [(1, 8, 6, 6)] * 4 + [(1, 6, 6, 6), (1, 6, 12, 12), (1, 6, 12, 12)]
    assert [c.output_shape for c in cands] == shapes
    assert all(c.nonlinear_after == () for c in cands)
    assert find_layer(model, x[:1]) is model.features
    assert _no_hooks(model)


class GatedNet(nn.Module):
    """Conv blocks, then a block using GELU, then a piecewise-linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GELU())
        self.block3 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block3(self.block2(self.block1(z))).flatten(1))


def test_skips_nothing_when_last_block_is_exact():
    net = GatedNet().eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    # GELU is inside block2, before block3: block3's head is piecewise linear
    assert find_layer(net, x) is net.block3
    cands = {c.name: c for c in layer_candidates(net, x)}
    assert cands["block3"].nonlinear_after == ()
    assert cands["block2"].nonlinear_after == ()  # block2's GELU runs inside block2
    assert cands["block1"].nonlinear_after == ("block2.1 (GELU): gelu",)
    assert cands["block2.0"].nonlinear_after == ("block2.1 (GELU): gelu",)


class SigmoidTail(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.block1(z)
        gate = torch.sigmoid(h.mean())  # not piecewise linear, but before block2
        h = self.block2(h) * gate
        return self.fc(h.flatten(1))


def test_functional_ops_after_the_layer_are_seen():
    net = SigmoidTail().eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert nonlinear_ops_after(net, net.block2, (x[:1],)) == []
    # after block1 the gate is curved twice: a sigmoid, and its product with block2's
    # output (both depend on block1's output)
    assert nonlinear_ops_after(net, net.block1, (x[:1],)) == [
        "sigmoid",
        "mul (of two tensors that depend on the layer)",
    ]
    assert find_layer(net, x) is net.block2


def test_no_exact_layer_falls_back_with_warning():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3), nn.Tanh()
    ).eval()
    x = torch.randn(1, 1, 5, 5)
    with pytest.warns(NonPiecewiseLinearWarning, match=r"4 \(Tanh\): tanh"):
        assert find_layer(net, x) is net[1]  # the ReLU after the convolution
    assert nonlinear_ops_in(net[2:], torch.zeros(1, 4, 3, 3)) == ["4 (Tanh): tanh"]


def test_find_layer_errors_and_restores_modes(tiny):
    model, x = tiny
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        find_layer(lambda z: z, x[:1])
    with pytest.raises(TypeError, match="example_input must be a torch.Tensor"):
        find_layer(model, x[:1].numpy())
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(144, 3))
    with pytest.raises(ValueError, match="model: found no convolutional block"):
        find_layer(mlp, x[:1])
    model.train()
    try:
        find_layer(model, x[:1])
        assert all(m.training for m in model.modules())
    finally:
        model.eval()
    assert _no_hooks(model)


def test_hooks_removed_when_the_model_raises(tiny):
    model, x = tiny

    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            self.m.features(z)
            raise RuntimeError("boom")

    net = Boom().eval()
    with pytest.raises(ValueError, match="example_input: .*RuntimeError: boom"):
        find_layer(net, x[:1])
    assert _no_hooks(net)
    # the torch function mode is gone too: ordinary calls are not recorded any more
    assert torch.overrides._get_current_function_mode() is None


# ------------------------------------------------------------------ final softmax


class _Tail(nn.Module):
    """Conv block, then a classifier ending in a given final operation."""

    def __init__(self, final: str) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.final = final
        self.softmax = nn.Softmax(dim=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.block(z).flatten(1)
        if self.final == "middle":  # a softmax gate before the classifier: curved
            return self.fc(h * torch.softmax(h, dim=1))
        logits = self.fc(h)
        return {
            "module": lambda: self.softmax(logits),
            "functional": lambda: nn.functional.softmax(logits, dim=1),
            "method": lambda: logits.softmax(1),
            "log_softmax": lambda: logits.log_softmax(1),
            "sigmoid": lambda: torch.sigmoid(logits),
            "softmax_then_scale": lambda: 2 * logits.softmax(1),
        }[self.final]()


@pytest.mark.parametrize("final", ["module", "functional", "method", "log_softmax", "sigmoid"])
def test_final_softmax_is_not_curved(final):
    net = _Tail(final).eval()
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    assert nonlinear_ops_after(net, net.block, (x[:1],)) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonPiecewiseLinearWarning)
        assert find_layer(net, x[:1]) is net.block
    # the same op handed over as a user head is its last operation too
    assert nonlinear_ops_in(lambda h: net(h), x[:1]) == []


@pytest.mark.parametrize("final", ["middle", "softmax_then_scale"])
def test_softmax_elsewhere_still_counts(final):
    net = _Tail(final).eval()
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    ops = nonlinear_ops_after(net, net.block, (x[:1],))
    # "middle" gates h by softmax(h): the product of the two is curved as well
    extra = ["mul (of two tensors that depend on the layer)"] if final == "middle" else []
    assert ops == ["softmax", *extra]
    with pytest.warns(NonPiecewiseLinearWarning, match="softmax"):
        find_layer(net, x[:1])


# ------------------------------------------------------------------ cut check


class ResBlockNet(nn.Module):
    """A stem and one residual block; ``alpha`` scales the skip path (0: no skip)."""

    def __init__(self, alpha: float = 1.0, width: int = 16, n_classes: int = 4) -> None:
        super().__init__()
        self.alpha = alpha
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.conv1, self.relu1 = nn.Conv2d(width, width, 3, padding=1), nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.out_relu = nn.ReLU()
        self.fc = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = self.out_relu(self.conv2(self.relu1(self.conv1(s))) + self.alpha * s)
        return self.fc(y.mean((2, 3)))


def _resblock(alpha: float = 1.0, seed: int = 0) -> tuple[ResBlockNet, torch.Tensor]:
    torch.manual_seed(seed)
    net = ResBlockNet(alpha).eval()
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():  # fc x20, bias centred on the mean logits (spread classes)
        net.fc.weight.mul_(20)
        net.fc.bias.sub_(net(x).mean(0))
    return net, x


def _state(model: nn.Module) -> tuple:
    return (
        {n: m.training for n, m in model.named_modules()},
        {
            n: (p.requires_grad, None if p.grad is None else p.grad.clone())
            for n, p in model.named_parameters()
        },
        {n: b.clone() for n, b in model.named_buffers()},
    )


def _same_state(a: tuple, b: tuple) -> bool:
    flags_a, params_a, bufs_a = a
    flags_b, params_b, bufs_b = b
    grads_ok = all(
        params_a[n][0] == params_b[n][0]
        and (
            (params_a[n][1] is None and params_b[n][1] is None)
            or torch.equal(params_a[n][1], params_b[n][1])
        )
        for n in params_a
    )
    return (
        flags_a == flags_b and grads_ok and all(torch.equal(bufs_a[n], bufs_b[n]) for n in bufs_a)
    )


def test_residual_inner_layer_is_not_a_cut_and_block_output_is():
    net, x = _resblock()
    check = check_cut(net, net.conv2, x)
    assert not check.is_cut and check.conclusive
    assert check.bypass == ("inputs",)
    assert check.suggestion == "out_relu"
    assert check.layer == "conv2" and check.n_pairs == 4
    assert "'conv2' is not a cut" in check.message
    assert "Split at 'out_relu' instead" in check.message
    assert "find_layer(model, inputs) picks the last cut whose head is piecewise" in check.message
    assert "skip connection" in check.message and "'out_relu'" in check.message
    assert check.max_error > check.tolerance
    good = check_cut(net, net.out_relu, x)
    assert good.is_cut and good.bypass == () and good.message == ""
    assert good.max_error <= good.tolerance
    # the stem is a cut too (everything after it flows from its output)
    assert check_cut(net, net.stem, x).is_cut
    # relu1 sits inside the block, like conv2
    assert check_cut(net, net.relu1, x).suggestion == "out_relu"
    # the layer's input: out_relu's input is the sum (a cut), conv2's is not
    assert check_cut(net, net.out_relu, x, attribute_to_layer_input=True).is_cut
    inner = check_cut(net, net.conv2, x, attribute_to_layer_input=True)
    assert not inner.is_cut and inner.bypass == ("inputs",)


def test_error_matches_a_hand_computation():
    """max_error is what running A with B's conv2 output gives, computed by hand."""
    net, x = _resblock()
    check = check_cut(net, net.conv2, x[:3], n_pairs=3)
    with torch.no_grad():
        s = net.stem(x[:3])
        inner = net.conv2(net.relu1(net.conv1(s)))
        nxt = torch.tensor([1, 2, 0])
        mixed = net.fc(net.out_relu(inner[nxt] + s).mean((2, 3)))
        out = net(x[:3])
    truth = out[nxt]
    assert check.max_error == pytest.approx(float((mixed - truth).abs().max()), rel=1e-5)
    assert check.scale == pytest.approx(float(out.abs().max()), rel=1e-6)


def test_find_layer_picks_the_block_output_not_the_inner_conv():
    net, x = _resblock()
    assert find_layer(net, x[:1], return_name=True)[0] == "out_relu"
    assert find_layer(net, x, return_name=True)[0] == "out_relu"
    # without a skip path the last conv block is a cut again
    net0, _ = _resblock(alpha=0.0)
    assert check_cut(net0, net0.conv2, x).is_cut
    assert find_layer(net0, x[:1], return_name=True)[0] == "out_relu"


@settings(max_examples=15, deadline=None)
@given(alpha=st.floats(0.2, 3.0), seed=st.integers(0, 10_000))
def test_skip_path_of_any_strength_is_found(alpha, seed):
    net, x = _resblock(alpha, seed)
    check = check_cut(net, net.conv2, x[:4], suggest=False)
    assert not check.is_cut and check.bypass == ("inputs",)
    assert check.suggestion is None  # suggest=False
    assert check_cut(net, net.out_relu, x[:4]).is_cut


def test_plain_function_and_bound_method_get_names():
    net, x = _resblock()
    for fwd in (lambda z: net(z), net.forward):
        check = check_cut(fwd, net.conv2, x)
        assert not check.is_cut and check.suggestion == "out_relu"
        assert check.layer in ("conv2", "Conv2d")


class MetaNet(nn.Module):
    """An image branch and a metadata vector joined before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.fc1 = nn.Linear(8 * 4 + 5, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(torch.cat([self.branch(image), meta], 1))))


def test_metadata_entering_after_the_layer():
    torch.manual_seed(0)
    net = MetaNet().eval()
    gen = torch.Generator().manual_seed(1)
    x, meta = torch.randn(6, 3, 8, 8, generator=gen), torch.randn(6, 5, generator=gen)
    check = check_cut(net, net.branch, x, additional_forward_args=meta)
    assert not check.is_cut
    assert check.bypass == ("additional_forward_args",)
    assert "additional_forward_args enter the model after the layer" in check.message
    assert check.suggestion == "fc1"
    # the same metadata for every example: nothing per-example enters later
    shared = meta[:1].expand(6, 5).clone()
    assert check_cut(net, net.branch, x, additional_forward_args=(shared,)).is_cut
    # a scalar argument is not per-example and is passed through as it is
    check2 = check_cut(
        lambda im, m, k: net(im, m * k), net.branch, x, additional_forward_args=(meta, 2.0)
    )
    assert check2.bypass == ("additional_forward_args[0]",)
    # fc1 (after the join) is a cut; no convolutional block is, so find_layer refuses
    assert check_cut(net, net.fc1, x, additional_forward_args=meta).is_cut
    with pytest.raises(NotACutError, match="no convolutional block of the model is a cut"):
        find_layer(net, x[:1], additional_forward_args=meta[:1])
    with pytest.raises(ValueError, match="'fc1'"):
        find_layer(net, x, additional_forward_args=meta)


class TwoImageNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * 36, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.left(a).flatten(1), self.right(b).flatten(1)], 1))


def test_two_image_model_explained_on_one_branch():
    torch.manual_seed(0)
    net = TwoImageNet().eval()
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 1, 6, 6, generator=gen), torch.randn(5, 1, 6, 6, generator=gen)
    check = check_cut(net, net.left, (a, b))
    assert not check.is_cut and check.bypass == ("inputs[1]",)
    assert "inputs[1] reach the output around the layer" in check.message
    assert check.suggestion is None  # only the logits come after the join
    via_args = check_cut(net, net.left, a, additional_forward_args=b)
    assert via_args.bypass == ("additional_forward_args",)
    assert not check_cut(net, net.right, (a, b)).is_cut


def test_sequential_cnn_is_a_cut_at_every_block(tiny):
    model, x = tiny
    before = _state(model)
    for layer in (model.features, model.features[0], model.features[1][0], model.head[1]):
        check = check_cut(model, layer, x[:10])
        assert check.is_cut and check.max_error == 0.0 and check.noise == 0.0
    assert _same_state(before, _state(model))
    assert _no_hooks(model)


def test_user_head():
    net, x = _resblock()
    right = lambda y: net.fc(y.mean((2, 3)))  # noqa: E731
    assert check_cut(net, net.out_relu, x, head=right).is_cut
    wrong = lambda y: net.fc(y.amax((2, 3)))  # noqa: E731
    check = check_cut(net, net.out_relu, x, head=wrong)
    assert not check.is_cut and check.bypass == ("head",)
    assert "the given head does not compute" in check.message
    assert check.suggestion is None
    # a head at an inner layer: the model itself bypasses the layer, say so
    inner = check_cut(net, net.conv2, x, head=lambda y: right(torch.relu(y)))
    assert not inner.is_cut and inner.bypass == ("inputs",)
    with pytest.raises(TypeError, match="head must return a tensor"):
        check_cut(net, net.out_relu, x, head=lambda y: y.sum().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    net, x = _resblock()
    net, x = net.to(dtype), x.to(dtype)
    try:
        rtol, _ = default_cut_tolerance(dtype)
        assert rtol == pytest.approx(4 * torch.finfo(dtype).eps)
        assert rtol > default_cut_tolerance(torch.float32)[0] == 1e-5
        assert check_cut(net, net.out_relu, x).is_cut
        bad = check_cut(net, net.conv2, x)
        assert not bad.is_cut and bad.suggestion == "out_relu"
        assert bad.tolerance == pytest.approx(rtol * bad.scale + rtol / 100)
    finally:
        net.float()


def test_explicit_tolerance():
    net, x = _resblock()
    err = check_cut(net, net.conv2, x).max_error
    scale = check_cut(net, net.conv2, x).scale
    assert check_cut(net, net.conv2, x, rtol=0.0, atol=err * 1.01).is_cut
    assert not check_cut(net, net.conv2, x, rtol=0.0, atol=err * 0.99).is_cut
    assert check_cut(net, net.conv2, x, rtol=err / scale * 1.01, atol=0.0).is_cut


class NoisyNet(nn.Module):
    """Dropout that stays on in eval mode: outputs are not reproducible."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 36, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = nn.functional.dropout(self.block(z).flatten(1), 0.5, training=True)
        return self.fc(h)


def test_irreproducible_model_is_inconclusive_and_only_warns():
    torch.manual_seed(0)
    net = NoisyNet().eval()
    x = torch.randn(4, 1, 6, 6)
    check = check_cut(net, net.block, x)
    assert not check.conclusive and check.noise > check.tolerance
    assert not check.is_cut and "not conclusive" in check.message
    with pytest.warns(NotACutWarning, match="not conclusive"):
        warn_or_raise_not_cut(check)
    with pytest.warns(NotACutWarning):
        assert find_layer(net, x[:1]) is net.block


def test_warn_or_raise():
    net, x = _resblock()
    bad = check_cut(net, net.conv2, x)
    with pytest.raises(NotACutError, match="'conv2' is not a cut") as err:
        warn_or_raise_not_cut(bad)
    assert isinstance(err.value, ValueError)
    with pytest.warns(NotACutWarning, match="'out_relu' instead"):
        warn_or_raise_not_cut(bad, error=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_or_raise_not_cut(check_cut(net, net.out_relu, x))
    with pytest.raises(TypeError, match="check must be a CutCheck"):
        warn_or_raise_not_cut(True)


def test_check_cut_argument_errors_and_cleanup(tiny, boom_cls):
    model, x = tiny
    with pytest.raises(ValueError, match="inputs: the cut check needs at least two"):
        check_cut(model, model.features, x[:1])
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        check_cut(model, model.features, x[:2].numpy())
    with pytest.raises(ValueError, match="n_pairs must be a positive int"):
        check_cut(model, model.features, x[:2], n_pairs=0)
    with pytest.raises(ValueError, match="rtol must be a non-negative number"):
        check_cut(model, model.features, x[:2], rtol=-1.0)
    with pytest.raises(TypeError, match="layer must be a torch.nn.Module"):
        check_cut(model, "features", x[:2])
    with pytest.raises(TypeError, match="forward_func must be callable"):
        check_cut(3, model.features, x[:2])
    with pytest.raises(ValueError, match="layer: the given layer was not called"):
        check_cut(model, nn.ReLU(), x[:2])
    twice = nn.ReLU()
    with pytest.raises(ValueError, match="called 2 times"):
        check_cut(lambda z: twice(twice(z)).flatten(1), twice, x[:2])
    with pytest.raises(ValueError, match="one row of scores per example"):
        check_cut(lambda z: model(z).sum(), model.features, x[:2])
    # training-mode model with gradients: flags, grads and BN-free buffers untouched
    model.train()
    model.zero_grad()
    model(x[:3]).sum().backward()
    try:
        before = _state(model)
        assert check_cut(model, model.features, x[:5]).is_cut
        assert _same_state(before, _state(model))
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    # a model that raises after the layer: hooks are removed
    boom = boom_cls(model).eval()
    boom.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        check_cut(boom, model.features, x[:2])
    assert _no_hooks(boom)


def test_cut_check_examples():
    x = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    meta = torch.randn(1, 4)
    inputs, extra = cut_check_examples(x, (meta, 3))
    assert inputs[0].shape == (2, 3, 5, 5) and torch.equal(inputs[0][0], x[0])
    assert not torch.equal(inputs[0][1], x[0])
    assert extra[0].shape == (2, 4) and extra[1] == 3
    again, _ = cut_check_examples(x, (meta, 3))
    assert torch.equal(again[0], inputs[0])  # deterministic
    img = torch.arange(2 * 3 * 3, dtype=torch.uint8).reshape(1, 2, 3, 3)
    (flipped,), none = cut_check_examples(img)
    assert none is None and torch.equal(flipped[1], img[0].flip(-1))
    const = torch.zeros(1, 2, 2)
    (c,), _ = cut_check_examples(const)
    assert c[1].abs().sum() > 0
    many, extra = cut_check_examples(torch.randn(9, 2), torch.randn(9, 4))
    assert many[0].shape[0] == 4 and extra[0].shape[0] == 4


@pytest.mark.slow
def test_torchvision_resnet18_cuts():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for name in ("layer3", "layer4", "layer4.1"):
        assert check_cut(model, model.get_submodule(name), x).is_cut, name
    check = check_cut(model, model.layer4[0].conv2, x)
    assert not check.is_cut and check.bypass == ("inputs",)
    assert check.suggestion == "layer4.0"
    assert find_layer(model, x[:1]) is model.layer4
    assert _no_hooks(model)


class PairLayer(nn.Module):
    """A layer with two outputs (a tuple), both used by the rest of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(z), self.b(z)


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = PairLayer()
        self.fc = nn.Linear(5, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(z)
        return self.fc(torch.cat([a.relu().mean((2, 3)), b.mean((2, 3))], 1))


def test_layer_with_a_tuple_output_and_a_user_head():
    torch.manual_seed(0)
    net = PairNet().eval()
    x = torch.randn(4, 1, 5, 5)
    assert check_cut(net, net.pair, x).is_cut
    head = lambda ab: net.fc(torch.cat([ab[0].relu().mean((2, 3)), ab[1].mean((2, 3))], 1))  # noqa: E731
    assert check_cut(net, net.pair, x, head=head).is_cut
    swapped = lambda ab: head((ab[0], -ab[1]))  # noqa: E731
    assert check_cut(net, net.pair, x, head=swapped).bypass == ("head",)
    # the input of fc is a cut too (checked at the layer's input)
    assert check_cut(net, net.fc, x, attribute_to_layer_input=True).is_cut
