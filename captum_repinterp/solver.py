"""Stage 4: choose boundaries by greedy submodular-cost submodular cover (SCSC).

The solver sees only a boolean ``N x m`` match matrix (``match[r, j]``: reference ``r``
is on the seed's side of candidate boundary ``j``) and a boolean ``N`` vector
``positive`` (reference predicted as the seed's class). For a set ``S`` of columns,
``region(S)`` is the set of rows that match every column of ``S`` (all rows when ``S``
is empty), and

- cost ``f(S) = |P \\ region(S)|``: positives pushed out of the region (minimised);
- cover ``g(S) = |Ng \\ region(S)|``: negatives pushed out (must reach ``|Ng| - delta``).

The greedy of Wan, Du, Pardalos and Wu ("Greedy approximations for minimum submodular
cover with submodular cost", Computational Optimization and Applications 45(2), 2010)
adds, while the cover constraint is not met, the
candidate ``j`` minimising ``(df_j + eps) / dg_j`` among those with ``dg_j > 0``, where
``df_j`` / ``dg_j`` are the positives / negatives still inside that ``j`` pushes out.

Everything that decides the selection is an exact integer count of the match matrix, so
the selection does not depend on float noise in the features beyond the signs in
``match``, nor on the order of the rows. Ratios are compared with a relative tolerance
and near-ties are broken by a fixed rule (smaller ``df``, then smaller index).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .bits import pack_rows, unpack_rows

__all__ = [
    "REFINE_MODES",
    "CoverResult",
    "greedy_cover",
    "greedy_cover_bits",
    "greedy_cover_oracle",
    "pack_failing",
    "region_mask",
    "resolve_delta",
]

REFINE_MODES = ("tighten", "prune", "none")

#: Relative tolerance under which two ratios ``(df + eps) / dg`` count as tied.
RATIO_RTOL = 1e-9


@dataclass(frozen=True)
class CoverResult:
    """Outcome of :func:`greedy_cover`.

    Attributes
    ----------
    selected : Tensor
        int64 indices into the ``m`` candidates: the greedy picks in the order they were
        made (after ``prune``: the kept ones, same order), then the ``tighten`` additions
        in ascending order.
    inside : Tensor
        bool ``(N,)``: references inside ``region(selected)``.
    reached : bool
        Whether the cover constraint ``g(S) >= |Ng| - delta`` holds.
    delta : int
        Negatives allowed inside the region (the resolved count).
    cost : int
        ``f(S)``: positives outside the region.
    cover : int
        ``g(S)``: negatives outside the region.
    """

    selected: Tensor
    inside: Tensor
    reached: bool
    delta: int
    cost: int
    cover: int


def _check_match(match: object) -> Tensor:
    if not isinstance(match, Tensor):
        raise TypeError(f"match must be a torch.Tensor, got {type(match).__name__}")
    if match.dtype != torch.bool:
        raise TypeError(f"match must be a bool tensor, got dtype {match.dtype}")
    if match.dim() != 2:
        raise ValueError(f"match must be 2-D (N x m), got shape {tuple(match.shape)}")
    return match


def _check_inputs(match: object, positive: object) -> tuple[Tensor, Tensor]:
    match = _check_match(match)
    if not isinstance(positive, Tensor):
        raise TypeError(f"positive must be a torch.Tensor, got {type(positive).__name__}")
    if positive.dtype != torch.bool:
        raise TypeError(f"positive must be a bool tensor, got dtype {positive.dtype}")
    if positive.dim() != 1 or positive.shape[0] != match.shape[0]:
        raise ValueError(
            f"positive must be 1-D with one entry per row of match ({match.shape[0]}), "
            f"got shape {tuple(positive.shape)}"
        )
    return match, positive.to(match.device)


def region_mask(match: Tensor, selected: Tensor | Sequence[int]) -> Tensor:
    """Rows inside ``region(selected)``: those matching every selected column.

    Parameters
    ----------
    match : Tensor
        bool ``N x m`` match matrix.
    selected : Tensor or sequence of int
        Column indices (any order, repeats allowed). Empty: every row is inside.

    Returns
    -------
    Tensor
        bool ``(N,)`` on ``match``'s device.
    """
    match = _check_match(match)
    cols = torch.as_tensor(selected, dtype=torch.long, device=match.device).reshape(-1)
    return match.index_select(1, cols).all(dim=1)


def resolve_delta(match: Tensor, positive: Tensor, delta: int | float | None) -> int:
    """Number of negatives allowed inside the region.

    Parameters
    ----------
    match : Tensor
        bool ``N x m`` match matrix.
    positive : Tensor
        bool ``(N,)``: reference predicted as the seed's class.
    delta : int, float or None
        ``None`` ("auto"): the negatives inside ``region(all m columns)``, i.e. those no
        candidate separates from the seed; the smallest value that keeps the sampled
        problem feasible. An int in ``[0, |Ng|]``: that count. A float in ``[0, 1)``:
        that share of ``|Ng|``, rounded down.

    Returns
    -------
    int
        The resolved count.

    Raises
    ------
    ValueError
        For negative values, ints above ``|Ng|``, floats outside ``[0, 1)`` (NaN
        included) and bools; or for badly shaped ``match`` / ``positive``.
    TypeError
        For any other type of ``delta``, or non-bool / non-tensor ``match`` /
        ``positive``.
    """
    match, positive = _check_inputs(match, positive)
    negative = ~positive
    if delta is None:
        return int((match.all(dim=1) & negative).sum())
    return _delta_count(int(negative.sum()), delta)


def _delta_count(n_neg: int, delta: int | float) -> int:
    """:func:`resolve_delta` for an int or a float ``delta`` (only ``|Ng|`` matters)."""
    if isinstance(delta, (bool, np.bool_)):
        # bool is an int subclass: refuse it rather than read True as a count of 1
        raise ValueError(f"delta must be an int, a float or None, got {delta!r}")
    if isinstance(delta, numbers.Integral):
        value = int(delta)
        if not 0 <= value <= n_neg:
            raise ValueError(
                f"delta must be a count in [0, {n_neg}] (the number of negatives), got {value}"
            )
        return value
    if isinstance(delta, numbers.Real):
        share = float(delta)
        if math.isnan(share) or not 0.0 <= share < 1.0:
            raise ValueError(f"delta as a float must be a share in [0, 1), got {share}")
        return min(int(math.floor(share * n_neg)), n_neg)
    raise TypeError(f"delta must be an int, a float or None, got {type(delta).__name__}")


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be finite and >= 0, got {value}")
    return value


def _popcount(bits: np.ndarray) -> int:
    return int(np.bitwise_count(bits).sum(dtype=np.int64))


_INT64_MAX = np.iinfo(np.int64).max


def _pick(df: np.ndarray, dg: np.ndarray, available: np.ndarray, eps: float) -> int | None:
    """Index of the best candidate, or ``None`` when no candidate removes a negative.

    ``df`` and ``dg`` are exact int64 counts (numpy: these vectors are short, and numpy's
    per-call cost is far below torch's). Ratios within ``RATIO_RTOL`` (relative) of the
    smallest count as tied; ties go to the smaller ``df``, then the smaller index.
    """
    valid = available & (dg > 0)
    ratio = np.where(valid, (df + eps) / np.maximum(dg, 1), np.inf)
    best = ratio.min(initial=np.inf)
    if best == np.inf:
        return None
    tied = valid & (ratio - best <= RATIO_RTOL * ratio)
    # the first index with the smallest df among the tied
    return int(np.argmin(np.where(tied, df, _INT64_MAX)))


def _prune(failing: Tensor, picks: list[int]) -> list[int]:
    """Drop picks whose removal changes neither ``f`` nor ``g``, latest first.

    Removing ``j`` from ``S`` can only let rows back into the region, so ``f`` and ``g``
    are both unchanged iff no row is kept out by ``j`` alone: no row with ``match[r, j]``
    False and exactly one failing selected column. ``violations[r]`` counts the failing
    columns of the current selection and is updated after each removal, so every pick
    is checked once in O(N). (Removals only lower the counts, so a pick found necessary
    stays necessary: a single reverse pass is the fixed point.) ``failing`` is bool
    ``N x len(picks)``: ``failing[r, i]`` when pick ``i`` pushes reference ``r`` out.
    """
    if not picks:
        return []
    violations = failing.sum(dim=1)
    keep = [True] * len(picks)
    for pos in range(len(picks) - 1, -1, -1):
        col = failing[:, pos]
        if not bool((col & (violations == 1)).any()):
            keep[pos] = False
            violations = violations - col.long()
    return [j for j, k in zip(picks, keep) if k]


def greedy_cover(
    match: Tensor,
    positive: Tensor,
    delta: int | float | None = None,
    refine: str = "tighten",
    eps: float = 1e-3,
) -> CoverResult:
    """Greedy SCSC: few positives lost, at most ``delta`` negatives left inside.

    Parameters
    ----------
    match : Tensor
        bool ``N x m``: ``match[r, j]`` is True when reference ``r`` is on the seed's
        side of candidate boundary ``j``.
    positive : Tensor
        bool ``(N,)``: reference predicted as the seed's class (the rest are negatives).
    delta : int, float or None
        Negatives allowed inside the region, see :func:`resolve_delta`. Default ``None``:
        the negatives no candidate separates from the seed, so the constraint is always
        reached.
    refine : {"tighten", "prune", "none"}
        What to do after the greedy loop.

        - ``"tighten"`` (default): add every candidate not selected whose ``df`` on the
          final greedy region is 0 (it costs no positive; it may remove negatives, or
          nothing). Adding such a candidate never changes which positives are inside,
          and every ``df`` depends only on those, so adding them one at a time (in any
          order) or all at once gives the same set; they are added at once, in
          ascending index order.
        - ``"prune"``: walk the greedy picks from the last to the first and drop each
          one whose removal changes neither ``f`` nor ``g`` (i.e. leaves the region
          unchanged). The result is a shorter description of the same region.
        - ``"none"``: the greedy loop alone (the paper's Algorithm 1).
    eps : float
        ``eps_f`` in the ratio ``(df_j + eps) / dg_j``; it makes zero-cost candidates
        with a larger ``dg`` win.

    Returns
    -------
    CoverResult
        Selection, region, and its counts.

    Notes
    -----
    The references are bit sets (64 per machine word): one row of words per candidate
    (the references it pushes out), and the inside / positive / negative sets. Each step
    counts, for all candidates at once, the positives and negatives still inside that
    each would push out with one AND and one population count per word (exact
    integers), and a pick removes its rows with one AND-NOT. The loop runs once per
    pick, at most ``m`` times, plus once to find that nothing is left to pick. Ratios are
    compared with a relative tolerance ``RATIO_RTOL`` and near-ties go to the smaller
    ``df_j``, then the smaller index, so the selection is a deterministic function of the
    match matrix, independent of the row order.
    """
    match, positive = _check_inputs(match, positive)
    fail = pack_failing(~match.detach().cpu().numpy().T)
    return greedy_cover_bits(fail, positive, delta=delta, refine=refine, eps=eps)


def pack_failing(failing: np.ndarray) -> np.ndarray:
    """bool ``k x n`` (``failing[j, r]``: boundary ``j`` pushes reference ``r`` out) to
    the bit rows :func:`greedy_cover_bits` takes: uint64 ``k x ceil(n / 64)``, bit
    ``r % 64`` of word ``r // 64``, the bits past ``n`` zero."""
    if failing.dtype != np.bool_ or failing.ndim != 2:
        raise TypeError(f"failing must be a 2-D bool array, got {failing.dtype}, {failing.ndim}-D")
    return pack_rows(np.ascontiguousarray(failing))


def greedy_cover_bits(
    fail: np.ndarray,
    positive: Tensor,
    delta: int | float | None = None,
    refine: str = "tighten",
    eps: float = 1e-3,
) -> CoverResult:
    """:func:`greedy_cover` on a packed match matrix.

    Parameters
    ----------
    fail : numpy.ndarray
        uint64 ``m x ceil(N / 64)``: bit ``r % 64`` of word ``r // 64`` of row ``j`` is
        set when reference ``r`` is *not* on the seed's side of candidate ``j`` (the
        negation of ``match[r, j]``); bits past ``N`` are ignored. See :func:`pack_failing`.
        One bit per entry: 32 times less memory than the float margins it comes from,
        which can be packed chunk by chunk without ever holding the ``N x m`` matrix.
    positive : Tensor
        bool ``(N,)``, as in :func:`greedy_cover`, which gives ``N``.
    delta, refine, eps
        As in :func:`greedy_cover`.

    Returns
    -------
    CoverResult
        The same as :func:`greedy_cover` on the unpacked matrix.
    """
    if not isinstance(positive, Tensor) or positive.dtype != torch.bool or positive.dim() != 1:
        raise TypeError("positive must be a 1-D bool torch.Tensor")
    n = int(positive.shape[0])
    if (
        not isinstance(fail, np.ndarray)
        or fail.dtype != np.uint64
        or fail.ndim != 2
        or fail.shape[1] != max(1, -(-n // 64))
    ):
        raise ValueError(
            f"fail must be a uint64 m x {max(1, -(-n // 64))} array for {n} references"
        )
    if not isinstance(refine, str) or refine not in REFINE_MODES:
        raise ValueError(f"refine must be one of {REFINE_MODES}, got {refine!r}")
    eps = _check_eps(eps)

    m = fail.shape[0]
    if n % 64:  # whatever the caller left past N does not count
        fail = fail.copy()
        fail[:, -1] &= np.uint64((1 << (n % 64)) - 1)
    device = positive.device
    # Bit sets over the references: one row of 64-bit words per candidate (bit r set when
    # candidate j pushes reference r out), and the positive / negative / inside sets
    # (the bits past N zero in all of them); counts of sets are popcounts.
    pos_bits = pack_rows(positive.detach().cpu().numpy()[None])[0]
    everyone = pack_rows(np.ones((1, n), dtype=bool))[0]
    neg_bits = everyone & ~pos_bits
    inside = everyone.copy()
    n_neg = _popcount(neg_bits)
    if delta is None:  # negatives no candidate separates from the seed
        separated = np.bitwise_or.reduce(fail, axis=0) if m else np.zeros_like(inside)
        d = _popcount(neg_bits & ~separated)
    else:
        d = _delta_count(n_neg, delta)
    need = n_neg - d  # negatives that must be pushed out

    available = np.ones(m, dtype=bool)
    picks: list[int] = []
    covered = 0

    # the positives and the negatives still inside, as two rows of words
    inside_pn = np.stack([pos_bits, neg_bits])

    # df, dg: for every candidate, the positives and negatives still inside that it
    # pushes out; counted once, then lowered by what each pick removes (exact integers,
    # counted only over the words where the pick removed something)
    both = np.bitwise_count(fail[:, None, :] & inside_pn).sum(axis=2, dtype=np.int64)
    df, dg = both[:, 0], both[:, 1]
    while covered < need:
        j = _pick(df, dg, available, eps)
        if j is None:
            break
        picks.append(j)
        available[j] = False
        covered += int(dg[j])
        removed = inside_pn & fail[j]
        inside_pn &= ~fail[j]
        cols = np.flatnonzero(removed[0] | removed[1])
        if cols.size:
            gone = fail[:, None, cols] & removed[:, cols]
            both -= np.bitwise_count(gone).sum(axis=2, dtype=np.int64)
    inside &= inside_pn[0] | inside_pn[1]

    if refine == "tighten":
        extra = np.flatnonzero(available & (df == 0)).tolist()
        picks = picks + extra
        if extra:
            inside &= ~np.bitwise_or.reduce(fail[extra], axis=0)
    selected = torch.tensor(picks, dtype=torch.long, device=device)
    if refine == "prune":
        failing = torch.from_numpy(unpack_rows(fail[picks], n).T)  # N x len(picks)
        kept = _prune(failing, picks)
        selected = torch.tensor(kept, dtype=torch.long, device=device)
        inside = everyone.copy()
        if kept:
            inside &= ~np.bitwise_or.reduce(fail[kept], axis=0)
    region = torch.from_numpy(unpack_rows(inside[None], n)[0]).to(device)
    cost = _popcount(pos_bits & ~inside)
    cover = _popcount(neg_bits & ~inside)
    return CoverResult(
        selected=selected,
        inside=region,
        reached=cover >= need,
        delta=d,
        cost=cost,
        cover=cover,
    )


def greedy_cover_oracle(
    m: int,
    n_neg: int,
    counts: Callable[[list[int]], tuple[np.ndarray, np.ndarray]],
    unseparated: Callable[[], int],
    necessary: Callable[[int, list[int]], bool],
    delta: int | float | None = None,
    refine: str = "tighten",
    eps: float = 1e-3,
) -> tuple[list[int], int, int]:
    """The loop of :func:`greedy_cover_bits` with the counting left to callables.

    For a match matrix that no single process holds (a reference set split over
    machines, see :mod:`captum_repinterp.distributed`): every count the greedy needs is a
    sum over references, so each holder of a part answers for its rows and the sums
    decide. The picks, the ratio and its tie rule (``_pick``) and the refine steps are
    those of :func:`greedy_cover_bits`, so on the same bits the selection is the same.

    Parameters
    ----------
    m : int
        Number of candidate boundaries.
    n_neg : int
        Number of negatives ``|Ng|``.
    counts : callable
        ``counts(picks) -> (df, dg)``: int64 ``(m,)`` arrays, the positives and the
        negatives inside ``region(picks)`` that each candidate pushes out.
    unseparated : callable
        ``unseparated() -> int``: negatives that no candidate pushes out (called only
        for ``delta=None``).
    necessary : callable
        ``necessary(j, others) -> bool``: whether some reference is pushed out by ``j``
        and by none of ``others`` (called only for ``refine="prune"``).
    delta, refine, eps
        As in :func:`greedy_cover`.

    Returns
    -------
    (selected, delta, need)
        The selection in the order of :attr:`CoverResult.selected`, the resolved
        ``delta`` and the negatives that had to be pushed out (``|Ng| - delta``); the
        constraint is reached when the region holds at most ``delta`` negatives.
    """
    if not isinstance(refine, str) or refine not in REFINE_MODES:
        raise ValueError(f"refine must be one of {REFINE_MODES}, got {refine!r}")
    eps = _check_eps(eps)
    d = int(unseparated()) if delta is None else _delta_count(n_neg, delta)
    need = n_neg - d
    available = np.ones(m, dtype=bool)
    picks: list[int] = []
    covered = 0
    while covered < need:
        df, dg = counts(picks)
        j = _pick(df, dg, available, eps)
        if j is None:
            break
        picks.append(j)
        available[j] = False
        covered += int(dg[j])
    if refine == "tighten":
        df, _ = counts(picks)
        picks = picks + np.flatnonzero(available & (df == 0)).tolist()
    elif refine == "prune":
        # as _prune: latest first, a pick goes when no reference is kept out by it alone
        kept = list(picks)
        for j in reversed(picks):
            if not necessary(j, [k for k in kept if k != j]):
                kept.remove(j)
        picks = kept
    return picks, d, need
