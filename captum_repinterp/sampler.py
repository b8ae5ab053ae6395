"""Stage 2: sample candidate decision boundaries ``(W, b)`` around a seed.

Pure functions of a head callable (``B x D`` features to ``B x C`` logits) and feature
tensors; nothing here knows about models, hooks or the solver.

For every candidate reference ``r`` the crossing of the class-``c`` decision on the
segment ``p(t) = (1 - t) psi(x) + t psi(r)`` is found by regula falsi on the margin
``G_c - max_{k != c} G_k``, which is piecewise linear in ``t`` for a piecewise-linear
head, so a step lands on the crossing once the bracket's ends share its linear piece; a
few head calls per segment, with bisection to ``2 ** -n_steps`` in ``t`` as the fallback
(:func:`find_crossings`). All candidates go together, one head call per step for those
still open. At each crossing the local linear piece of ``G_c - G_c'`` (``c'`` the
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
    "find_crossings",
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
        ``k`` int64: position of each boundary's candidate in the candidate list (-1
        for the exact boundaries of an affine head, which need no candidate).
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


def _np_float(dtype: torch.dtype) -> np.dtype:
    """The numpy float type for bracket arithmetic on features of ``dtype``: the same
    type when numpy has it, float32 for the half types numpy lacks (bfloat16)."""
    if dtype in (torch.float64, torch.float32, torch.float16):
        return torch.empty(0, dtype=dtype).numpy().dtype
    return np.dtype(np.float32)


def _in_class(logits: Tensor, target: int) -> Tensor:
    return logits.argmax(dim=1) == target


def _margin(logits: Tensor, target: int) -> Tensor:
    """``G_c - max_{k != c} G_k`` per row (float64): positive where ``c`` wins."""
    others = logits.detach().double().clone()
    others[:, target] = -torch.inf
    return logits.detach()[:, target].double() - others.amax(dim=1)


def find_crossings(
    head: Head,
    start: Tensor,
    ends: Tensor,
    target: int,
    n_steps: int = 20,
    max_iter: int = 12,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Where the class-``target`` decision changes on each segment ``start -> ends[i]``.

    Along a segment a piecewise-linear head's margin ``g(t) = G_c - max_{k != c} G_k``
    is piecewise linear in ``t`` and changes sign at the crossing. Each step puts the
    next point where the line through the margins at the two ends of the bracket
    crosses zero (regula falsi, with the Anderson-Bjorck rule so that one end cannot
    stall); as soon as both ends lie on the crossing's linear piece that point is the
    crossing, to rounding. A segment is closed when the top two logits tie at its point within
    ``64 eps`` of the logits' scale. Segments still open after ``max_iter`` steps are
    bisected inside their bracket until it is narrower than ``2 ** -n_steps`` in ``t``.
    Only open segments are evaluated; one head call per step for all of them. Features
    in a half-precision type are bisected.

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
        Bisection depth of the fallback.
    max_iter : int
        Regula-falsi steps before bisecting; 0 bisects at once.

    Returns
    -------
    t_cross : Tensor
        ``m`` float64 (NaN where not valid): the tie point of segments closed by regula
        falsi; for bisected ones the end of the final bracket on the class-``c`` side.
    valid : Tensor
        ``m`` bool (CPU): whether the segment's ends are on different sides at all.
    seed_logits : Tensor
        ``C``: the head at ``start``.
    n_tied : int
        How many valid segments were closed at a tie (not bisected).
    """
    m = ends.shape[0]
    with torch.no_grad():
        both = head(torch.cat([start[None], ends], dim=0))
    g = _margin(both, target).cpu()
    seed_in = bool(_in_class(both[:1], target)[0])
    sign = 1.0 if seed_in else -1.0
    g = g * sign  # positive on the seed's side
    valid = (_in_class(both[1:], target).cpu() != seed_in) & (g[1:] < 0)
    seed_logits = both[0].detach()
    lo = torch.zeros(m, dtype=torch.float64)  # seed's side
    hi = torch.ones(m, dtype=torch.float64)  # candidate's side
    t_cross = torch.full((m,), torch.nan, dtype=torch.float64)
    open_ = valid.clone()
    direction = ends - start[None]
    n_tied = 0
    # half types are bisected: a tie within their rounding (3 digits for bfloat16) would
    # not place the point on the boundary
    exact_type = start.dtype in (torch.float32, torch.float64)
    if max_iter > 0 and exact_type and bool(valid.any()) and bool(torch.isfinite(g[0])):
        scale = float(both.detach().abs().amax().double())
        tol = 64 * torch.finfo(start.dtype).eps * max(scale, 1e-30)
        g_lo = g[0].expand(m).clone()
        g_hi = g[1:].clone()
        last = torch.zeros(m, dtype=torch.int8)  # which end moved last: 1 lo, 2 hi
        for _ in range(max_iter):
            idx = torch.nonzero(open_).flatten()
            if idx.numel() == 0:
                break
            lo_i, hi_i, gl, gh = lo[idx], hi[idx], g_lo[idx], g_hi[idx]
            t = lo_i - gl * (hi_i - lo_i) / (gh - gl)
            t = torch.where((t > lo_i) & (t < hi_i), t, 0.5 * (lo_i + hi_i))
            dev_idx = idx.to(start.device)
            pts = start[None] + t.to(start.device, start.dtype)[:, None] * direction[dev_idx]
            with torch.no_grad():
                out = head(pts)
            gn = _margin(out, target).cpu() * sign
            done = gn.abs() <= tol
            t_cross[idx[done]] = t[done]
            open_[idx[done]] = False
            n_tied += int(done.sum())
            seed_side = (_in_class(out, target).cpu() == seed_in) & (gn > 0)
            lo[idx] = torch.where(seed_side, t, lo_i)
            hi[idx] = torch.where(seed_side, hi_i, t)
            moved = torch.where(seed_side, 1, 2).to(torch.int8)
            again = last[idx] == moved
            # Anderson-Bjorck: when the same end moves twice, the other end's margin
            # is scaled by 1 - g_new / g_moved_end (by 1/2 when that is not positive)
            scale_hi = 1 - gn / gl
            scale_lo = 1 - gn / gh
            half = torch.full_like(gn, 0.5)
            scale_hi = torch.where(scale_hi > 0, scale_hi, half)
            scale_lo = torch.where(scale_lo > 0, scale_lo, half)
            g_lo[idx] = torch.where(seed_side, gn, torch.where(again, gl * scale_lo, gl))
            g_hi[idx] = torch.where(seed_side, torch.where(again, gh * scale_hi, gh), gn)
            last[idx] = moved
    rest = torch.nonzero(open_).flatten()
    if rest.numel():
        t_cross[rest] = _bisect(
            head,
            start,
            direction[rest.to(start.device)],
            target,
            seed_in,
            lo[rest],
            hi[rest],
            n_steps,
        )
    return t_cross, valid, seed_logits, n_tied


def _bisect(
    head: Head,
    start: Tensor,
    direction: Tensor,
    target: int,
    seed_in: bool,
    lo: Tensor,
    hi: Tensor,
    n_steps: int,
) -> Tensor:
    """Bisect brackets ``[lo, hi]`` (``lo`` on the seed's side) until every one is
    narrower than ``2 ** -n_steps``; returns the end of each final bracket on the
    class-``target`` side (float64)."""
    # the brackets are m numbers: kept in numpy, whose per-call cost is far below
    # torch's, in the features' float type (the same IEEE arithmetic)
    np_dtype = _np_float(start.dtype)
    lo_np = lo.numpy().astype(np_dtype)
    hi_np = hi.numpy().astype(np_dtype)
    # as many steps as the widest bracket needs to get below 2 ** -n_steps
    width = float((hi - lo).max()) if lo.numel() else 0.0
    steps = max(0, min(n_steps, n_steps + int(np.ceil(np.log2(max(width, 2.0**-60))))))
    with torch.no_grad():
        for _ in range(steps):
            mid = (lo_np + hi_np) / np_dtype.type(2)
            t = torch.from_numpy(mid).to(start.device, start.dtype)
            points = start[None] + t[:, None] * direction
            same = (head(points).argmax(dim=1) == target).cpu().numpy() == seed_in
            lo_np = np.where(same, mid, lo_np)
            hi_np = np.where(same, hi_np, mid)
    return torch.from_numpy((lo_np if seed_in else hi_np).astype(np.float64))


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
        ``m`` float64: the end of each final bracket that lies on the class-``c`` side.
    valid : Tensor
        ``m`` bool: whether the segment's ends are on different sides at all.
    """
    m = ends.shape[0]
    with torch.no_grad():
        both = head(torch.cat([start[None], ends], dim=0))
    inside = _in_class(both, target)
    seed_in = bool(inside[0])
    valid = inside[1:] != seed_in
    zeros = torch.zeros(m, dtype=torch.float64)
    t = _bisect(head, start, ends - start[None], target, seed_in, zeros, zeros + 1, n_steps)
    return t.to(start.device), valid.cpu()


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
    if weight.dtype not in (torch.float32, torch.float64):
        # half types: the plane's offset in float32 (the point and the normal are what
        # the head gives; the product is not rounded to 3 digits again)
        weight = weight.to(torch.float32)
        bias = diff.detach().to(torch.float32) - (weight * p.detach().to(torch.float32)).sum(1)
        return weight, bias, runner_up
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
    max_iter: int = 12,
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
        Bisection steps of the fallback (see :func:`find_crossings`).
    duplicate_tol : float
        Boundaries whose ``[w, b]`` have cosine >= ``1 - duplicate_tol`` with an earlier
        one are merged (only the first is kept).
    max_iter : int
        Regula-falsi steps per segment before bisecting (see :func:`find_crossings`);
        0 bisects only.

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
    t_cross, valid, seed_logits, _ = find_crossings(
        head, seed_features, candidate_features, target, n_steps, max_iter
    )
    keep = torch.nonzero(valid, as_tuple=False).flatten()
    if keep.numel() == 0:
        return empty
    dev_keep = keep.to(seed_features.device)
    ends = candidate_features[dev_keep]
    t = t_cross[keep].to(seed_features.device, seed_features.dtype)
    points = seed_features[None] + t[:, None] * (ends - seed_features[None])
    weight, bias, runner_up = linear_pieces(head, points, target)
    seed_in = int(seed_logits.argmax()) == target
    h_seed = weight @ seed_features.to(weight.dtype) + bias
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
