"""Regression tests for maps drawn at the input (``heatmap_layer="input"``) and ``"auto"``:
integer inputs, empty batches, an ignored input, audit and plot_region with the default."""

import pytest
import torch
from torch import nn

from captum_repinterp import RepresentativeInterpretation


class _IntegerInput(nn.Module):
    """The tiny CNN on integer images (e.g. quantised pixels), scaled inside the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float() / 10)


@pytest.fixture(scope="module")
def fitted(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    return model, x, ri


@pytest.fixture(scope="module")
def three_channels():
    from conftest import TinyCNN

    torch.manual_seed(0)
    model = TinyCNN(in_ch=3).eval()
    x = torch.randn(200, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x, progress=False)
    return x, ri


def test_input_maps_of_integer_inputs_name_heatmap_layer(tiny):
    model, x = tiny
    wrapped = _IntegerInput(model).eval()
    xi = (x[:200] * 10).round().to(torch.int64)
    ri = RepresentativeInterpretation(wrapped, model.features[-1]).fit(xi, progress=False)
    for call in (
        lambda: ri.attribute(xi[:2], heatmap_layer="input", n_boundaries=5),
        lambda: ri.interpret(xi[:1], heatmap_layer="input", n_boundaries=5),
    ):
        with pytest.raises(TypeError, match="heatmap_layer.*floating"):
            call()
    # "auto" (the default) keeps the split layer for integer references, with the reason
    with pytest.warns(UserWarning, match="torch.int64 images"):
        assert ri.attribute(xi[:2], n_boundaries=5).shape == (2, 1, 6, 6)


@pytest.mark.parametrize("summed", [True, False])
def test_empty_batch_at_the_input_is_shaped_like_a_full_one(three_channels, summed):
    x, ri = three_channels
    full = ri.attribute(x[:2], heatmap_layer="input", n_boundaries=5, attr_dim_summation=summed)
    empty = ri.attribute(x[:0], heatmap_layer="input", attr_dim_summation=summed)
    assert full.shape == (2, 1 if summed else 3, 12, 12)
    assert empty.shape == (0, *full.shape[1:]) and empty.dtype == full.dtype


def test_empty_batch_at_the_input_of_a_vector_model():
    torch.manual_seed(3)
    mlp = nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    ).eval()
    x = 3 * torch.randn(200, 10, generator=torch.Generator().manual_seed(0))
    ri = RepresentativeInterpretation(mlp, mlp[3]).fit(x, progress=False)
    full = ri.attribute(x[:2], heatmap_layer="input", n_boundaries=5)
    assert full.shape == (2, 1)  # input times gradient summed over the D features
    assert ri.attribute(x[:0], heatmap_layer="input").shape == (0, 1)


def test_empty_batch_at_the_input_keeps_float64(tiny):
    model, x = tiny
    m64 = type(model)().double().eval()
    m64.load_state_dict(model.state_dict())
    ri = RepresentativeInterpretation(m64, m64.features[-1]).fit(x[:200].double(), progress=False)
    full = ri.attribute(x[:1].double(), heatmap_layer="input", n_boundaries=5)
    empty = ri.attribute(x[:0].double(), heatmap_layer="input")
    assert full.dtype == empty.dtype == torch.float64


@pytest.mark.parametrize("heatmap_layer", ["input", None])
@pytest.mark.parametrize("rule", ["elementwise-members", "elementwise", "region-members"])
def test_interpretation_heatmap_on_an_empty_batch(fitted, heatmap_layer, rule):
    _, x, ri = fitted
    if heatmap_layer == "input" and rule == "region-members":
        pytest.skip("region-members is drawn at the split layer only")
    region = ri.interpret(
        x[250:251], heatmap_layer=heatmap_layer, heatmap_rule=rule, n_boundaries=5
    )
    full = region.heatmap(x[250:252])
    empty = region.heatmap(x[:0])
    assert empty.shape == (0, *full.shape[1:]) and empty.dtype == full.dtype
    # and as attribute() gives on an empty batch
    got = ri.attribute(x[:0], heatmap_layer=heatmap_layer, heatmap_rule=rule)
    assert got.shape == empty.shape


def test_interpretation_heatmap_on_an_empty_batch_at_an_earlier_layer(fitted):
    model, x, ri = fitted
    region = ri.interpret(x[250:251], heatmap_layer=model.features[0], n_boundaries=5)
    assert region.heatmap(x[250:252]).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="empty batch"):
        region.heatmap(x[:0])


def test_audit_takes_interprets_default_heatmap_layer(fitted):
    from captum_repinterp.auditing import audit

    _, x, ri = fitted
    kwargs = dict(target=0, max_regions=1, n_boundaries=5, subgroup_by="none")
    left_out = audit(ri, x[:200], **kwargs)
    auto = audit(ri, x[:200], heatmap_layer="auto", **kwargs)
    assert [r.interpretation.members.tolist() for r in auto[0].regions] == [
        r.interpretation.members.tolist() for r in left_out[0].regions
    ]
    assert all(r.interpretation.heatmap_layer is None for r in auto[0].regions)
    with pytest.raises(ValueError, match="^heatmap_layer"):
        audit(ri, x[:200], heatmap_layer="input", **kwargs)


def test_plot_region_caption_of_a_full_resolution_split_layer(tiny):
    import matplotlib

    matplotlib.use("Agg")
    from captum_repinterp.visualization import plot_region

    _, x = tiny
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 3)
    ).eval()
    ri = RepresentativeInterpretation(model, model[1]).fit(x[:200], progress=False)
    texts = {}
    for layer in (None, "input"):
        region = ri.interpret(x[250:251], n_boundaries=5, heatmap_layer=layer)
        fig = plot_region(region, x[250:251], x[:200])
        texts[layer] = " ".join(t.get_text() for t in fig.texts)
    # the split layer keeps the 12 x 12 size of the images: drawn there, not at the input
    assert "12x12 layer resolution" in texts[None] and "input's" not in texts[None]
    assert "at the input's 12x12 resolution" in texts["input"]


def test_input_maps_of_an_input_the_model_ignores_say_so(tiny):
    class Ignores(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.model(a)

    model, x = tiny
    y = torch.randn_like(x)
    wrapped = Ignores(model).eval()
    ri = RepresentativeInterpretation(wrapped, model.features[-1])
    ri.fit((x[:200], y[:200]), progress=False)
    with pytest.raises(ValueError, match="heatmap_layer='input'.*every input tensor"):
        ri.attribute((x[:2], y[:2]), heatmap_layer="input", n_boundaries=5)
