"""Figures built on ``captum.attr.visualization`` and matplotlib, headless-safe.

Every function returns a ``matplotlib.figure.Figure`` created without pyplot (so nothing
needs a display and no global figure state is touched); save it with
``fig.savefig(path)``. Heat maps are upsampled with Captum's
``LayerAttribution.interpolate`` and drawn with ``visualize_image_attr(...,
use_pyplot=False)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
from captum.attr import visualization as viz
from matplotlib.figure import Figure
from torch import Tensor

from .interpretation import Interpretation

__all__ = [
    "to_hwc",
    "attribution_to_hwc",
    "plot_region",
    "plot_comparison",
    "compare_methods",
    "plot_audit",
]


def to_hwc(image: Tensor) -> np.ndarray:
    """A ``C x H x W`` (or ``H x W``) image tensor as an ``H x W x C`` array in [0, 1]."""
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


def _draw(
    fig: Figure,
    ax: Any,
    image: Tensor,
    attr: Tensor | None,
    title: str,
    sign: str = "positive",
) -> None:
    img = to_hwc(image)
    if attr is None or not np.any(attribution_to_hwc(attr, img.shape[:2])):
        # captum 0.9's visualize_image_attr reads attr.shape even for "original_image"
        ax.imshow(img)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        viz.visualize_image_attr(
            attribution_to_hwc(attr, img.shape[:2]),
            img,
            method="blended_heat_map",
            sign=sign,
            plt_fig_axis=(fig, ax),
            use_pyplot=False,
            alpha_overlay=0.55,
        )
    ax.set_title(title, fontsize=8)


def plot_region(
    interpretation: Interpretation,
    seed_image: Tensor,
    reference_images: Tensor,
    k: int = 5,
    class_names: Sequence[str] | None = None,
    panel_size: float = 1.8,
) -> Figure:
    """The paper's figure: the seed and its ``k`` nearest region members, one shared map.

    Parameters
    ----------
    interpretation : Interpretation
        From ``ri.interpret(seed)`` (needs its explainer to compute activations).
    seed_image : Tensor
        ``C x H x W`` or ``1 x C x H x W``.
    reference_images : Tensor
        The reference set given to ``fit`` (indexed by ``interpretation.members``).
    k : int
        Number of members to show, nearest by semantic distance first.
    """
    if seed_image.dim() == reference_images.dim():
        seed_image = seed_image[0]
    members = interpretation.similar(k)
    images = torch.cat([seed_image[None], reference_images[members]])
    maps = interpretation.heatmap(images)
    if isinstance(maps, tuple):
        maps = maps[0]
    name = (
        class_names[interpretation.target]
        if class_names is not None
        else str(interpretation.target)
    )
    fig = Figure(figsize=(panel_size * images.shape[0], panel_size * 1.25))
    axes = fig.subplots(1, images.shape[0], squeeze=False)[0]
    dists = interpretation.member_distances[: len(members)]
    for j, ax in enumerate(axes):
        title = f"seed ({name})" if j == 0 else f"member {j}\nd={float(dists[j - 1]):.3g}"
        _draw(fig, ax, images[j], maps[j], title)
    fig.suptitle(
        f"region of class {name}: {len(interpretation)} members, "
        f"purity {interpretation.purity:.2f}, coverage {interpretation.coverage:.2f}",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_comparison(
    images: Tensor,
    attributions: Mapping[str, Tensor],
    titles: Sequence[str] | None = None,
    panel_size: float = 1.8,
) -> Figure:
    """Side-by-side heat maps: one row per image, the original then one column per method.

    ``attributions`` maps a method name to its ``N x c x h x w`` attributions (layer maps
    are upsampled to the image size; input attributions are summed over channels).
    Signed methods (e.g. Integrated Gradients) are drawn by absolute value.
    """
    n = images.shape[0]
    for name, attr in attributions.items():
        if attr.shape[0] != n:
            raise ValueError(f"attributions[{name!r}] has {attr.shape[0]} rows for {n} images")
    cols = 1 + len(attributions)
    fig = Figure(figsize=(panel_size * cols, panel_size * n * 1.1))
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        row_title = titles[i] if titles is not None else f"image {i}"
        _draw(fig, axes[i][0], images[i], None, row_title)
        for j, (name, attr) in enumerate(attributions.items(), start=1):
            sign = "positive" if bool((attr[i] >= 0).all()) else "absolute_value"
            _draw(fig, axes[i][j], images[i], attr[i], name, sign)
    fig.tight_layout()
    return fig


def compare_methods(
    model: torch.nn.Module,
    layer: torch.nn.Module,
    ri: Any,
    images: Tensor,
    target: Any = None,
    **ri_kwargs: Any,
) -> tuple[Figure, dict[str, Tensor]]:
    """RI, ``LayerGradCam`` and ``IntegratedGradients`` on the same images, side by side.

    ``target`` defaults to the model's predictions (the same classes for every method).
    Returns the figure and the attributions by method name.
    """
    with torch.no_grad():
        preds = model(images).argmax(dim=1)
    tgt = preds if target is None else target
    attrs = {
        "RI": ri.attribute(images, target=tgt, **ri_kwargs),
        "Grad-CAM": LayerGradCam(model, layer).attribute(
            images, target=tgt, relu_attributions=True
        ),
        "Integrated Gradients": IntegratedGradients(model).attribute(
            images, target=tgt, n_steps=32
        ),
    }
    titles = [f"pred {int(p)}" for p in preds]
    return plot_comparison(images, attrs, titles), attrs


def _show(ax: Any, image: Tensor, title: str) -> None:
    ax.imshow(to_hwc(image))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def plot_audit(
    class_audit: Any,
    images: Tensor,
    n_exemplars: int = 6,
    subgroups: bool = True,
    class_names: Sequence[str] | None = None,
    panel_size: float = 1.6,
) -> Figure:
    """An audit of one class: one row per region (or per sub-group of a region).

    Each row starts with the group's mean heat map drawn over the mean of its members'
    images, followed by its exemplars (nearest to the group's centre first).

    Parameters
    ----------
    class_audit : ClassAudit
        ``audit(ri, images, ...)[c]`` (see :mod:`captum_repinterp.audit`).
    images : Tensor
        The audited images (indexed by the groups' members).
    n_exemplars : int
        Exemplars per row (at most the group's stored exemplars).
    subgroups : bool
        One row per sub-group (True) or per region (False).
    """
    if isinstance(n_exemplars, bool) or not isinstance(n_exemplars, int) or n_exemplars < 0:
        raise ValueError(f"n_exemplars must be a non-negative int, got {n_exemplars!r}")
    rows = []
    for i, region in enumerate(class_audit.regions):
        groups = region.subgroups if subgroups and len(region.subgroups) > 1 else [region]
        for j, group in enumerate(groups):
            label = f"region {i + 1}" + (f".{j + 1}" if group is not region else "")
            rows.append((label, region, group))
    if not rows:
        raise ValueError("class_audit has no regions to plot")
    name = class_names[class_audit.target] if class_names is not None else str(
        class_audit.target
    )
    n_class = max(int(class_audit.indices.numel()), 1)
    cols = 1 + n_exemplars
    fig = Figure(figsize=(panel_size * cols, panel_size * 1.2 * len(rows)))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (label, region, group) in enumerate(rows):
        hm = group.mean_heatmap[0] if isinstance(group.mean_heatmap, tuple) else group.mean_heatmap
        mean_img = images[group.members].mean(dim=0) if group.size else images[0] * 0
        title = f"{label}: {group.size} ({group.size / n_class:.0%})"
        if group is region:
            title += f"\npurity {region.purity:.2f}"
        if hm.dim() >= 2 and bool((hm > 0).any()):
            _draw(fig, axes[r][0], mean_img, hm, title)
        else:
            _show(axes[r][0], mean_img, title)
        for c in range(1, cols):
            ax = axes[r][c]
            if c - 1 < len(group.exemplars):
                idx = int(group.exemplars[c - 1])
                _show(ax, images[idx], f"#{idx}")
            else:
                ax.axis("off")
    fig.suptitle(
        f"audit of class {name}: {len(class_audit.regions)} region(s), "
        f"{class_audit.uncovered_share:.0%} uncovered",
        fontsize=9,
    )
    fig.tight_layout()
    return fig
