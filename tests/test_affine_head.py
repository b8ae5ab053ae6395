"""Exact regions when the head is affine (a ResNet split at ``layer4``: pool + fc)."""

import pytest
import torch
import torchvision
from torch import nn

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.projection import find_affine_head


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(160, 3, 32, 32, generator=gen)
    with torch.no_grad():
        # re-draw fc so that the predictions spread over the 10 classes
        feats = nn.Sequential(*list(model.children())[:-1])(x).flatten(1)
        w = torch.randn(10, feats.shape[1], generator=gen)
        logits = feats @ w.T
        model.fc.weight.copy_(w)
        model.fc.bias.copy_(-logits.mean(0))
    return model, x


def test_affine_head_found_and_exact(resnet, one_thread):
    model, x = resnet
    refs, seeds = x[:140], x[140:]
    ri = RepresentativeInterpretation(model, model.layer4).fit(refs, progress=False)
    affine = ri.references_.affine
    assert affine is not None and affine.weight.shape == (10, 512)
    preds = ri.predictions_
    assert len(preds.unique()) >= 5
    # the affine map gives the head's logits on the references
    with torch.no_grad():
        logits = model(refs)
    torch.testing.assert_close(affine.predict(ri.features_).float(), logits, rtol=1e-4, atol=1e-4)
    for reg in ri.interpret(seeds[:6]):
        assert reg.delta == 0
        assert reg.purity == 1.0
        # the region is the class's whole decision region: every reference of the
        # class is a member (up to references tied within rounding)
        positive = preds == reg.target
        assert reg.coverage == 1.0 or int(positive.sum()) - len(reg.members) <= 1
        assert set(reg.runner_up.tolist()) <= set(range(10)) - {reg.target}
        # each boundary is the difference of two rows of the affine map
        for w, b, k in zip(reg.weight, reg.bias, reg.runner_up):
            torch.testing.assert_close(w, affine.weight[reg.target] - affine.weight[k])
            torch.testing.assert_close(
                b.double(), affine.bias[reg.target] - affine.bias[k], rtol=1e-5, atol=1e-4
            )


def test_layer3_head_is_not_affine(resnet):
    model, x = resnet
    ri = RepresentativeInterpretation(model, model.layer3).fit(x[:40], progress=False)
    assert ri.references_.affine is None


def test_affine_detection_on_small_heads():
    torch.manual_seed(0)
    feats = torch.randn(20, 12)
    lin = nn.Sequential(nn.Linear(12, 5), nn.Linear(5, 3))  # affine
    found = find_affine_head(lin, lin, feats)
    assert found is not None
    w = lin[1].weight @ lin[0].weight
    torch.testing.assert_close(found.weight, w.detach())
    relu = nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    assert find_affine_head(relu, relu, feats) is None
    assert find_affine_head(lin, lin, feats, max_entries=10) is None
    assert find_affine_head(lin.bfloat16(), lin, feats) is None
