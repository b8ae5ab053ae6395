"""Interoperability with Captum's wrappers, metrics and visualisation, Quantus, grad-cam,
and torchvision architectures (random weights, never downloaded)."""

import copy

import numpy as np
import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam, NoiseTunnel
from captum.attr import visualization as viz
from captum.metrics import infidelity, sensitivity_max
from torch import nn

from captum_repinterp import RepresentativeInterpretation, find_layer
from captum_repinterp.layers import NonPiecewiseLinearWarning

NB = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(tiny, one_thread):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    return ri, model, x


def _explain(ri, size=(12, 12)):
    """Captum-style explanation function: RI maps upsampled to the input size.

    Like Captum's input attributions it returns a tuple for tuple inputs
    (``sensitivity_max`` calls it with a tuple and iterates over the result).
    """

    def explain(inputs, target=None, **kwargs):
        attr = ri.attribute(inputs, target=target, n_boundaries=NB)
        up = LayerAttribution.interpolate(attr, size, "bilinear")
        return (up,) if isinstance(inputs, tuple) else up

    return explain


def test_noise_tunnel_smoothgrad(fitted):
    ri, model, x = fitted
    seeds = x[200:202]
    nt = NoiseTunnel(ri)
    # zero noise: SmoothGrad is the mean of identical maps, i.e. the plain attribution
    same = nt.attribute(seeds, nt_type="smoothgrad", nt_samples=3, stdevs=0.0, n_boundaries=NB)
    torch.testing.assert_close(same, ri.attribute(seeds, n_boundaries=NB))
    torch.manual_seed(0)
    noisy = nt.attribute(
        seeds, nt_type="smoothgrad", nt_samples=3, stdevs=0.2, n_boundaries=NB, target=0
    )
    # the default draws at the input here ("auto"), 12 x 12
    assert noisy.shape == (2, 1, 12, 12) and torch.isfinite(noisy).all() and (noisy >= 0).all()
    torch.manual_seed(0)
    again = nt.attribute(
        seeds, nt_type="smoothgrad", nt_samples=3, stdevs=0.2, n_boundaries=NB, target=0
    )
    torch.testing.assert_close(again, noisy)  # only the noise is random
    sq = nt.attribute(seeds, nt_type="smoothgrad_sq", nt_samples=2, stdevs=0.1, n_boundaries=NB)
    assert (sq >= 0).all()


def test_sensitivity_max_by_hand(fitted):
    ri, model, x = fitted
    seeds = x[200:202]
    explain = _explain(ri)
    shift = 0.01

    def perturb(inputs, perturb_radius=0.02):
        # deterministic, so that the result can be checked by hand
        return tuple(t + shift for t in inputs) if isinstance(inputs, tuple) else inputs + shift

    sens = sensitivity_max(
        explain, seeds, perturb_func=perturb, n_perturb_samples=3, target=torch.tensor([0, 1])
    )
    a = explain(seeds, target=torch.tensor([0, 1]))
    b = explain(seeds + shift, target=torch.tensor([0, 1]))
    hand = (b - a).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
    torch.testing.assert_close(sens, hand, rtol=1e-4, atol=1e-6)
    # with Captum's own random perturbations: the method is deterministic, so a radius
    # of zero gives zero sensitivity
    sens0 = sensitivity_max(explain, seeds, perturb_radius=0.0, n_perturb_samples=2)
    torch.testing.assert_close(sens0, torch.zeros(2))


def test_infidelity_by_hand(fitted):
    ri, model, x = fitted
    seeds = x[200:202]
    target = model(seeds).argmax(1)
    attr = _explain(ri)(seeds, target=target)
    bump = torch.zeros(1, 1, 12, 12)
    bump[..., 3:9, 3:9] = 0.5

    def perturb(inputs):
        pert = bump.expand_as(inputs)
        return pert, inputs - pert

    inf = infidelity(model, perturb, seeds, attr, target=target, n_perturb_samples=2)
    with torch.no_grad():
        f = model(seeds).gather(1, target[:, None]).squeeze(1)
        f_pert = model(seeds - bump).gather(1, target[:, None]).squeeze(1)
    hand = ((attr * bump).flatten(1).sum(1) - (f - f_pert)) ** 2
    torch.testing.assert_close(inf, hand, rtol=1e-4, atol=1e-5)


def test_interpolate_and_visualize_multiple(fitted):
    ri, model, x = fitted
    attr = ri.attribute(x[200:201], n_boundaries=NB)
    up = LayerAttribution.interpolate(attr, (12, 12), "bilinear")
    assert up.shape == (1, 1, 12, 12)
    torch.testing.assert_close(up, nn.functional.interpolate(attr, size=(12, 12), mode="bilinear"))
    fig, axes = viz.visualize_image_attr_multiple(
        up[0].permute(1, 2, 0).detach().numpy(),
        x[200].permute(1, 2, 0).numpy(),
        methods=["original_image", "heat_map", "blended_heat_map"],
        signs=["all", "positive", "positive"],
        use_pyplot=False,
    )
    assert len(np.atleast_1d(axes)) == 3
    assert type(fig).__name__ == "Figure"


def test_quantus_faithfulness_through_explain_func(fitted):
    quantus = pytest.importorskip("quantus")
    ri, model, x = fitted
    x_np = x[200:204].numpy()
    y_np = model(x[200:204]).argmax(1).numpy()
    calls = []

    def explain_func(model, inputs, targets, **kwargs):
        calls.append(len(inputs))
        t = torch.as_tensor(inputs, dtype=torch.float32)
        attr = _explain(ri)(t, target=torch.as_tensor(targets).long())
        return attr.detach().numpy()

    def score():
        np.random.seed(0)
        metric = quantus.FaithfulnessCorrelation(
            nr_runs=10,
            subset_size=16,
            perturb_baseline="black",
            return_aggregate=False,
            disable_warnings=True,
        )
        return np.asarray(
            metric(
                model=model,
                x_batch=x_np,
                y_batch=y_np,
                a_batch=None,
                explain_func=explain_func,
                device="cpu",
            )
        )

    first = score()
    assert calls and sum(calls) >= 4  # Quantus asked our method for the attributions
    assert first.shape == (4,) and np.all(np.abs(first) <= 1 + 1e-9)
    np.testing.assert_allclose(score(), first)  # deterministic explanations, seeded metric


def test_grad_cam_road_through_adapter(fitted):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ri, model, x = fitted
    seeds = x[200:203]
    target = model(seeds).argmax(1)
    # adapter: grad-cam metrics take N x H x W numpy maps at the input size
    cams = _explain(ri)(seeds, target=target)[:, 0].detach().numpy()
    targets = [ClassifierOutputTarget(int(c)) for c in target]
    scores = ROADMostRelevantFirst(percentile=80)(seeds, cams, targets, model)
    scores = np.asarray(scores)
    assert scores.shape == (3,) and np.all(np.isfinite(scores))


# ---------------------------------------------------------------- torchvision
def _diversify(model: nn.Module, x: torch.Tensor, n_classes: int) -> None:
    """Refit the last linear layer so that random-weight predictions are diverse."""
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen = []
    h = fc.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    f = seen[0].double()
    onehot = nn.functional.one_hot(torch.arange(len(f)) % n_classes, n_classes).double()
    sol = torch.linalg.lstsq(
        torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1), onehot
    ).solution.float()
    with torch.no_grad():
        fc.weight.copy_(sol[:-1].T)
        fc.bias.copy_(sol[-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, layer_name, exact",
    [
        ("resnet18", "layer4", True),
        ("vgg11", "features", True),
        ("densenet121", "features", True),
        ("mobilenet_v3_small", "features", False),
    ],
)
def test_torchvision_architectures(arch, layer_name, exact):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = getattr(tvm, arch)(weights=None, num_classes=3).eval()
    x = torch.randn(14, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _diversify(model, x[:12], 3)
    if exact:
        name, layer = find_layer(model, x[:1], return_name=True)
    else:  # MobileNetV3's classifier uses Hardswish: no exact layer exists
        with pytest.warns(NonPiecewiseLinearWarning, match="Hardswish"):
            name, layer = find_layer(model, x[:1], return_name=True)
    assert name == layer_name and layer is model.get_submodule(layer_name)
    flags = {n: m.training for n, m in model.named_modules()}
    ri = RepresentativeInterpretation(model, layer)
    if exact:
        ri.fit(x[:12], batch_size=6, progress=False)
    else:
        with pytest.warns(NonPiecewiseLinearWarning):
            ri.fit(x[:12], batch_size=6, progress=False)
    assert ri.predictions_.unique().numel() >= 2
    with torch.no_grad():
        acts = []
        h = layer.register_forward_hook(lambda m, i, o: acts.append(o.detach().clone()))
        model(x[:12])
        h.remove()
    # in-place ReLUs after the layer (VGG, DenseNet) must not alter the recorded features
    torch.testing.assert_close(ri.features_, acts[0].flatten(1))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonPiecewiseLinearWarning)
        attr = ri.attribute(x[12:13], n_boundaries=4, bisection_steps=8, heatmap_layer=None)
        default = ri.attribute(x[12:13], n_boundaries=4, bisection_steps=8)
    gc = LayerGradCam(model, layer).attribute(x[12:13], target=0)
    assert attr.shape == gc.shape
    # the default draws where "auto" chose: the split layer or the input
    at = ri.heatmap_resolution_.heatmap_layer
    assert default.shape == (attr.shape if at is None else (1, 1, *x.shape[-2:]))
    assert torch.isfinite(attr).all()
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_a_compiled_model_gives_the_eager_models_results(tiny, one_thread, how):
    """``torch.compile(model)`` (an ``OptimizedModule``) and ``model.compile()`` (compiled
    in place) are the same function as the model: every call must give the eager model's
    maps, and find_layer its layer. Before, the compiled graph ran without the hooks
    registered after compiling, so fit failed with "the given layer was not called
    during the forward pass" (the layer does run), and names started with
    ``_orig_mod.``."""
    model, x = tiny
    refs, seeds = x[:120], x[200:203]
    eager = RepresentativeInterpretation(model, model.features).fit(refs, progress=False)
    if how == "torch.compile":
        compiled = torch.compile(model)
    else:
        compiled = copy.deepcopy(model)
        compiled.compile()
    with torch.no_grad():
        compiled(seeds)  # compiled before it is explained, as deployed
    layer = compiled.get_submodule("features") if how != "torch.compile" else model.features
    ri = RepresentativeInterpretation(compiled, layer).fit(refs, progress=False)
    for heatmap_layer in (None, "input"):
        assert torch.equal(
            ri.attribute(seeds, heatmap_layer=heatmap_layer),
            eager.attribute(seeds, heatmap_layer=heatmap_layer),
        )
    assert find_layer(compiled, seeds[:1], return_name=True) == ("features", layer)
