"""find_layer, check_cut, fit and attribute across torchvision's CNN families.

Each family is built with ``weights=None`` at 64x64 with its last linear map re-drawn
so that random references spread over the classes (``benchmarks/sweep.py``, which also
prints the table of the documentation). The picked layer must be a cut, the maps must be
shaped like ``LayerGradCam``'s, and only the families whose classifier is not piecewise
linear (MobileNet V3: Hardswish, ConvNeXt: LayerNorm) may warn.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep.py"
_spec = importlib.util.spec_from_file_location("_repinterp_sweep", _PATH)
sweep = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sweep  # dataclasses look their module up by name
_spec.loader.exec_module(sweep)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

#: The block output each family is split at: the last cut whose head is piecewise linear
#: (for MobileNet V3 and ConvNeXt the last cut; their classifiers are curved anyway).
EXPECTED_LAYER = {
    "resnet18": "layer4",
    "resnext50_32x4d": "layer4",
    "wide_resnet50_2": "layer4",
    "densenet121": "features",
    "mobilenet_v2": "features",
    "mobilenet_v3_small": "features",
    "efficientnet_b0": "features",
    "regnet_y_400mf": "trunk_output",
    "shufflenet_v2_x0_5": "conv5",
    "vgg11": "features",
    "vgg11_bn": "features",
    "googlenet": "inception5b",
    # the class-score maps (1x1 conv + ReLU) before the global pooling
    "squeezenet1_1": "classifier.2",
    "mnasnet0_5": "layers",
    "convnext_tiny": "features",
}

#: The families whose head after that layer is affine on these references (pooling,
#: dropout, Linear; SqueezeNet's ReLU runs before its layer's output), so the regions are
#: exact. MobileNet V3's Hardswish is curved, but its inputs on these random-weight
#: references are below 4e-9 (measured), where it is linear to float precision, so the
#: check at every reference finds the head affine there (and the trace still warns).
EXACT = {
    "mobilenet_v3_small",
    "squeezenet1_1",
    "resnet18",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "mobilenet_v2",
    "efficientnet_b0",
    "regnet_y_400mf",
    "shufflenet_v2_x0_5",
    "googlenet",
    "mnasnet0_5",
}

CURVED_OP = {"mobilenet_v3_small": "Hardswish", "convnext_tiny": "layer_norm"}


@pytest.mark.parametrize(
    "family, arch, kwargs, size", sweep.FAMILIES, ids=[f[1] for f in sweep.FAMILIES]
)
def test_family(family, arch, kwargs, size):
    row = sweep.run_family(family, arch, kwargs, size, n_references=40, n_seeds=2)
    assert row.layer == EXPECTED_LAYER[arch]
    assert row.is_cut, f"{arch}: {row.layer} is not a cut (error/scale {row.cut_error:.3g})"
    assert row.cut_error <= 1e-5
    assert row.shape_ok
    assert row.classes >= 5  # the re-drawn last layer spreads the references
    assert len(row.purities) == 2 and all(0.0 <= p <= 1.0 for p in row.purities)
    # an affine head's regions are built from its exact class boundaries: pure
    assert row.exact == (arch in EXACT)
    if row.exact:
        assert row.purities == (1.0, 1.0)
    assert row.coverage > 0.0
    if arch in CURVED_OP:
        assert row.curved_head and any(CURVED_OP[arch] in op for op in row.head_ops)
    else:
        assert not row.curved_head and row.head_ops == ()


def test_spread_classes_recentres_the_last_linear_map():
    model = sweep.build("resnet18", {})
    x = torch.randn(30, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    sweep.spread_classes(model, x)
    with torch.no_grad():
        logits = model(x)
    # bias centred on the mean logits, weights scaled to a logit spread of 4
    torch.testing.assert_close(logits.mean(0), torch.zeros(10), atol=1e-4, rtol=0)
    assert float((logits - logits.mean(0)).std()) == pytest.approx(4.0, rel=1e-3)
    assert logits.argmax(1).unique().numel() >= 5
