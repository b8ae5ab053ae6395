"""Masking images by their heat maps: keep the top share of pixels, set the rest to a
baseline, and read the model's softmax score of a class on the result.

Used by the evaluation's average drop / increase (:mod:`captum_repinterp.evaluation`)
and by the choice of the resolution the maps are drawn at
(:mod:`captum_repinterp.resolution`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._captum_compat import LayerAttribution

__all__ = ["mask_images", "softmax_scores", "top_fraction_mask", "upsample"]


def _check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"fraction must be a float, got {type(fraction).__name__}")
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return float(fraction)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly upsample ``N x 1 x h x w`` layer maps to ``size`` (Captum's helper)."""
    if not isinstance(maps, Tensor) or maps.dim() != 4:
        got = getattr(maps, "shape", maps)
        raise ValueError(f"maps must be an N x 1 x h x w tensor, got {got}")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return LayerAttribution.interpolate(maps, tuple(size), "bilinear")


def top_fraction_mask(maps: Tensor, fraction: float = 0.2) -> Tensor:
    """Boolean mask of the ``fraction`` most important pixels of each map.

    Parameters
    ----------
    maps : Tensor
        ``N x 1 x H x W`` (or ``N x H x W``) heat maps at the input's size.
    fraction : float
        Share of pixels kept; exactly ``ceil(fraction * H * W)`` pixels per map (ties are
        broken by ``torch.topk``, i.e. deterministically but arbitrarily).

    Returns
    -------
    Tensor
        Bool tensor shaped like ``maps``.
    """
    fraction = _check_fraction(fraction)
    if not isinstance(maps, Tensor) or maps.dim() not in (3, 4):
        got = getattr(maps, "shape", maps)
        raise ValueError(f"maps must be N x 1 x H x W or N x H x W, got {got}")
    n = maps.shape[0]
    flat = maps.reshape(n, -1).float()
    keep = max(1, math.ceil(fraction * flat.shape[1] - 1e-9))
    idx = torch.topk(flat, keep, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask.reshape(maps.shape)


def mask_images(
    images: Tensor, maps: Tensor, fraction: float = 0.2, baseline: float = 0.0
) -> Tensor:
    """Keep the top ``fraction`` pixels of each image by its map; set the rest to ``baseline``.

    The same pixel mask is applied to every channel. ``baseline`` is a value in the
    model's input space (0 here for every setup).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be N x C x H x W, got {tuple(images.shape)}")
    if maps.shape[0] != images.shape[0] or tuple(maps.shape[-2:]) != tuple(images.shape[-2:]):
        raise ValueError(
            f"maps {tuple(maps.shape)} must have the images' batch size and spatial size "
            f"{tuple(images.shape)}"
        )
    mask = top_fraction_mask(maps.reshape(maps.shape[0], 1, *maps.shape[-2:]), fraction)
    return torch.where(mask, images, torch.full_like(images, float(baseline)))


@torch.no_grad()
def softmax_scores(
    model: Callable, images: Tensor, targets: Tensor, batch_size: int = 512
) -> Tensor:
    """Softmax probability of ``targets`` for each image, batched (float64, CPU)."""
    out = []
    for s in range(0, images.shape[0], batch_size):
        logits = model(images[s : s + batch_size]).reshape(min(batch_size, images.shape[0] - s), -1)
        p = torch.softmax(logits.double(), dim=1)
        out.append(p.gather(1, targets[s : s + batch_size, None].to(p.device)).squeeze(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
