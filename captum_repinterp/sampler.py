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

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Boundaries",
    "choose_candidates",
    "feature_scale",
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


def _as_np64(logits: Tensor) -> np.ndarray:
    """``B x C`` logits as a float64 numpy array (on the CPU; the conversion is exact)."""
    return logits.detach().to("cpu", torch.float64).numpy()


def _margin_np(values: np.ndarray, target: int) -> np.ndarray:
    """``G_c - max_{k != c} G_k`` per row of float64 logits: positive where ``c`` wins
    (a NaN in a row gives a NaN margin)."""
    others = values.copy()
    others[:, target] = -np.inf
    return values[:, target] - others.max(axis=1)


def find_crossings(
    head: Head,
    start: Tensor,
    ends: Tensor,
    target: int,
    n_steps: int = 20,
    max_iter: int = 12,
    start_logits: Tensor | None = None,
    end_logits: Tensor | None = None,
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
    in a half-precision type are bisected. The brackets (``m`` numbers each) are kept in
    numpy, whose per-call cost is far below torch's, in float64 as before.

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
    start_logits, end_logits : Tensor, optional
        The head's logits at ``start`` (``C``) and at ``ends`` (``m x C``) when already
        known (e.g. the references' outputs kept by ``fit``): they are not evaluated
        again. ``start_logits`` is used only with ``end_logits``; without it the head
        runs on ``start`` alone.

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
    if end_logits is None:
        with torch.no_grad():
            both = head(torch.cat([start[None], ends], dim=0))
        seed_logits = both[0].detach()
        values = _as_np64(both)
    else:
        if end_logits.shape[0] != m:
            raise ValueError(f"end_logits must have {m} rows, got {end_logits.shape[0]}")
        if start_logits is None:
            with torch.no_grad():
                start_logits = head(start[None])[0]
        seed_logits = start_logits.detach().reshape(-1)
        values = np.concatenate([_as_np64(seed_logits[None]), _as_np64(end_logits)])
    g = _margin_np(values, target)
    seed_in = int(np.argmax(values[0])) == target
    sign = 1.0 if seed_in else -1.0
    g = g * sign  # positive on the seed's side
    valid = ((values[1:].argmax(axis=1) == target) != seed_in) & (g[1:] < 0)
    lo = np.zeros(m)  # seed's side
    hi = np.ones(m)  # candidate's side
    t_cross = np.full(m, np.nan)
    open_ = valid.copy()
    direction = ends - start[None]
    n_tied = 0
    # half types are bisected: a tie within their rounding (3 digits for bfloat16) would
    # not place the point on the boundary
    exact_type = start.dtype in (torch.float32, torch.float64)
    if max_iter > 0 and exact_type and bool(valid.any()) and bool(np.isfinite(g[0])):
        scale = float(np.abs(values).max())
        tol = 64 * torch.finfo(start.dtype).eps * max(scale, 1e-30)
        g_lo = np.full(m, g[0])
        g_hi = g[1:].copy()
        last = np.zeros(m, dtype=np.int8)  # which end moved last: 1 lo, 2 hi
        with np.errstate(all="ignore"):
            for _ in range(max_iter):
                idx = np.flatnonzero(open_)
                if idx.size == 0:
                    break
                lo_i, hi_i, gl, gh = lo[idx], hi[idx], g_lo[idx], g_hi[idx]
                t = lo_i - gl * (hi_i - lo_i) / (gh - gl)
                t = np.where((t > lo_i) & (t < hi_i), t, 0.5 * (lo_i + hi_i))
                t_dev = torch.from_numpy(t).to(start.device, start.dtype)
                rows = direction[torch.from_numpy(idx).to(start.device)]
                pts = start[None] + t_dev[:, None] * rows
                with torch.no_grad():
                    out = head(pts)
                gn = _margin_np(_as_np64(out), target) * sign
                done = np.abs(gn) <= tol
                t_cross[idx[done]] = t[done]
                open_[idx[done]] = False
                n_tied += int(done.sum())
                # gn > 0 (a number, not NaN) means the class-c decision is the seed's
                seed_side = gn > 0
                lo[idx] = np.where(seed_side, t, lo_i)
                hi[idx] = np.where(seed_side, hi_i, t)
                moved = np.where(seed_side, 1, 2).astype(np.int8)
                again = last[idx] == moved
                # Anderson-Bjorck: when the same end moves twice, the other end's margin
                # is scaled by 1 - g_new / g_moved_end (by 1/2 when that is not positive)
                scale_hi = 1 - gn / gl
                scale_lo = 1 - gn / gh
                scale_hi = np.where(scale_hi > 0, scale_hi, 0.5)
                scale_lo = np.where(scale_lo > 0, scale_lo, 0.5)
                g_lo[idx] = np.where(seed_side, gn, np.where(again, gl * scale_lo, gl))
                g_hi[idx] = np.where(seed_side, np.where(again, gh * scale_hi, gh), gn)
                last[idx] = moved
    rest = np.flatnonzero(open_)
    if rest.size:
        t_cross[rest] = _bisect(
            head,
            start,
            direction[torch.from_numpy(rest).to(start.device)],
            target,
            seed_in,
            lo[rest],
            hi[rest],
            n_steps,
        )
    return torch.from_numpy(t_cross), torch.from_numpy(valid), seed_logits, n_tied


def _bisect(
    head: Head,
    start: Tensor,
    direction: Tensor,
    target: int,
    seed_in: bool,
    lo: np.ndarray,
    hi: np.ndarray,
    n_steps: int,
) -> np.ndarray:
    """Bisect brackets ``[lo, hi]`` (float64, ``lo`` on the seed's side) until every one
    is narrower than ``2 ** -n_steps``; returns the end of each final bracket on the
    class-``target`` side (float64)."""
    # the brackets are m numbers: kept in numpy, whose per-call cost is far below
    # torch's, in the features' float type (the same IEEE arithmetic)
    np_dtype = _np_float(start.dtype)
    lo_np = lo.astype(np_dtype)
    hi_np = hi.astype(np_dtype)
    # as many steps as the widest bracket needs to get below 2 ** -n_steps
    width = float((hi - lo).max()) if lo.size else 0.0
    steps = max(0, min(n_steps, n_steps + int(np.ceil(np.log2(max(width, 2.0**-60))))))
    with torch.no_grad():
        for _ in range(steps):
            mid = (lo_np + hi_np) / np_dtype.type(2)
            t = torch.from_numpy(mid).to(start.device, start.dtype)
            points = start[None] + t[:, None] * direction
            same = (head(points).argmax(dim=1) == target).cpu().numpy() == seed_in
            lo_np = np.where(same, mid, lo_np)
            hi_np = np.where(same, hi_np, mid)
    return (lo_np if seed_in else hi_np).astype(np.float64)


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
    zeros = np.zeros(m)
    t = _bisect(head, start, ends - start[None], target, seed_in, zeros, zeros + 1, n_steps)
    return torch.from_numpy(t).to(start.device), valid.cpu()


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


def feature_scale(seed_features: Tensor) -> float:
    """The seed's feature norm: the unit in which :func:`near_duplicates` compares the
    boundaries' offsets."""
    return float(torch.linalg.vector_norm(seed_features.double()))


def near_duplicates(
    weight: Tensor,
    bias: Tensor,
    tol: float = 1e-6,
    gram: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Mask of boundaries that repeat an earlier one (cosine of ``[w, b / scale]`` >=
    1 - tol).

    The first of each group is kept. Computed with one ``k x k`` Gram matrix; ``gram``
    (``k x k``, the normals' ``w_i . w_j``) may be given when it is cheaper to get
    another way. A negative ``tol`` merges nothing.

    ``scale`` is the features' size (the seed's feature norm): the offsets are compared
    in units of it, so that the test does not depend on the features' units. With
    features ``s`` times larger the normals are ``s`` times smaller and the offsets
    unchanged; on ``[w, b]`` alone the offsets then dominate, and at ``s = 1e6`` every
    boundary whose offset has the same sign was merged into the first.
    """
    k = weight.shape[0]
    if k < 2 or tol < 0:
        return torch.zeros(k, dtype=torch.bool, device=weight.device)
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    if gram is None:
        full = torch.cat([weight.double(), bias.double()[:, None] / scale], dim=1)
        prod = full @ full.T
    else:
        b = bias.double() / scale
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
    logits: Tensor | None = None,
    end_logits: Tensor | None = None,
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
        Boundaries whose ``[w, b / s]`` (``s`` the seed's feature norm) have cosine
        >= ``1 - duplicate_tol`` with an earlier one are merged (only the first is kept).
    max_iter : int
        Regula-falsi steps per segment before bisecting (see :func:`find_crossings`);
        0 bisects only.
    logits : Tensor, optional
        ``(1 + m) x C``: the head's values at the seed and at the candidates, when
        already computed (they are not evaluated again).
    end_logits : Tensor, optional
        ``m x C``: the head's values at the candidates only (the seed's are evaluated).

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
    start_logits = None
    if logits is not None:
        start_logits, end_logits = logits[0], logits[1:]
    t_cross, valid, seed_logits, _ = find_crossings(
        head, seed_features, candidate_features, target, n_steps, max_iter,
        start_logits=start_logits, end_logits=end_logits,
    )  # fmt: skip
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
    dup = near_duplicates(weight[idx], bias[idx], duplicate_tol, scale=feature_scale(seed_features))
    idx = idx[~dup]
    return Boundaries(
        weight[idx].detach(),
        bias[idx].detach(),
        keep.cpu()[idx.cpu()],
        runner_up[idx].cpu(),
    )
