"""bfloat16 and float16 models on the CPU: the sampler, match and solver run on them;
calls made under ``torch.autocast`` run in the model's own dtypes."""

import pytest
import torch
from captum.attr import LayerGradCam
from torch import nn

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.sampler import find_crossings, sample_boundaries


def _model_and_inputs(dtype: torch.dtype):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    ).eval()
    x = torch.randn(120, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model[-1].weight.mul_(10)
        model[-1].bias.zero_()
        model[-1].bias.copy_(-model(x).mean(0))
    return model.to(dtype), x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("given_head", [False, True])
def test_half_models_fit_and_attribute(dtype, given_head, one_thread):
    model, x = _model_and_inputs(dtype)
    head = model[4:] if given_head else None
    ri = RepresentativeInterpretation(model, model[3], head=head).fit(x[:100], progress=False)
    attr = ri.attribute(x[100:104])
    ref = LayerGradCam(model, model[3]).attribute(x[100:104], target=0)
    assert attr.shape == ref.shape and attr.dtype == ref.dtype
    assert torch.isfinite(attr.float()).all()
    regs = ri.interpret(x[100:104])
    for reg in regs:
        assert reg.n_sampled > 0 and reg.n_boundaries > 0
        assert reg.weight.dtype == torch.float32
        assert 0.0 < reg.purity <= 1.0


def test_bfloat16_crossings_bracket_the_decision():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).bfloat16()
    pts = torch.randn(200, 6).bfloat16() * 3
    with torch.no_grad():
        preds = head(pts).argmax(1)
    cls = int(preds[0])
    ends = pts[preds != cls][:10]
    t, valid, _, n_tied = find_crossings(head, pts[0], ends, cls, n_steps=12)
    assert valid.any() and n_tied == 0  # half types are bisected
    p = pts[0][None] + t[:, None].bfloat16() * (ends - pts[0][None])
    with torch.no_grad():
        assert (head(p).argmax(1)[valid] == cls).all()
    b = sample_boundaries(head, pts[0], ends, cls, n_steps=12)
    assert len(b) > 0 and b.weight.dtype == torch.float32
    assert ((b.weight @ pts[0].float() + b.bias) > 0).all()


def test_autocast_is_off_inside_every_call(one_thread):
    """A float32 model called under ``torch.autocast("cpu", dtype=torch.bfloat16)``: the
    boundary search needs the model's own precision, so every call runs with autocast
    off and gives exactly what it gives outside the block (maps in float32, the same
    regions, features, memberships and distances), and the block is still on after."""
    model, x = _model_and_inputs(torch.float32)
    ri = RepresentativeInterpretation(model, model[3]).fit(x[:100], progress=False)
    seeds, new = x[100:103], x[103:120]
    attr = ri.attribute(seeds, heatmap_layer=None)
    at_input = ri.attribute(seeds, heatmap_layer="input")
    regions = ri.interpret(seeds)
    feats = ri.transform(new)[0]
    dist = regions[0].distance(new)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        refit = RepresentativeInterpretation(model, model[3]).fit(x[:100], progress=False)
        attr_ac = ri.attribute(seeds, heatmap_layer=None)
        at_input_ac = ri.attribute(seeds, heatmap_layer="input")
        regions_ac = ri.interpret(seeds)
        feats_ac = ri.transform(new)[0]
        dist_ac = regions[0].distance(new)
        contains_ac = regions[0].contains(new)
        assert torch.is_autocast_enabled("cpu")
    assert torch.equal(refit.features_, ri.features_)
    assert attr_ac.dtype == torch.float32 and torch.equal(attr_ac, attr)
    assert torch.equal(at_input_ac, at_input)
    assert regions_ac == regions
    assert torch.equal(feats_ac, feats) and torch.equal(dist_ac, dist)
    assert torch.equal(contains_ac, regions[0].contains(new))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_leading_linear_layer_is_one_the_features_feed(one_thread, dtype):
    """Split at a Linear layer, the head's "first Linear fed by the features" was taken
    to be the split layer itself (its input requires grad through the parameters when
    the head runs the whole model): in float64 fit kept it and every interpret failed
    with "shape '[3, -1]' is invalid for input of size 64". The layer is now the first
    whose input depends on the features: none after the split Linear (a ReLU comes
    first), the last Linear after the ReLU."""
    model, x = _model_and_inputs(torch.float32)
    model, x = model.to(dtype), x.to(dtype)
    at_linear = RepresentativeInterpretation(model, model[6]).fit(x, progress=False)
    assert at_linear.references_.leading is None
    region = at_linear.interpret(x[:1], n_boundaries=10)
    assert region.members.numel() > 0
    at_relu = RepresentativeInterpretation(model, model[7]).fit(x, progress=False)
    assert at_relu.references_.leading is not None
    assert at_relu.references_.leading.module is model[8]
    assert at_relu.interpret(x[:1], n_boundaries=10).members.numel() > 0
