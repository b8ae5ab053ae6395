"""The per-seed stages on a GPU (skipped without one)."""

import pytest
import torch
from torch import nn

from captum_repinterp import RepresentativeInterpretation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(affine_head: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    if affine_head:
        layers += [nn.Linear(32, 5)]
    else:
        layers += [nn.Linear(32, 40), nn.ReLU(), nn.Linear(40, 5)]
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("affine_head", [False, True])
def test_same_regions_on_cpu_and_cuda(affine_head):
    model = _model(affine_head)
    x = torch.randn(150, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model[-1].bias.copy_(-(model(x) - model[-1].bias).mean(0))
    regions = {}
    for device in ("cpu", "cuda"):
        m = model.to(device)
        ri = RepresentativeInterpretation(m, m[1]).fit(x[:120].to(device), progress=False)
        assert (ri.references_.affine is not None) == affine_head
        regions[device] = ri.interpret(x[120:124].to(device))
    for a, b in zip(regions["cpu"], regions["cuda"]):
        assert a.target == b.target
        assert abs(a.purity - b.purity) <= 0.05
        if affine_head:
            assert a.purity == b.purity == 1.0
