"""Figures: headless, built on Captum's visualisation, saved as PNG."""

import matplotlib
import numpy as np
import pytest
import torch

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.visualization import (
    attribution_to_hwc,
    compare_methods,
    plot_comparison,
    plot_region,
    to_hwc,
)


@pytest.fixture(scope="module")
def fitted(tiny):
    model, x = tiny
    return RepresentativeInterpretation(model, model.features[-1]).fit(
        x[:200], progress=False
    ), model, x


def test_hwc_helpers():
    img = torch.arange(12.0).reshape(1, 3, 4)
    arr = to_hwc(img)
    assert arr.shape == (3, 4, 3) and arr.min() == 0 and arr.max() == 1
    attr = torch.ones(1, 2, 2)
    up = attribution_to_hwc(attr, (4, 4))
    assert up.shape == (4, 4, 1) and np.allclose(up, 1)
    with pytest.raises(ValueError, match="image"):
        to_hwc(torch.zeros(1, 1, 2, 2, 2))


def test_region_and_comparison_figures(fitted, tmp_path):
    ri, model, x = fitted
    backend = matplotlib.get_backend()
    region = ri.interpret(x[200:201])
    fig = plot_region(region, x[200], x[:200], k=4)
    assert len(fig.axes) == 5
    fig.savefig(tmp_path / "region.png")
    fig2, attrs = compare_methods(model, model.features[-1], ri, x[200:203])
    assert set(attrs) == {"RI", "Grad-CAM", "Integrated Gradients"}
    assert attrs["RI"].shape == attrs["Grad-CAM"].shape == (3, 1, 6, 6)
    assert len(fig2.axes) == 3 * 4
    fig2.savefig(tmp_path / "cmp.png")
    for name in ("region.png", "cmp.png"):
        assert (tmp_path / name).stat().st_size > 5000
    assert matplotlib.get_backend() == backend  # no pyplot, no backend switch
    with pytest.raises(ValueError, match="rows"):
        plot_comparison(x[:2], {"RI": attrs["RI"]})
