"""Stage 2: sample candidate decision boundaries ``(W, b)`` around a seed.

Pure functions of a head callable (``B x D`` features to ``B x C`` logits) and feature
tensors; nothing here knows about models, hooks or the solver.

For every candidate reference ``r`` the segment ``p(t) = (1 - t) psi(x) + t psi(r)`` is
bisected until the class-``c`` decision flips within ``2 ** -n_steps`` of ``t``; all
candidates are bisected together (one head call per step for the whole batch). At the
class-``c`` end of each bracket the local linear piece of ``G_c - G_c'`` (``c'`` the
runner-up there) is read off with one backward pass for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Boundaries",
    "choose_candidates",
    "bisect_segments",
    "linear_pieces",
    "near_duplicates",
    "sample_boundaries",
]

Head = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Boundaries:
    """Candidate boundaries, oriented: ``h(psi) = weight @ psi + bias``.

    Orientation: ``h > 0`` on the side of class ``c`` that contains the seed when the
    seed is predicted as ``c`` (so ``h(psi(x)) > 0``); when the seed is not predicted as
    ``c`` (an explicit other target), ``h > 0`` is the class-``c`` side and the seed has
    ``h < 0``.

    Attributes
    ----------
    weight : Tensor
        ``k x D`` normals ``w_j``.
    bias : Tensor
        ``k`` offsets ``b_j``.
    source : Tensor
        ``k`` int64: position of each boundary's candidate in the candidate list.
    runner_up : Tensor
        ``k`` int64: the class ``c'`` on the other side of each boundary.
    """

    weight: Tensor
    bias: Tensor
    source: Tensor
    runner_up: Tensor

    def __len__(self) -> int:
        return int(self.weight.shape[0])


def choose_candidates(
    predictions: Tensor, target: int, seed_in_class: bool, n: int, random_state: int
) -> Tensor:
    """Pick ``n`` references on the other side of the class-``target`` decision.

    Uniformly without replacement with a generator seeded by ``random_state`` (so the choice for
    one seed image does not depend on the other images in a batch). When the seed is
    predicted as ``target`` the candidates are references predicted otherwise, else the
    references predicted as ``target``.
    """
    pool_mask = predictions != target if seed_in_class else predictions == target
    pool = torch.nonzero(pool_mask, as_tuple=False).flatten()
    gen = torch.Generator().manual_seed(int(random_state))
    order = torch.randperm(pool.numel(), generator=gen)[:n]
    return pool[order]


def _in_class(logits: Tensor, target: int) -> Tensor:
    return logits.argmax(dim=1) == target


def bisect_segments(
    head: Head,
    start: Tensor,
    ends: Tensor,
    target: int,
    n_steps: int = 20,
) -> tuple[Tensor, Tensor]:
    """Bisect all segments ``start -> ends[i]`` for a change of the class-``target`` decision.

    Parameters
    ----------
    head : callable
        ``B x D -> B x C`` logits.
    start : Tensor
        ``D`` features of the seed.
    ends : Tensor
        ``m x D`` features of the candidates.
    target : int
        The class ``c``.
    n_steps : int
        Bisection steps; the bracket width in ``t`` is ``2 ** -n_steps``.

    Returns
    -------
    t_class : Tensor
        ``m``: the end of each final bracket that lies on the class-``c`` side.
    valid : Tensor
        ``m`` bool: whether the segment's ends are on different sides at all.
    """
    m = ends.shape[0]
    with torch.no_grad():
        both = head(torch.cat([start[None], ends], dim=0))
        inside = _in_class(both, target)
        seed_in = bool(inside[0])
        valid = inside[1:] != seed_in
        # the brackets are m numbers: kept in numpy, whose per-call cost is far below
        # torch's, in the features' float type (the same IEEE arithmetic)
        np_dtype = torch.empty(0, dtype=start.dtype).numpy().dtype
        lo = np.zeros(m, dtype=np_dtype)  # seed's side
        hi = np.ones(m, dtype=np_dtype)  # candidate's side
        direction = ends - start[None]
        for _ in range(n_steps):
            mid = (lo + hi) / np_dtype.type(2)
            t = torch.from_numpy(mid).to(start.device)
            points = start[None] + t[:, None] * direction
            same = (head(points).argmax(dim=1) == target).cpu().numpy() == seed_in
            lo = np.where(same, mid, lo)
            hi = np.where(same, hi, mid)
    t_class = torch.from_numpy(lo if seed_in else hi).to(start.device)
    return t_class, valid


def linear_pieces(head: Head, points: Tensor, target: int) -> tuple[Tensor, Tensor, Tensor]:
    """Local linear piece of ``G_c - G_c'`` at each point, ``c'`` the runner-up there.

    One forward and one backward pass for the whole batch: the per-point differences are
    summed before ``backward``; the points are independent because the head treats batch
    rows independently (eval mode).

    Returns
    -------
    weight : Tensor
        ``m x D`` gradients ``w = d(G_c - G_c')/d psi``.
    bias : Tensor
        ``m``: ``b = (G_c - G_c')(p) - w . p``.
    runner_up : Tensor
        ``m`` int64 classes ``c'``.
    """
    with torch.enable_grad():
        p = points.detach().clone().requires_grad_(True)
        logits = head(p)
        others = logits.detach().clone()
        others[:, target] = -torch.inf
        runner_up = others.argmax(dim=1)
        diff = logits[:, target] - logits.gather(1, runner_up[:, None]).squeeze(1)
        (weight,) = torch.autograd.grad(diff.sum(), p)
    weight = weight.detach()
    bias = diff.detach() - (weight * p.detach()).sum(dim=1)
    return weight, bias, runner_up


def near_duplicates(
    weight: Tensor, bias: Tensor, tol: float = 1e-6, gram: Tensor | None = None
) -> Tensor:
    """Mask of boundaries that repeat an earlier one (cosine of ``[w, b]`` >= 1 - tol).

    The first of each group is kept. Computed with one ``k x k`` Gram matrix; ``gram``
    (``k x k``, the normals' ``w_i . w_j``) may be given when it is cheaper to get
    another way. A negative ``tol`` merges nothing.
    """
    k = weight.shape[0]
    if k < 2 or tol < 0:
        return torch.zeros(k, dtype=torch.bool, device=weight.device)
    if gram is None:
        full = torch.cat([weight, bias[:, None]], dim=1).double()
        prod = full @ full.T
    else:
        b = bias.double()
        prod = gram.double() + b[:, None] * b[None, :]
    norm = prod.diagonal().clamp_min(0).sqrt().clamp_min(1e-300)
    cos = prod / norm[:, None] / norm[None, :]
    earlier = torch.triu(torch.ones(k, k, dtype=torch.bool, device=weight.device), 1)
    return ((cos >= 1 - tol) & earlier).any(dim=0)


def sample_boundaries(
    head: Head,
    seed_features: Tensor,
    candidate_features: Tensor,
    target: int,
    n_steps: int = 20,
    duplicate_tol: float = 1e-6,
) -> Boundaries:
    """Candidate boundaries between the seed and each candidate reference.

    Parameters
    ----------
    head : callable
        ``B x D -> B x C`` logits, piecewise linear for the boundaries to be exact.
    seed_features : Tensor
        ``D`` features ``psi(x)``.
    candidate_features : Tensor
        ``m x D`` features of references on the other side of the class-``c`` decision.
    target : int
        The class ``c`` being explained.
    n_steps : int
        Bisection steps.
    duplicate_tol : float
        Boundaries whose ``[w, b]`` have cosine >= ``1 - duplicate_tol`` with an earlier
        one are merged (only the first is kept).

    Returns
    -------
    Boundaries
        Oriented boundaries (see :class:`Boundaries`); candidates whose segment did not
        change the decision, degenerate pieces and near-duplicates are dropped.
    """
    d = seed_features.shape[0]
    empty = Boundaries(
        seed_features.new_zeros(0, d),
        seed_features.new_zeros(0),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
    )
    m = candidate_features.shape[0]
    if m == 0:
        return empty
    t_class, valid = bisect_segments(head, seed_features, candidate_features, target, n_steps)
    keep = torch.nonzero(valid, as_tuple=False).flatten()
    if keep.numel() == 0:
        return empty
    ends = candidate_features[keep]
    points = seed_features[None] + t_class[keep, None] * (ends - seed_features[None])
    weight, bias, runner_up = linear_pieces(head, points, target)
    with torch.no_grad():
        seed_logits = head(seed_features[None])
    seed_in = bool(_in_class(seed_logits, target)[0])
    h_seed = weight @ seed_features + bias
    wanted = 1.0 if seed_in else -1.0
    flip = h_seed * wanted < 0
    sign = torch.where(flip, -1.0, 1.0).to(weight.dtype)
    weight = weight * sign[:, None]
    bias = bias * sign
    good = (h_seed != 0) & torch.isfinite(h_seed) & (weight.abs().sum(dim=1) > 0)
    # duplicates among the good ones only, so a degenerate piece never hides one
    idx = torch.nonzero(good, as_tuple=False).flatten()
    dup = near_duplicates(weight[idx], bias[idx], duplicate_tol)
    idx = idx[~dup]
    return Boundaries(
        weight[idx].detach(),
        bias[idx].detach(),
        keep.cpu()[idx.cpu()],
        runner_up[idx].cpu(),
    )
