"""The arithmetic of the evaluation: top-fraction masks, AD/AI, rank correlation.

Everything here is plain tensor arithmetic on heat maps already at the input's size, so
that it can be checked by hand (``tests/test_evaluation.py`` does).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor

from ..masking import mask_images, softmax_scores, top_fraction_mask, upsample

__all__ = [
    "average_drop_increase",
    "bootstrap_ci",
    "drop_increase",
    "mask_images",
    "rank_correlation",
    "softmax_scores",
    "top_fraction_mask",
    "upsample",
]


def drop_increase(original: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image drop ``max(0, Y - Y') / Y`` and increase ``1[Y < Y']``.

    ``original`` and ``masked`` are the softmax scores ``Y_c(e)`` and ``Y_c(e')``.
    """
    if original.shape != masked.shape:
        raise ValueError(f"original {tuple(original.shape)} and masked {tuple(masked.shape)}")
    drop = torch.clamp(original - masked, min=0) / original
    inc = (original < masked).to(original.dtype)
    return drop, inc


def average_drop_increase(
    model: Callable,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    fraction: float = 0.2,
    baseline: float = 0.0,
    batch_size: int = 512,
) -> tuple[Tensor, Tensor]:
    """AD and AI terms of every image (one batched forward of originals + masked images)."""
    masked = mask_images(images, maps, fraction, baseline)
    both = torch.cat([images, masked])
    scores = softmax_scores(model, both, torch.cat([targets, targets]), batch_size)
    n = images.shape[0]
    return drop_increase(scores[:n], scores[n:])


def rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps (``N x ...`` each; NaN if constant)."""
    if a.shape != b.shape:
        raise ValueError(
            f"maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    x = a.detach().reshape(a.shape[0], -1).double().cpu().numpy()
    y = b.detach().reshape(b.shape[0], -1).double().cpu().numpy()
    out = np.full(x.shape[0], np.nan)
    for i in range(x.shape[0]):
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            out[i] = spearmanr(x[i], y[i]).statistic
    return torch.from_numpy(out)


def bootstrap_ci(
    values: np.ndarray | Tensor | list[float],
    strata: np.ndarray | Tensor | list[int] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean and percentile bootstrap confidence interval of the mean, resampling per stratum.

    The evaluation picks the same number of seeds from every predicted class, so the
    resampling keeps that design: within each stratum (class) the values are drawn with
    replacement, as many as the stratum has. (``scipy.stats.bootstrap`` has no strata.)
    NaN values are dropped first.

    Parameters
    ----------
    values : array-like
        One value per seed (e.g. its mean AD), or per-seed paired differences.
    strata : array-like, optional
        The stratum (class) of each value; default: one stratum.
    n_boot : int
        Bootstrap resamples.
    level : float
        Coverage of the interval.
    seed : int
        Seed of the resampling (``numpy.random.default_rng``).

    Returns
    -------
    (mean, low, high)
        NaN for all three when no value is left.
    """
    x = np.asarray(values, dtype=float).ravel()
    s = np.zeros(x.shape, dtype=np.int64) if strata is None else np.asarray(strata).ravel()
    if s.shape != x.shape:
        raise ValueError(f"strata must have one entry per value ({x.size}), got {s.size}")
    ok = ~np.isnan(x)
    x, s = x[ok], s[ok]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    totals = np.zeros(n_boot)
    for group in np.unique(s):
        xs = x[s == group]
        totals += xs[rng.integers(0, xs.size, (n_boot, xs.size))].sum(axis=1)
    means = totals / x.size
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(x.mean()), float(low), float(high)
