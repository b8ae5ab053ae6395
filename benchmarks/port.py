"""A straightforward port of the reference implementation (benchmark baseline only).

It follows the structure of the group's original code (see "Speed" in
``docs/method.md``), so that the benchmark measures what batching buys:

- bisection of **one candidate at a time** (one head call per step per candidate);
- the linear piece read off with **one backward pass per class** (``C`` backwards per
  candidate, then ``w = grad G_c - grad G_c'``);
- the greedy recomputes the **whole match matrix** (``N x D`` by ``D x m`` product) after
  every added candidate and counts ``df`` / ``dg`` with numpy.

The arithmetic of each step (bisection in ``t``, ``b = diff - w . p``, orientation
towards the seed, ratio ``(df + eps) / dg`` with the same tie rule and the ``tighten``
step) is that of the package, so given the same ``W, b`` both solvers must select the
same boundaries; ``benchmarks/speed.py`` asserts it. Not part of the package.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

RATIO_RTOL = 1e-9


def bisect_one(
    head: Callable, start: Tensor, end: Tensor, target: int, n_steps: int
) -> float | None:
    """Bisect one segment; ``None`` when its ends are on the same side."""
    with torch.no_grad():
        seed_in = int(head(start[None]).argmax(1)[0]) == target
        end_in = int(head(end[None]).argmax(1)[0]) == target
        if seed_in == end_in:
            return None
        lo, hi = 0.0, 1.0
        direction = end - start
        for _ in range(n_steps):
            mid = (lo + hi) / 2
            p = start + torch.tensor(mid, dtype=start.dtype) * direction
            same = (int(head(p[None]).argmax(1)[0]) == target) == seed_in
            if same:
                lo = mid
            else:
                hi = mid
    return lo if seed_in else hi


def piece_one(head: Callable, point: Tensor, target: int) -> tuple[Tensor, float]:
    """Linear piece of ``G_c - G_c'`` at ``point`` with one backward per class."""
    p = point.detach().clone().requires_grad_(True)
    logits = head(p[None])[0]
    grads = []
    for k in range(logits.shape[0]):
        (g,) = torch.autograd.grad(logits[k], p, retain_graph=True)
        grads.append(g)
    others = logits.detach().clone()
    others[target] = -torch.inf
    runner = int(others.argmax())
    w = grads[target] - grads[runner]
    diff = float((logits[target] - logits[runner]).detach())
    b = diff - float((w * p.detach()).sum())
    return w.detach(), b


def port_sample(
    head: Callable, psi_x: Tensor, cand_feats: Tensor, target: int, n_steps: int = 20
) -> tuple[Tensor, Tensor]:
    """Boundaries ``(W, b)`` oriented towards the seed, one candidate at a time."""
    with torch.no_grad():
        seed_in = int(head(psi_x[None]).argmax(1)[0]) == target
    ws, bs = [], []
    for i in range(cand_feats.shape[0]):
        t = bisect_one(head, psi_x, cand_feats[i], target, n_steps)
        if t is None:
            continue
        point = psi_x + torch.tensor(t, dtype=psi_x.dtype) * (cand_feats[i] - psi_x)
        w, b = piece_one(head, point, target)
        h = float(w @ psi_x) + b
        if h == 0:
            continue
        if (h > 0) != seed_in:
            w, b = -w, -b
        ws.append(w)
        bs.append(b)
    if not ws:
        return psi_x.new_zeros(0, psi_x.shape[0]), psi_x.new_zeros(0)
    return torch.stack(ws), torch.tensor(bs, dtype=psi_x.dtype)


def port_greedy(
    features: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    positive: np.ndarray,
    eps: float = 1e-3,
) -> list[int]:
    """Greedy SCSC with ``delta`` = auto and ``tighten``; match matrix recomputed per pick.

    Ratios ``(df_j + eps) / dg_j`` are compared with the package's rule: only candidates
    not yet selected and with ``dg_j > 0`` compete; ratios within ``RATIO_RTOL``
    (relative) of the smallest are tied, and ties go to the smaller ``df_j``, then the
    smaller index.
    """
    m = weight.shape[0]
    negative = ~positive
    w32 = np.ascontiguousarray(weight, dtype=np.float32)
    b32 = bias.astype(np.float32)

    def match_now() -> np.ndarray:
        return features @ w32.T + b32 > 0

    match = match_now()
    delta = int((match.all(axis=1) & negative).sum())
    need = int(negative.sum()) - delta
    selected: list[int] = []
    covered = 0
    while covered < need:
        match = match_now()  # recomputed after every added candidate
        inside = match[:, selected].all(axis=1) if selected else np.ones(len(match), bool)
        out = ~match[inside]
        df = (out & positive[inside, None]).sum(axis=0)
        dg = (out & negative[inside, None]).sum(axis=0)
        ratios = np.full(m, np.inf)
        for j in range(m):
            if j not in selected and dg[j] > 0:
                ratios[j] = (df[j] + eps) / dg[j]
        valid = np.isfinite(ratios)
        if not valid.any():
            break
        lo = ratios[valid].min()
        # only valid candidates can tie (inf - lo <= RTOL * inf would let every
        # excluded candidate, already selected ones included, into the tie)
        tied = np.nonzero(valid & (ratios - lo <= RATIO_RTOL * ratios))[0]
        best = int(min(tied, key=lambda k: (df[k], k)))
        selected.append(best)
        covered += int(dg[best])
    match = match_now()
    inside = match[:, selected].all(axis=1) if selected else np.ones(len(match), bool)
    df = (~match[inside] & positive[inside, None]).sum(axis=0)
    extra = [j for j in range(m) if j not in selected and df[j] == 0]
    return selected + extra
