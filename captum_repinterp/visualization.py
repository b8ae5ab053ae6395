"""Figures that explain themselves, headless-safe, built on matplotlib and Captum.

Every ``plot_*`` function returns a ``matplotlib.figure.Figure`` created without pyplot
(so nothing needs a display and no global figure state is touched), and
:func:`compare_methods` returns one with the attributions; save it with
``fig.savefig(path)``. Every figure has a one-line title, a caption under the panels,
a colour bar saying what its colours measure when it draws heat maps (``plot_audit``
with ``scale="row"`` gives each row's maximum in its title instead), and the predicted
(and, when given, the true) class on its image panels.

Heat maps are upsampled with Captum's ``LayerAttribution.interpolate`` and drawn the way
pytorch-grad-cam's ``show_cam_on_image`` draws them: a jet colour map blended half and
half over the grey-scale image, so that the hot spots read at a glance and the image
stays visible. Panels without a map (exemplars, seeds) show the image in its own colours,
so that a colour cue the model may use stays visible. The maps of one region (the region
figure, an audit's row) share one colour scale, in the map's own units, so panels can be
compared; in the side-by-side comparison each panel is scaled to its own maximum by
default (its rows can come from different regions, whose maps differ by orders of
magnitude), or per column on request; input attributions (Integrated Gradients) go
through ``captum.attr.visualization.visualize_image_attr``, which scales each image on
its own (Captum's 2% outlier clipping).

Images are shown stretched to their own minimum and maximum (all channels together, see
:func:`to_hwc`): images normalised ImageNet-style (negative values), uint8 images and
images in [0, 1] all show as the picture they hold, with its contrast stretched; only
three-channel images are drawn in colour, others (1, 4, ... channels) in grey (their
channel mean). Class names, titles and labels are drawn as written (a ``$`` does not
start math text) and wrapped to the panel's width. Images and maps must be tensors
holding no NaN or infinite value.
"""

from __future__ import annotations

import math
import numbers
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
from captum.attr import visualization as viz
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ._captum_compat import _format_additional_forward_args
from .features import in_eval_mode
from .inputs import check_against_references, reads_in_order, reference_rows
from .interpretation import Interpretation

__all__ = [
    "CMAP",
    "SEM_DIST",
    "to_hwc",
    "attribution_to_hwc",
    "show_heatmap",
    "plot_region",
    "plot_images",
    "plot_comparison",
    "compare_methods",
    "plot_audit",
]

#: Colour map of every heat map (the one pytorch-grad-cam's ``show_cam_on_image`` uses).
CMAP = "jet"
#: Weight of the heat map in the blend (``show_cam_on_image`` uses 0.5 too).
ALPHA = 0.5
#: What "sem. dist." under a member means (written in each region figure's caption).
SEM_DIST = (
    "sem. dist. = semantic distance to the seed: the sum over the region's boundaries of "
    "the change in logit margin (logits)"
)
_ZERO = "all values <= 0\nafter ReLU"
_BAD = "tab:red"


def to_hwc(image: Tensor) -> np.ndarray:
    """A ``C x H x W`` (or ``H x W``) image tensor as an ``H x W x C`` array in [0, 1].

    The image is stretched to its own minimum and maximum over all channels (one
    affine map, so colours keep their balance): normalised (ImageNet-style, negative
    values), uint8 and [0, 1] images of one picture give the same array up to that
    stretch; a constant image gives zeros. One channel is repeated to three.
    """
    img = image.detach().cpu().double()
    if img.dim() == 2:
        img = img[None]
    if img.dim() != 3:
        raise ValueError(f"image must be C x H x W or H x W, got shape {tuple(image.shape)}")
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
    arr = img.permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr


def attribution_to_hwc(attr: Tensor, size: tuple[int, int]) -> np.ndarray:
    """One example's attribution (``c x h x w``) upsampled to ``size``, as ``H x W x 1``."""
    a = attr.detach().cpu().double()
    if a.dim() == 2:
        a = a[None]
    if a.shape[-2:] != tuple(size):
        a = LayerAttribution.interpolate(a[None], tuple(size), "bilinear")[0]
    return a.sum(dim=0, keepdim=True).permute(1, 2, 0).numpy()


def _resolution(attr: Tensor) -> str:
    """``"h x w"`` of one example's (or a batch's) map."""
    h, w = attr.shape[-2:]
    return f"{h}x{w}"


def _where(maps: Tensor, images: Tensor, at_input: bool) -> str:
    """Where a map was drawn, for a caption: at the input or at a layer (upsampled when
    coarser than the images)."""
    if at_input:
        return f"at the input's {_resolution(images)} resolution"
    if tuple(maps.shape[-2:]) == tuple(images.shape[-2:]):
        return f"at {_resolution(maps)} layer resolution"
    return f"at {_resolution(maps)} layer resolution, upsampled to {_resolution(images)}"


def _name(c: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= c < len(class_names):
        return str(class_names[c])
    return str(c)


def _label(
    pred: int | None, true: int | None, class_names: Sequence[str] | None
) -> tuple[str, bool]:
    """``"pred 7 | true 1"`` and whether the two differ (drawn in red then)."""
    parts = []
    if pred is not None:
        parts.append(f"pred {_name(pred, class_names)}")
    if true is not None:
        parts.append(f"true {_name(true, class_names)}")
    return " | ".join(parts), pred is not None and true is not None and pred != true


def _caption(fig: Figure, text: str) -> None:
    """A caption under the panels, wrapped to the figure's width, drawn as written."""
    width = max(40, int(fig.get_figwidth() * 19))
    lines = [textwrap.fill(part, width) for part in text.split("\n")]
    fig.supxlabel(_plain("\n".join(lines)), fontsize=6)


def _blank(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _plain(text: Any) -> str:
    """``text`` drawn as written: matplotlib reads a pair of ``$`` as math text."""
    return str(text).replace("$", r"\$")


def _panel_text(text: str, panel_size: float) -> str:
    """A panel's title wrapped to the panel's width (at font size 7) and drawn as
    written; a long class name ran across the neighbouring panels."""
    width = max(12, int(panel_size * 16))
    lines = [textwrap.fill(line, width, break_on_hyphens=False) for line in text.split("\n")]
    return _plain("\n".join(lines))


def _check_panel_size(panel_size: Any) -> float:
    if (
        isinstance(panel_size, bool)
        or not isinstance(panel_size, numbers.Real)
        or not math.isfinite(panel_size)
        or panel_size <= 0
    ):
        raise ValueError(f"panel_size must be a positive number of inches, got {panel_size!r}")
    return float(panel_size)


def _check_images(images: Any, name: str = "images") -> Tensor:
    """A non-empty ``N x C x H x W`` (or ``N x H x W``) tensor with finite values."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a tensor (N x C x H x W), got {type(images).__name__}")
    if images.dim() not in (3, 4):
        raise ValueError(f"{name} must be N x C x H x W, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} has NaN or infinite values")
    return images


def _check_maps(maps: Any, n: int, name: str) -> Tensor:
    """``N x c x h x w`` (or ``N x h x w``) maps, one per image, with finite values."""
    if not isinstance(maps, Tensor):
        raise TypeError(f"{name} must be a tensor (N x c x h x w), got {type(maps).__name__}")
    if maps.dim() not in (3, 4):
        raise ValueError(f"{name} must be N x c x h x w, got shape {tuple(maps.shape)}")
    if maps.shape[0] != n:
        raise ValueError(f"{name} has {maps.shape[0]} rows for {n} images")
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"{name} has NaN or infinite values")
    return maps


def _aspect(images: Tensor) -> float:
    """Height over width of the images, bounded (a panel's height per inch of width)."""
    h, w = images.shape[-2:]
    return min(max(h / w, 0.25), 4.0)


def show_heatmap(ax: Any, image: Tensor, attr: Tensor | None, vmax: float | None = None) -> Any:
    """Draw ``attr`` (``c x h x w``, any resolution) blended over the grey ``image``;
    with ``attr=None`` the image alone, in its own colours.

    The map is upsampled to the image (bilinear), coloured with :data:`CMAP` on
    ``[0, vmax]`` (default: its own maximum) and blended with weight :data:`ALPHA` over
    the image's grey levels, like pytorch-grad-cam's ``show_cam_on_image``. A map whose
    values are all ``<= 0`` (nothing left after the ReLU) is not drawn: the panel shows
    the image and says so.

    Returns
    -------
    matplotlib.image.AxesImage or None
        The heat-map layer (for a colour bar), None when nothing was drawn.

    Raises
    ------
    TypeError, ValueError
        For an ``image`` or ``attr`` that is not a tensor, is not ``c x h x w`` or
        ``h x w``, or holds NaN or infinite values.
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a tensor (C x H x W), got {type(image).__name__}")
    if attr is not None:
        if not isinstance(attr, Tensor):
            raise TypeError(f"attr must be a tensor (c x h x w), got {type(attr).__name__}")
        if attr.dim() not in (2, 3):
            raise ValueError(f"attr must be c x h x w or h x w, got shape {tuple(attr.shape)}")
        if not bool(torch.isfinite(attr).all()):
            raise ValueError("attr has NaN or infinite values")
    img = to_hwc(image)
    _blank(ax)
    if attr is None:  # the image itself, in its own colours (a colour shortcut shows)
        if image.dim() == 3 and image.shape[0] == 3:
            ax.imshow(img)
        else:
            ax.imshow(img.mean(axis=2), cmap="gray", vmin=0, vmax=1)
        return None
    ax.imshow(img.mean(axis=2), cmap="gray", vmin=0, vmax=1)
    heat = attribution_to_hwc(attr, img.shape[:2])[..., 0]
    top = float(heat.max()) if vmax is None else float(vmax)
    if not np.any(heat > 0) or top <= 0:
        ax.text(
            0.5,
            0.5,
            _ZERO,
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=6,
            color="black",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"},
        )
        return None
    return ax.imshow(np.clip(heat, 0, None), cmap=CMAP, vmin=0, vmax=top, alpha=ALPHA)


def _keep(current: Any, new: Any) -> Any:
    """The first heat-map layer drawn (the colour bar's source)."""
    return new if current is None else current


def _layer_maps(maps: Tensor | tuple[Tensor, ...]) -> Tensor:
    return maps[0] if isinstance(maps, tuple) else maps


def _shared_max(images: Tensor, maps: Tensor) -> float:
    size = tuple(images.shape[-2:])
    return max(float(attribution_to_hwc(m, size).max()) for m in maps)


def _predict(interpretation: Interpretation, images: Tensor) -> list[int] | None:
    reader = interpretation.reader
    if reader is None:
        return None
    return [int(p) for p in reader.features(images)[1]]


def _reference_rows(references: Any, indices: Tensor) -> Tensor:
    """Rows ``indices`` of a reference tensor, Dataset or DataLoader (its dataset)."""
    dataset = references.dataset if isinstance(references, DataLoader) else references
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "reference_images: an iterable-style dataset has no random access, so member "
            "indices cannot be mapped to images; pass the reference images as a tensor"
        )
    if isinstance(references, DataLoader) and references.batch_sampler is None:
        raise ValueError(
            "reference_images: this DataLoader does not batch (batch_size=None), so each "
            "item of its dataset holds several references and member indices cannot be "
            "mapped to items; pass the reference images as a tensor"
        )
    if isinstance(references, DataLoader) and not reads_in_order(references):
        raise ValueError(
            "reference_images: this DataLoader does not read its dataset in order "
            "(shuffle=True or a sampler), so member indices cannot be mapped to images; "
            "fit on a DataLoader without shuffling"
        )
    if not isinstance(references, (Tensor, Dataset, DataLoader)):
        raise TypeError(
            "reference_images must be the Tensor, Dataset or DataLoader given to fit, got "
            f"{type(references).__name__}"
        )
    n = len(references.dataset if isinstance(references, DataLoader) else references)
    if len(indices) and int(indices.max()) >= n:
        raise ValueError(
            f"reference_images: the region has member #{int(indices.max())}, but only {n} "
            "reference images were given; pass the reference set given to fit"
        )
    return reference_rows(references, indices, "reference_images")


def plot_region(
    interpretation: Interpretation,
    seed_image: Tensor,
    reference_images: Tensor | Dataset | DataLoader,
    k: int = 5,
    class_names: Sequence[str] | None = None,
    panel_size: float = 1.8,
    seed_label: int | None = None,
    reference_labels: Tensor | None = None,
    title: str | None = None,
) -> Figure:
    """The paper's figure: the seed and its ``k`` nearest region members, one shared map.

    Each panel shows the image under the region's heat map (one colour scale for the whole
    figure, see the colour bar), its predicted class and, when labels are given, its true
    class (in red when the two differ), and for members their reference index and
    semantic distance to the seed.

    Parameters
    ----------
    interpretation : Interpretation
        From ``ri.interpret(seed)`` (needs its reader to compute activations).
    seed_image : Tensor
        ``C x H x W`` or ``1 x C x H x W``.
    reference_images : Tensor, Dataset or DataLoader
        The reference set given to ``fit`` (indexed by ``interpretation.members``; a
        DataLoader's ``dataset``, items ``(image, label, ...)`` give the image). Rows
        are read by index, so a shuffled DataLoader, one without batching
        (``batch_size=None``) and an iterable-style dataset are refused: pass the
        images as a tensor then.
    k : int
        Number of members to show, nearest by semantic distance first. A seed that is
        itself a reference (the same image) is not shown again as a member; the caption
        gives its index.
    class_names : sequence of str, optional
        Names shown instead of class indices.
    panel_size : float
        Inches per panel.
    seed_label : int, optional
        The seed's true class.
    reference_labels : Tensor, optional
        True classes of the references.
    title : str, optional
        First line of the title (default: ``"region of class <name>"``).
    """
    if not isinstance(interpretation, Interpretation):
        raise TypeError(
            "interpretation must be an Interpretation (from ri.interpret(seed)), got "
            f"{type(interpretation).__name__}"
        )
    panel_size = _check_panel_size(panel_size)
    interpretation.similar(k)  # checks k
    members = torch.as_tensor(interpretation.similar(k + 1))
    rows = _reference_rows(reference_images, members)
    if not isinstance(seed_image, Tensor):
        raise TypeError(f"seed_image must be a tensor, got {type(seed_image).__name__}")
    if seed_image.dim() == rows.dim():
        if seed_image.shape[0] != 1:
            raise ValueError(
                f"seed_image: one image (C x H x W or 1 x C x H x W), got a batch of "
                f"{seed_image.shape[0]}"
            )
        seed_image = seed_image[0]
    if seed_image.shape != rows.shape[1:]:
        raise ValueError(
            f"seed_image: shape {tuple(seed_image.shape)}, but the reference images are "
            f"{tuple(rows.shape[1:])}; pass the seed as given to interpret (x[0] or x[:1])"
        )
    if seed_image.is_floating_point() and rows.is_floating_point():
        seed_image = seed_image.to(rows.device, rows.dtype)  # drawn in one batch with them
    # a seed taken from the references is its own nearest member: not shown twice
    is_seed = (rows == seed_image.to(rows.device, rows.dtype)).flatten(1).all(1)
    shown = torch.nonzero(~is_seed.cpu()).flatten()[:k]
    seed_ref = [int(m) for m in members[is_seed.cpu()]]
    members, rows = members[shown], rows[shown.to(rows.device)]
    dists = interpretation.member_distances[shown]
    if (
        reference_labels is not None
        and len(members)
        and len(reference_labels) <= int(members.max())
    ):
        raise ValueError(
            f"reference_labels: {len(reference_labels)} labels, but the region has member "
            f"#{int(members.max())}; pass one label per reference image given to fit"
        )
    images = torch.cat([seed_image[None], rows])
    maps = _layer_maps(interpretation.heatmap(images))
    name = _name(interpretation.target, class_names)
    preds = _predict(interpretation, images)
    # an N x D split layer gives one value per image (N x 1): no positions to draw
    spatial = maps.dim() >= 3
    vmax = _shared_max(images, maps) if spatial else None
    fig = Figure(
        figsize=(panel_size * images.shape[0] + 1.2, panel_size * (_aspect(images) + 0.8)),
        layout="constrained",
    )
    axes = fig.subplots(1, images.shape[0], squeeze=False)[0]
    mappable = None
    for j, ax in enumerate(axes):
        true = None
        if j == 0:
            true = seed_label
            head = "seed"
        else:
            ref = int(members[j - 1])
            if reference_labels is not None:
                true = int(reference_labels[ref])
            head = f"member {j} (ref #{ref})\nsem. dist. {float(dists[j - 1]):.3g}"
        label, bad = _label(preds[j] if preds else None, true, class_names)
        if preds and preds[j] != interpretation.target:
            bad = True
        mappable = _keep(mappable, show_heatmap(ax, images[j], maps[j] if spatial else None, vmax))
        ax.set_title(
            _panel_text(f"{head}\n{label}" if label else head, panel_size),
            fontsize=7,
            color=_BAD if bad else "black",
        )
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes), shrink=0.8, pad=0.02).set_label(
            "RI heat (logit units)", fontsize=7
        )
    fig.suptitle(
        _plain(
            f"{title or f'region of class {name}'}: seed and its {len(members)} nearest of "
            f"{len(interpretation)} members, purity {interpretation.purity:.2f}, coverage "
            f"{interpretation.coverage:.2f} (references)"
        ),
        fontsize=8,
    )
    again = f" The seed is reference #{seed_ref[0]}, not shown again." if seed_ref else ""
    if spatial:
        where = _where(maps, images, isinstance(interpretation.heatmap_layer, str))
        about = f"One heat map for every panel (the region's, {where}; one colour scale)."
    else:
        about = (
            "No heat map: the split layer has no positions (one value per image); draw "
            "the region's map at heatmap_layer='input' or at an earlier layer."
        )
    _caption(
        fig,
        f"{about} Red: predicted not {name}, or true label differs.{again}\n{SEM_DIST}.",
    )
    return fig


def plot_images(
    images: Tensor,
    titles: Sequence[str],
    title: str,
    maps: Tensor | None = None,
    caption: str = "",
    bad: Sequence[bool] | None = None,
    colorbar_label: str = "RI heat (logit units)",
    panel_size: float = 1.6,
    max_cols: int = 8,
) -> Figure:
    """A gallery of images with their titles, optionally under heat maps (one scale).

    Parameters
    ----------
    images : Tensor
        ``N x C x H x W``.
    titles : sequence of str
        One per image (e.g. index and labels).
    title : str
        The figure's title.
    maps : Tensor, optional
        ``N x c x h x w`` maps drawn over the images on one shared colour scale.
    caption : str
        A line under the panels.
    bad : sequence of bool, optional
        Panels whose title is drawn in red.

    Raises
    ------
    TypeError, ValueError
        For ``images`` or ``maps`` that are not tensors or hold NaN or infinite values,
        ``maps`` of another number of rows than ``images``, ``titles`` of another length,
        or a ``panel_size`` that is not a positive number.
    """
    images = _check_images(images)
    n = int(images.shape[0])
    if len(titles) != n:
        raise ValueError(f"titles has {len(titles)} entries for {n} images")
    if maps is not None:
        maps = _check_maps(maps, n, "maps")
    panel_size = _check_panel_size(panel_size)
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig = Figure(
        figsize=(panel_size * cols + 1.2, panel_size * (_aspect(images) + 0.3) * rows + 0.6),
        layout="constrained",
    )
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = _shared_max(images, maps) if maps is not None else None
    mappable = None
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        mappable = _keep(
            mappable, show_heatmap(ax, images[i], None if maps is None else maps[i], vmax)
        )
        red = bad is not None and bad[i]
        ax.set_title(_panel_text(titles[i], panel_size), fontsize=7, color=_BAD if red else "black")
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes.flat), shrink=0.8, pad=0.02).set_label(
            colorbar_label, fontsize=7
        )
    fig.suptitle(_plain(title), fontsize=8)
    if caption:
        _caption(fig, caption)
    return fig


def _draw_captum(fig: Figure, ax: Any, image: Tensor, attr: Tensor) -> Any:
    """Input attributions through Captum's ``visualize_image_attr`` (absolute values)."""
    img = to_hwc(image)
    a = attribution_to_hwc(attr, img.shape[:2])
    if not np.any(a != 0):
        return show_heatmap(ax, image, torch.zeros(1, *img.shape[:2]))
    _, ax = viz.visualize_image_attr(
        a,
        img,
        method="blended_heat_map",
        sign="absolute_value",
        cmap=CMAP,
        alpha_overlay=ALPHA,
        plt_fig_axis=(fig, ax),
        use_pyplot=False,
    )
    _blank(ax)
    return ax.images[-1]


def plot_comparison(
    images: Tensor,
    attributions: Mapping[str, Tensor],
    titles: Sequence[str] | None = None,
    panel_size: float = 1.8,
    title: str = "Attribution methods on the same images",
    per_image: Sequence[str] = (),
    bad: Sequence[bool] | None = None,
    scale: str = "image",
) -> Figure:
    """Side-by-side heat maps: one row per image, the original then one column per method.

    ``attributions`` maps a method name to its ``N x c x h x w`` attributions. Maps are
    upsampled to the image size (bilinear) and drawn from 0 to ``scale``'s maximum:
    ``"image"`` (default) each panel's own, so the colour bar reads as a share of it
    (RI's rows can come from different regions, whose maps differ by orders of
    magnitude, and on one scale the weaker ones would look empty); ``"column"`` the
    column's, so the colour bar is in the method's units and magnitudes compare down a
    column. Methods named in ``per_image`` (input attributions such as Integrated
    Gradients, which may be signed) are drawn by absolute value through Captum's
    ``visualize_image_attr``, scaled per image (a string is one name). A panel whose
    map is all ``<= 0`` says so instead of looking empty.

    Raises
    ------
    TypeError
        When ``images`` or an attribution is not a tensor, or ``attributions`` is not
        a mapping.
    ValueError
        When ``images`` is empty, an attribution is not ``N x c x h x w`` (or
        ``N x h x w``), has another number of rows than ``images`` or NaN or infinite
        values (so do the images), ``titles`` or ``bad`` another length, ``per_image``
        names no method of ``attributions``, ``scale`` is not ``"image"`` or
        ``"column"``, or ``panel_size`` is not a positive number.
    """
    if scale not in ("image", "column"):
        raise ValueError(f'scale must be "image" or "column", got {scale!r}')
    images = _check_images(images)
    n = images.shape[0]
    panel_size = _check_panel_size(panel_size)
    for arg, values in (("titles", titles), ("bad", bad)):
        if values is not None and len(values) != n:
            raise ValueError(f"{arg} has {len(values)} entries for {n} images")
    if not isinstance(attributions, Mapping):
        raise TypeError(
            "attributions must be a mapping from method name to its N x c x h x w "
            f"attributions, got {type(attributions).__name__}"
        )
    for name, attr in attributions.items():
        _check_maps(attr, n, f"attributions[{name!r}]")
    per_image = (per_image,) if isinstance(per_image, str) else tuple(per_image)
    unknown = [p for p in per_image if p not in attributions]
    if unknown:
        raise ValueError(
            f"per_image names {unknown}, which attributions does not have (its methods: "
            f"{list(attributions)})"
        )
    cols = 1 + len(attributions)
    fig = Figure(
        figsize=(panel_size * cols + 0.4, panel_size * n * (_aspect(images) + 0.15) + 1.4),
        layout="constrained",
    )
    axes = fig.subplots(n, cols, squeeze=False)
    size = tuple(images.shape[-2:])
    for i in range(n):
        show_heatmap(axes[i][0], images[i], None)
        red = bad is not None and bad[i]
        axes[i][0].set_title(
            _panel_text(titles[i] if titles is not None else f"image {i}", panel_size),
            fontsize=7,
            color=_BAD if red else "black",
        )
    for j, (name, attr) in enumerate(attributions.items(), start=1):
        res = _resolution(attr)
        column = [axes[i][j] for i in range(n)]
        mappable = None
        if name in per_image:
            for i, ax in enumerate(column):
                mappable = _keep(mappable, _draw_captum(fig, ax, images[i], attr[i]))
            label = "|attribution| / per-image\nclip level (Captum)"
        elif scale == "column":
            vmax = max(float(attribution_to_hwc(a, size).max()) for a in attr)
            for i, ax in enumerate(column):
                mappable = _keep(mappable, show_heatmap(ax, images[i], attr[i], vmax))
            label = "model units, column scale"  # the column's title names the method
        else:
            for i, ax in enumerate(column):
                top = float(attribution_to_hwc(attr[i], size).max())
                unit = attr[i] / top if top > 0 else attr[i]
                mappable = _keep(mappable, show_heatmap(ax, images[i], unit, 1.0))
            label = "share of the panel's maximum"
        column[0].set_title(_panel_text(f"{name}\n{res} map", panel_size), fontsize=7)
        if mappable is not None:
            cbar = fig.colorbar(mappable, ax=column, location="bottom", shrink=0.9, pad=0.01)
            cbar.set_label(label, fontsize=6)
            cbar.ax.tick_params(labelsize=6)
    fig.suptitle(_plain(title), fontsize=8)
    _caption(
        fig,
        "Each map blended over the grey image (jet colour map), upsampled to "
        f"{size[0]}x{size[1]}; "
        + (
            "each panel scaled to its own maximum. "
            if scale == "image"
            else "one colour scale per column: a map much weaker than the column's "
            "strongest looks faint. "
        )
        + "A panel that says so has a map <= 0 everywhere, which the ReLU removes.",
    )
    return fig


def _compare_modules(model: Any = None, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """The model compare_methods runs (in eval mode, see :func:`compare_methods`)."""
    return (model,) if isinstance(model, torch.nn.Module) else ()


@in_eval_mode(_compare_modules)
def compare_methods(
    model: torch.nn.Module,
    layer: torch.nn.Module,
    ri: Any,
    images: Tensor,
    target: Any = None,
    class_names: Sequence[str] | None = None,
    labels: Sequence[int] | Tensor | None = None,
    additional_forward_args: Any = None,
    **ri_kwargs: Any,
) -> tuple[Figure, dict[str, Tensor]]:
    """RI, ``LayerGradCam`` and ``IntegratedGradients`` on the same images, side by side.

    ``target`` defaults to the model's predictions (the same classes for every method).
    Row titles give the predicted class (``class_names`` when given) and the true class
    when ``labels`` are given. Returns the figure and the attributions by method name.
    ``additional_forward_args`` (the model's extra arguments after the images, as in
    Captum) go to the prediction and to all three methods; ``ri_kwargs`` to
    ``ri.attribute`` only.

    The model runs in eval mode throughout (as RI runs it), with a warning when it was
    in training mode, and every module's mode is restored afterwards: in training mode,
    Grad-CAM's and IG's forward passes would update batch-norm running statistics and
    could predict other classes than RI sees.

    Raises
    ------
    TypeError, ValueError
        For a ``model`` or ``layer`` that is not a module, ``images`` that are not a
        non-empty batch shaped like the references, ``labels`` of another length, or a
        ``layer`` or RI map without spatial positions (an ``N x D`` output).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(layer, torch.nn.Module):
        raise TypeError(
            f"layer must be a torch.nn.Module of model (as for LayerGradCam), got "
            f"{type(layer).__name__}"
        )
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a tensor, got {type(images).__name__}")
    check_against_references((images,), ri.reader_.input_spec, "images")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    if labels is not None and len(labels) != images.shape[0]:
        raise ValueError(
            f"labels: {len(labels)} labels for {images.shape[0]} images; pass one true "
            "class per image"
        )
    extra = _format_additional_forward_args(additional_forward_args)
    with torch.no_grad():
        preds = model(images, *(extra or ())).argmax(dim=1)
    tgt = preds if target is None else target
    # Grad-CAM first (one pass): a layer without positions is named before RI's search
    grad_cam = LayerGradCam(model, layer).attribute(
        images, target=tgt, additional_forward_args=extra, relu_attributions=True
    )
    if grad_cam.dim() < 3:
        raise ValueError(
            f"layer: its output has no spatial positions (Grad-CAM's map is shaped "
            f"{tuple(grad_cam.shape)}); the figure draws maps over the images: pass a "
            "layer with an N x C x H x W output"
        )
    ri_maps = ri.attribute(
        images, target=tgt, additional_forward_args=additional_forward_args, **ri_kwargs
    )
    if ri_maps.dim() < 3:
        raise ValueError(
            f"ri: its maps have no spatial positions (shaped {tuple(ri_maps.shape)}: the "
            "split layer's output is N x D); pass heatmap_layer='input' or an earlier "
            "convolutional layer"
        )
    attrs = {
        "RI": ri_maps,
        "Grad-CAM": grad_cam,
        "Integrated Gradients": IntegratedGradients(model).attribute(
            images, target=tgt, additional_forward_args=extra, n_steps=32
        ),
    }
    titles, bad = [], []
    for i, p in enumerate(preds.tolist()):
        true = None if labels is None else int(labels[i])
        text, wrong = _label(int(p), true, class_names)
        titles.append(f"image {i}\n{text}")
        bad.append(wrong)
    what = "the predicted class" if target is None else "the given target"
    fig = plot_comparison(
        images,
        attrs,
        titles,
        per_image=("Integrated Gradients",),
        bad=bad,
        title=f"RI, Grad-CAM and Integrated Gradients for {what}",
    )
    return fig, attrs


def plot_audit(
    class_audit: Any,
    images: Tensor,
    n_exemplars: int = 6,
    subgroups: bool = True,
    class_names: Sequence[str] | None = None,
    panel_size: float = 1.6,
    region_labels: Sequence[str] | None = None,
    labels: Tensor | None = None,
    scale: str = "shared",
) -> Figure:
    """An audit of one class: one row per region (or per sub-group of a region).

    Each row starts with the group's mean heat map drawn over the mean of its members'
    images (one colour scale for the figure, or one per row), followed by its exemplars
    (nearest to the group's centre first), each titled with its index into ``images``
    (``#157``) and, when ``labels`` are given, its true class (red when it is not the
    audited class).

    Parameters
    ----------
    class_audit : ClassAudit
        ``audit(ri, images, ...)[c]`` (see :mod:`captum_repinterp.auditing`).
    images : Tensor
        The audited images (indexed by the groups' members).
    n_exemplars : int
        Exemplars per row (at most the group's stored exemplars).
    subgroups : bool
        One row per sub-group (True) or per region (False).
    class_names : sequence of str, optional
        Names shown instead of class indices.
    region_labels : sequence of str, optional
        One name per region (default ``"region 1"``, ``"region 2"``, ...); sub-groups
        add ``", group a"``, ``", group b"``, ...
    labels : Tensor, optional
        True classes of ``images``.
    scale : {"shared", "row"}
        ``"shared"``: one colour scale for every row (with a colour bar, in logit units),
        so the rows' strengths compare; ``"row"``: each row's map on its own scale (its
        maximum in its title), so a weak group's map stays visible next to a strong one
        (the sub-groups are split on maps scaled to unit norm).

    Raises
    ------
    TypeError, ValueError
        Naming the argument at fault.
    """
    if scale not in ("shared", "row"):
        raise ValueError(f'scale must be "shared" or "row", got {scale!r}')
    panel_size = _check_panel_size(panel_size)
    if not hasattr(class_audit, "regions") or not hasattr(class_audit, "target"):
        raise TypeError(
            "class_audit must be the ClassAudit of one class, result[c] for "
            f"result = audit(ri, images, ...), got {type(class_audit).__name__}"
        )
    if isinstance(n_exemplars, bool) or not isinstance(n_exemplars, int) or n_exemplars < 0:
        raise ValueError(f"n_exemplars must be a non-negative int, got {n_exemplars!r}")
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a tensor, got {type(images).__name__}")
    top = int(class_audit.indices.max()) if class_audit.indices.numel() else -1
    if images.shape[0] <= top:
        raise ValueError(
            f"images: {images.shape[0]} images, but the audit has image #{top}; pass the "
            "images given to audit"
        )
    if labels is not None and len(labels) != images.shape[0]:
        raise ValueError(
            f"labels: {len(labels)} labels for {images.shape[0]} images; pass one true "
            "class per image given to audit"
        )
    n_regions = len(class_audit.regions)
    if region_labels is not None and len(region_labels) != n_regions:
        raise ValueError(f"region_labels has {len(region_labels)} entries for {n_regions} regions")
    rows = []
    for i, region in enumerate(class_audit.regions):
        base = region_labels[i] if region_labels is not None else f"region {i + 1}"
        groups = region.subgroups if subgroups and len(region.subgroups) > 1 else [region]
        for j, group in enumerate(groups):
            label = base + (f", group {chr(ord('a') + j)}" if group is not region else "")
            rows.append((label, region, group))
    if not rows:
        raise ValueError("class_audit has no regions to plot")
    target = int(class_audit.target)
    name = _name(target, class_names)
    n_class = max(int(class_audit.indices.numel()), 1)
    cols = 1 + n_exemplars
    fig = Figure(
        figsize=(panel_size * cols + 1.2, panel_size * (_aspect(images) + 0.3) * len(rows) + 0.8),
        layout="constrained",
    )
    axes = fig.subplots(len(rows), cols, squeeze=False)
    heat = [_layer_maps(group.mean_heatmap) for _, _, group in rows]
    size = tuple(images.shape[-2:])
    row_max = [float(attribution_to_hwc(h, size).max()) if h.dim() >= 2 else 0.0 for h in heat]
    vmax = max(row_max)
    mappable = None
    for r, (label, _region, group) in enumerate(rows):
        hm = heat[r]
        mean_img = images[group.members].double().mean(dim=0) if group.size else images[0] * 0
        count = f"{group.size} image" + ("s" if group.size != 1 else "")
        text = f"{label}: {count}\n({group.size / n_class:.0%} of class), mean"
        if hm.dim() >= 2:
            top = vmax if scale == "shared" else row_max[r]
            drawn = show_heatmap(axes[r][0], mean_img, hm, top if top > 0 else None)
            mappable = _keep(mappable, drawn)
            if scale == "row":
                text += f"\nmax {row_max[r]:.3g}"
        else:
            show_heatmap(axes[r][0], mean_img, None)
        axes[r][0].set_title(_panel_text(text, panel_size), fontsize=7)
        for c in range(1, cols):
            ax = axes[r][c]
            if c - 1 < len(group.exemplars):
                idx = int(group.exemplars[c - 1])
                true = None if labels is None else int(labels[idx])
                show_heatmap(ax, images[idx], None)
                tl, _ = _label(None, true, class_names)
                ax.set_title(
                    _panel_text(f"#{idx}" + (f"\n{tl}" if tl else ""), panel_size),
                    fontsize=7,
                    color=_BAD if true is not None and true != target else "black",
                )
            else:
                ax.axis("off")
    if mappable is not None and scale == "shared":
        fig.colorbar(
            mappable, ax=axes[:, 0].tolist(), location="left", shrink=0.8, pad=0.02
        ).set_label("mean RI heat (logit units)", fontsize=7)
    fig.suptitle(
        _plain(
            f"Audit of class {name}: {n_regions} region(s), "
            f"{class_audit.uncovered_share:.0%} of the class left uncovered"
        ),
        fontsize=8,
    )
    _caption(
        fig,
        "Each row: a region (or a sub-group of its images, split by their heat maps); "
        "first panel: mean heat map over the mean image, at "
        f"{_resolution(heat[0]) if heat[0].dim() >= 2 else 'layer'} resolution"
        + (
            ", each row on its own colour scale (its maximum in its title)"
            if scale == "row"
            else ""
        )
        + "; then the images nearest the group's centre, #i = index into the audited images.",
    )
    return fig
