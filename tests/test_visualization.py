"""Figures: headless, self-explaining (colour bars, captions, labels), saved as PNG."""

import copy
import io

import matplotlib
import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam
from matplotlib.figure import Figure
from torch import nn

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.auditing import audit
from captum_repinterp.visualization import (
    ALPHA,
    CMAP,
    attribution_to_hwc,
    compare_methods,
    plot_audit,
    plot_comparison,
    plot_images,
    plot_region,
    show_heatmap,
    to_hwc,
)


@pytest.fixture(scope="module")
def fitted(tiny):
    model, x = tiny
    return (
        RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False),
        model,
        x,
    )


def _colorbars(fig):
    return [a for a in fig.axes if a.get_label() == "<colorbar>"]


def _panels(fig):
    return [a for a in fig.axes if a.get_label() != "<colorbar>"]


def _texts(fig) -> str:
    """Every text on the figure: titles, suptitle, caption, colour-bar labels, notes."""
    parts = [t.get_text() for t in fig.texts]
    if fig._suptitle is not None:
        parts.append(fig._suptitle.get_text())
    if fig._supxlabel is not None:
        parts.append(fig._supxlabel.get_text())
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        parts += [t.get_text() for t in ax.texts]
    return "\n".join(parts)


def test_hwc_helpers():
    img = torch.arange(12.0).reshape(1, 3, 4)
    arr = to_hwc(img)
    assert arr.shape == (3, 4, 3) and arr.min() == 0 and arr.max() == 1
    attr = torch.ones(1, 2, 2)
    up = attribution_to_hwc(attr, (4, 4))
    assert up.shape == (4, 4, 1) and np.allclose(up, 1)
    with pytest.raises(ValueError, match="image"):
        to_hwc(torch.zeros(1, 1, 2, 2, 2))


def test_show_heatmap_blends_jet_over_grey():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.subplots()
    image = torch.rand(1, 8, 8)
    attr = torch.arange(16.0).reshape(1, 4, 4) - 3  # some values <= 0
    layer = show_heatmap(ax, image, attr, vmax=20.0)
    grey, heat = ax.images
    assert grey.get_cmap().name == "gray" and np.allclose(grey.get_array(), to_hwc(image)[..., 0])
    assert heat is layer and heat.get_cmap().name == CMAP and heat.get_alpha() == ALPHA
    assert heat.get_clim() == (0.0, 20.0)
    # the map is upsampled to the image and clipped at 0 (what the ReLU leaves)
    expect = np.clip(attribution_to_hwc(attr, (8, 8))[..., 0], 0, None)
    assert np.allclose(heat.get_array(), expect)
    # an all-zero map is not drawn; the panel says why
    ax2 = fig.add_subplot(2, 2, 4)
    assert show_heatmap(ax2, image, torch.zeros(1, 4, 4)) is None
    assert len(ax2.images) == 1
    assert "all values <= 0\nafter ReLU" in [t.get_text() for t in ax2.texts]


def test_panels_without_a_map_keep_the_images_colours():
    """An exemplar (no map) of a colour image is drawn in colour, so a colour cue shows;
    a grey image stays grey; under a heat map the image is grey (the map's colours)."""
    from matplotlib.figure import Figure

    fig = Figure()
    red = torch.zeros(3, 6, 6)
    red[0, :3] = 1.0  # top half red, bottom black
    ax = fig.add_subplot(1, 3, 1)
    assert show_heatmap(ax, red, None) is None
    (shown,) = ax.images
    arr = np.asarray(shown.get_array())
    assert arr.shape == (6, 6, 3)
    assert np.allclose(arr[0, 0], [1, 0, 0]) and np.allclose(arr[5, 5], [0, 0, 0])
    ax = fig.add_subplot(1, 3, 2)
    show_heatmap(ax, red[:1], None)
    (grey,) = ax.images
    assert grey.get_cmap().name == "gray" and np.asarray(grey.get_array()).ndim == 2
    ax = fig.add_subplot(1, 3, 3)
    show_heatmap(ax, red, torch.ones(1, 2, 2))
    assert ax.images[0].get_cmap().name == "gray"


def test_region_figure_explains_itself(fitted, tmp_path):
    ri, model, x = fitted
    backend = matplotlib.get_backend()
    region = ri.interpret(x[200:201])
    labels = torch.arange(300) % 4  # the tiny data's generating classes
    names = ["zero", "one", "two", "three"]
    fig = plot_region(
        region,
        x[200],
        x[:200],
        k=4,
        class_names=names,
        seed_label=int(labels[200]),
        reference_labels=labels[:200],
    )
    panels = _panels(fig)
    assert len(panels) == 5
    (cbar,) = _colorbars(fig)
    assert "RI heat (logit units)" in cbar.get_ylabel()
    text = _texts(fig)
    assert f"region of class {names[region.target]}" in text
    assert "sem. dist." in text and "logit margin" in text  # explained in the caption
    assert "at the input's 12x12 resolution" in text  # the default, "auto", chose the input
    members = region.similar(4)
    preds = ri.predictions_
    for j, ax in enumerate(panels):
        title = ax.get_title()
        if j == 0:
            assert title.startswith("seed")
            assert f"true {names[int(labels[200])]}" in title
        else:
            ref = int(members[j - 1])
            assert f"member {j} (ref #{ref})" in title
            assert f"pred {names[int(preds[ref])]} | true {names[int(labels[ref])]}" in title
            dist = float(region.member_distances[j - 1])
            assert f"sem. dist. {dist:.3g}" in title
            red = int(preds[ref]) != region.target or int(labels[ref]) != int(preds[ref])
            assert (ax.title.get_color() == "tab:red") == red
    # one colour scale: every drawn heat layer has the figure's maximum as vmax
    maps = region.heatmap(torch.cat([x[200:201], x[:200][members]]))
    top = max(float(attribution_to_hwc(m, (12, 12)).max()) for m in maps)
    for ax in panels:
        if len(ax.images) == 2:
            assert ax.images[1].get_clim() == pytest.approx((0.0, top))
    fig.savefig(tmp_path / "region.png")
    assert (tmp_path / "region.png").stat().st_size > 5000
    assert matplotlib.get_backend() == backend  # no pyplot, no backend switch
    # a map at the split layer says so
    at_layer = ri.interpret(x[200:201], heatmap_layer=None)
    assert "6x6 layer resolution, upsampled to 12x12" in _texts(
        plot_region(at_layer, x[200], x[:200], k=2)
    )


def test_region_figure_does_not_show_a_reference_seed_twice(fitted):
    ri, model, x = fitted
    with torch.no_grad():
        seed = next(i for i in range(200) if int(model(x[i : i + 1]).argmax(1)) == 1)
    region = ri.interpret(x[seed : seed + 1])
    assert int(region.similar(1)[0]) == seed  # its own nearest member
    assert len(region) >= 4
    fig = plot_region(region, x[seed], x[:200], k=3)
    titles = [ax.get_title() for ax in _panels(fig)]
    assert len(titles) == 4 and titles[0].startswith("seed")
    # the next three members, in the order of similar(), with their own distances
    shown = [int(m) for m in region.similar(4)[1:]]
    for j, (ref, title) in enumerate(zip(shown, titles[1:]), start=1):
        assert f"member {j} (ref #{ref})" in title
        assert f"sem. dist. {float(region.member_distances[j]):.3g}" in title
    assert f"The seed is reference #{seed}, not shown again." in " ".join(_texts(fig).split())
    # a held-out seed: members from the first, and no such note
    held = plot_region(ri.interpret(x[200:201]), x[200], x[:200], k=3)
    assert "not shown again" not in _texts(held)
    assert f"(ref #{int(ri.interpret(x[200:201]).similar(1)[0])})" in _panels(held)[1].get_title()


def test_comparison_figure_titles_colourbars_and_zero_panels(fitted, tmp_path):
    ri, model, x = fitted
    names = ["zero", "one", "two", "three"]
    fig, attrs = compare_methods(
        model, model.features[-1], ri, x[200:203], class_names=names, labels=[0, 1, 2]
    )
    assert set(attrs) == {"RI", "Grad-CAM", "Integrated Gradients"}
    assert attrs["Grad-CAM"].shape == (3, 1, 6, 6)
    assert attrs["RI"].shape == (3, 1, 12, 12)  # the default, "auto", chose the input here
    assert len(_panels(fig)) == 3 * 4
    labels = [c.get_xlabel() for c in _colorbars(fig)]
    zero_columns = {name for name, a in attrs.items() if not bool((a > 0).any())}
    assert len(labels) == 3 - len(zero_columns)
    if "Grad-CAM" not in zero_columns:  # the column's title names the method, not the bar
        assert "share of the panel's maximum" in labels
    assert any("per-image" in lab for lab in labels)
    text = _texts(fig)
    assert "RI, Grad-CAM and Integrated Gradients for the predicted class" in text
    assert "RI\n12x12 map" in text and "Integrated Gradients\n12x12 map" in text
    preds = model(x[200:203]).argmax(1).tolist()
    for i, ax in enumerate(_panels(fig)[::4]):
        assert f"pred {names[preds[i]]} | true {names[i]}" in ax.get_title()
    # a Grad-CAM map that is <= 0 everywhere is labelled, not left blank
    gc = attrs["Grad-CAM"].clone()
    gc[1] = 0
    fig2 = plot_comparison(x[200:203], {"Grad-CAM": gc}, titles=["a", "b", "c"])
    zero_panel = _panels(fig2)[3]
    assert "all values <= 0\nafter ReLU" in [t.get_text() for t in zero_panel.texts]
    assert "Attribution methods on the same images" in _texts(fig2)
    fig.savefig(tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="rows"):
        plot_comparison(x[:2], {"RI": attrs["RI"]})


def test_comparison_scales_each_panel_or_each_column(fitted):
    """Per panel (default), a map 1000x weaker than its neighbour's is drawn at full
    strength; per column, on the neighbour's scale (and it looks faint)."""
    _, _, x = fitted
    strong = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(0)) + 0.1
    maps = torch.cat([strong, strong * 1e-3])
    drawn = {}
    for scale in ("image", "column"):
        fig = plot_comparison(x[:2], {"RI": maps}, scale=scale)
        heat = [ax.images[-1] for ax in _panels(fig)[1::2]]
        drawn[scale] = [(float(h.get_array().max()) / h.norm.vmax) for h in heat]
        assert ("each panel scaled to its own maximum" in _texts(fig)) == (scale == "image")
    assert drawn["image"] == pytest.approx([1.0, 1.0], rel=1e-3)
    assert drawn["column"][0] == pytest.approx(1.0, rel=1e-3)
    assert drawn["column"][1] == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(ValueError, match="scale"):
        plot_comparison(x[:2], {"RI": maps}, scale="row")


def test_plot_images_and_audit_labels(fitted, tmp_path):
    ri, model, x = fitted
    region = ri.interpret(x[200:201])
    imgs = x[:3]
    fig = plot_images(
        imgs,
        ["a", "b", "c"],
        "a title",
        maps=region.heatmap(imgs),
        caption="a caption",
        bad=[True, False, False],
    )
    assert len(_colorbars(fig)) == 1 and "a title" in _texts(fig) and "a caption" in _texts(fig)
    assert _panels(fig)[0].title.get_color() == "tab:red"
    with pytest.raises(ValueError, match="titles"):
        plot_images(imgs, ["a"], "t")
    held = x[200:]
    result = audit(ri, held, target=int(ri.transform(held)[1][0]), max_regions=2, n_boundaries=15)
    ca = next(iter(result))
    labels = torch.arange(300)[200:] % 4
    n = len(ca.regions)
    fig = plot_audit(
        ca, held, n_exemplars=3, region_labels=[f"R{k + 5}" for k in range(n)], labels=labels
    )
    text = _texts(fig)
    assert "R5" in text and "region 1" not in text
    assert "mean RI heat (logit units)" in text or not _colorbars(fig)
    first = int(ca.regions[0].exemplars[0])
    assert f"#{first}\ntrue {int(labels[first])}" in text
    with pytest.raises(ValueError, match="region_labels"):
        plot_audit(ca, held, region_labels=["R1"] * (n + 1))
    fig.savefig(tmp_path / "audit.png")


# ------------------------------------------------------------ captions and the comparison's checks
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


def test_plot_region_of_a_split_layer_without_positions(fitted):
    """Split at an ``N x D`` layer (a linear layer of the head) the map at the split
    layer is one value per image (``N x 1``, as ``LayerGradCam``'s). ``plot_region``
    (and so ``captum-repinterp report --layer head.1``) failed in torch's interpolate
    ("spatial dimensions of []"); it now shows the images without a map and says why."""
    _, model, x = fitted
    ri = RepresentativeInterpretation(model, model.head[1]).fit(x[:200], progress=False)
    region = ri.interpret(x[250:251], n_boundaries=5, heatmap_layer=None)
    assert region.heatmap(x[250:252]).shape == (2, 1)
    fig = plot_region(region, x[250:251], x[:200])
    text = _texts(fig)
    assert "one value per image" in text and "heatmap_layer='input'" in text
    assert not _colorbars(fig)
    # drawn at the input, the same region has a map
    region = ri.interpret(x[250:251], n_boundaries=5, heatmap_layer="input")
    assert "at the input's 12x12 resolution" in _texts(plot_region(region, x[250:251], x[:200]))


@pytest.mark.parametrize("scale", ["image", "column"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("per_image", [(), ("M",)])
def test_comparison_refuses_maps_that_are_not_finite(scale, bad, per_image):
    """A NaN or infinite value gave a NaN/infinite colour scale for the whole column, an
    infinite map labelled 'all values <= 0', or an IndexError inside Captum."""
    images = torch.rand(3, 1, 12, 12)
    maps = torch.rand(3, 1, 12, 12)
    maps[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match=r"attributions\['M'\].*(NaN|infinite)"):
        plot_comparison(images, {"M": maps}, scale=scale, per_image=per_image)


def test_comparison_checks_titles_bad_and_empty_images():
    images, maps = torch.rand(3, 1, 12, 12), {"RI": torch.rand(3, 1, 6, 6)}
    with pytest.raises(ValueError, match="titles"):
        plot_comparison(images, maps, titles=["a"])
    with pytest.raises(ValueError, match="bad"):
        plot_comparison(images, maps, bad=[True])
    with pytest.raises(ValueError, match="images"):
        plot_comparison(images[:0], {"RI": maps["RI"][:0]})
    plot_comparison(images, maps, titles=["a", "b", "c"], bad=[False, True, False])


# ------------------------------------------------------------ found by trying to break them
def test_class_names_are_shown_as_written_and_long_ones_wrapped(fitted):
    """A ``$`` in a name switched matplotlib to math text ("a$b$" read "ab", in italics);
    an 80-character name ran across the neighbouring panels and off the figure."""
    ri, _model, x = fitted
    region = ri.interpret(x[200:201])
    long = "x" * 80
    names = ["a$b$", "c_d", "été", long, "a$b$"]
    names[region.target] = "a$b$"
    fig = plot_region(region, x[200], x[:200], k=2, class_names=names)
    fig.savefig(io.BytesIO(), format="png")
    assert "class a\\$b\\$" in fig._suptitle.get_text()
    seed_title = _panels(fig)[0].get_title()
    assert "pred a\\$b\\$" in seed_title  # the seed is predicted as the region's class
    images = x[:2]
    fig = plot_comparison(
        images, {"a$b$": torch.rand(2, 1, 3, 3)}, titles=[f"true {long}", "$x$"], panel_size=1.6
    )
    titles = [ax.get_title() for ax in _panels(fig)]
    assert "a\\$b\\$" in titles[1] and "\\$x\\$" in titles[2]  # rows: image, method
    assert all(len(line) <= 30 for t in titles for line in t.split("\n"))
    assert long in titles[0].replace("\n", "")


def test_comparison_refuses_maps_that_are_not_tensors_and_checks_per_image():
    images = torch.rand(2, 1, 12, 12)
    with pytest.raises(TypeError, match="attributions"):
        plot_comparison(images, [torch.rand(2, 1, 6, 6)])
    with pytest.raises(TypeError, match=r"attributions\['M'\]"):
        plot_comparison(images, {"M": np.random.rand(2, 1, 6, 6)})
    with pytest.raises(ValueError, match=r"attributions\['M'\].*N x c x h x w"):
        plot_comparison(images, {"M": torch.rand(2, 6)})
    # a name of per_image that is no method is a typo: IG would be drawn as a ReLU'd map
    with pytest.raises(ValueError, match="per_image"):
        plot_comparison(images, {"IG": torch.rand(2, 1, 6, 6)}, per_image=("Integrated",))
    # a string is one name, not its letters ("I" in "IG")
    fig = plot_comparison(
        images, {"I": torch.rand(2, 1, 6, 6), "IG": torch.randn(2, 1, 12, 12)}, per_image="IG"
    )
    assert "share of the panel's maximum" in _texts(fig)
    with pytest.raises(TypeError, match="images"):
        plot_comparison(images.numpy(), {"M": torch.rand(2, 1, 6, 6)})
    with pytest.raises(ValueError, match="panel_size"):
        plot_comparison(images, {"M": torch.rand(2, 1, 6, 6)}, panel_size=-1)


def test_plot_images_and_show_heatmap_check_their_maps():
    """plot_images took maps of another batch size (IndexError, or rows silently
    dropped) and NaN maps (a NaN map was labelled 'all values <= 0')."""
    images = torch.rand(2, 3, 12, 12)
    for maps in (torch.rand(1, 1, 6, 6), torch.rand(3, 1, 6, 6)):
        with pytest.raises(ValueError, match="maps.*rows"):
            plot_images(images, ["a", "b"], "t", maps=maps)
    nan = torch.rand(2, 1, 6, 6)
    nan[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="maps.*NaN"):
        plot_images(images, ["a", "b"], "t", maps=nan)
    with pytest.raises(ValueError, match="images.*NaN"):
        plot_images(images * float("nan"), ["a", "b"], "t")
    with pytest.raises(TypeError, match="images"):
        plot_images(images.numpy(), ["a", "b"], "t")
    fig = matplotlib.figure.Figure()
    ax = fig.subplots()
    with pytest.raises(ValueError, match="attr.*NaN"):
        show_heatmap(ax, images[0], nan[0])
    with pytest.raises(ValueError, match="attr"):
        show_heatmap(ax, images[0], torch.rand(6))
    with pytest.raises(TypeError, match="attr"):
        show_heatmap(ax, images[0], np.random.rand(1, 6, 6))


def test_compare_methods_leaves_a_training_model_as_it_was(fitted):
    """Grad-CAM, IG and the predictions ran the model in training mode: a batch-norm
    model's running statistics were updated by drawing a figure (and its predictions
    differed from RI's, which runs in eval mode)."""
    ri, model, x = fitted
    model = copy.deepcopy(model)  # not the module's shared fixture
    bn = nn.Sequential(model, nn.Unflatten(1, (1, 4)), nn.BatchNorm1d(1), nn.Flatten())
    bn.train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    ri_bn = RepresentativeInterpretation(bn.eval(), model.features[-1]).fit(x[:60], progress=False)
    bn.train()
    with pytest.warns(UserWarning, match="training mode"):
        compare_methods(bn, model.features[-1], ri_bn, x[200:203])
    assert bn.training and all(m.training for m in bn.modules())
    after = bn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compare_methods_checks_its_arguments(fitted):
    ri, model, x = fitted
    with pytest.raises(ValueError, match="labels"):
        compare_methods(model, model.features[-1], ri, x[200:204], labels=[0, 1])
    with pytest.raises(ValueError, match="images"):
        compare_methods(model, model.features[-1], ri, x[:0])
    with pytest.raises(TypeError, match="layer"):
        compare_methods(model, "features", ri, x[200:202])
    with pytest.raises(TypeError, match="model"):
        compare_methods(None, model.features[-1], ri, x[200:202])
    # a layer without positions is named (it failed later on 'attributions' the user
    # never passed), the split layer's by the RI maps it gives
    with pytest.raises(ValueError, match="layer: its output has no spatial positions"):
        compare_methods(model, model.head[2], ri, x[200:202])
    flat = RepresentativeInterpretation(model, model.head[2]).fit(x[:200], progress=False)
    with pytest.raises(ValueError, match="ri: its maps have no spatial positions"):
        compare_methods(model, model.features[-1], flat, x[200:202], heatmap_layer=None)


def test_plot_region_and_audit_check_their_arguments(fitted):
    ri, _model, x = fitted
    region = ri.interpret(x[200:201])
    with pytest.raises(TypeError, match="interpretation"):
        plot_region("region", x[200], x[:200])
    with pytest.raises(ValueError, match="panel_size"):
        plot_region(region, x[200], x[:200], panel_size=0)
    # a seed in another float dtype is compared and drawn as the references
    fig = plot_region(region, x[200].double(), x[:200], k=2)
    assert len(_panels(fig)) == 3
    result = audit(ri, x[200:], target=int(ri.transform(x[200:201])[1][0]), max_regions=1)
    ca = next(iter(result))
    # uint8 images: the mean image of a group failed inside torch
    as_bytes = (x[200:] * 40 + 128).clamp(0, 255).to(torch.uint8)
    assert len(_panels(plot_audit(ca, as_bytes, n_exemplars=2))) >= 3
    with pytest.raises(ValueError, match="panel_size"):
        plot_audit(ca, x[200:], panel_size=float("nan"))


def test_compare_methods_passes_additional_forward_args_to_every_method():
    # a model with a per-example extra argument: it went to RI only, and Grad-CAM's
    # call of the model then failed with the model's own TypeError
    torchvision = pytest.importorskip("torchvision")

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torchvision.models.resnet18(weights=None, num_classes=3)

        def forward(self, x, scale):
            return self.net(x * scale[:, :, None, None])  # enters before the layer

    torch.manual_seed(0)
    model = Scaled().eval()
    x = torch.rand(16, 3, 32, 32)
    scale = torch.linspace(0.5, 2.0, 16)[:, None]
    layer = model.net.layer4
    ri = RepresentativeInterpretation(model, layer)
    ri.fit(x, additional_forward_args=(scale,), progress=False)
    extra = (scale[:3],)
    fig, attrs = compare_methods(
        model, layer, ri, x[:3], additional_forward_args=extra, heatmap_layer=None
    )
    assert isinstance(fig, Figure)
    target = model(x[:3], *extra).argmax(1)
    gc = LayerGradCam(model, layer).attribute(
        x[:3], target=target, additional_forward_args=extra, relu_attributions=True
    )
    torch.testing.assert_close(attrs["Grad-CAM"], gc)
    ri_maps = ri.attribute(x[:3], additional_forward_args=extra, heatmap_layer=None)
    torch.testing.assert_close(attrs["RI"], ri_maps)
    assert attrs["Integrated Gradients"].shape == x[:3].shape
