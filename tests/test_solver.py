"""Greedy SCSC solver: hand-computed picks, properties, brute force, a naive reference."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_repinterp.solver import CoverResult, greedy_cover, region_mask, resolve_delta

REFINES = ("none", "tighten", "prune")


def _instance(rows: list[str], cols: list[set[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows labelled "P"/"N"; ``cols[j]`` = rows that boundary ``j`` pushes out."""
    n = len(rows)
    match = torch.ones(n, len(cols), dtype=torch.bool)
    for j, out in enumerate(cols):
        for r in out:
            match[r, j] = False
    positive = torch.tensor([lab == "P" for lab in rows], dtype=torch.bool)
    return match, positive


def _counts(match: torch.Tensor, positive: torch.Tensor, sel: list[int]) -> tuple[int, int]:
    inside = region_mask(match, sel)
    return int((positive & ~inside).sum()), int((~positive & ~inside).sum())


# --------------------------------------------------------------------------- by hand
# rows 0-3 positives P0..P3, rows 4-9 negatives N0..N5
RATIO_ROWS = ["P"] * 4 + ["N"] * 6
RATIO_COLS = [
    {0, 4, 5, 6, 7},  # c0: P0, N0-N3            df 1, dg 4
    {4},  # c1: N0                               df 0, dg 1
    {1, 2, 4, 5, 6, 7, 8, 9},  # c2: P1 P2, N0-N5 df 2, dg 6
    {8, 9},  # c3: N4 N5                         df 0, dg 2
    set(),  # c4: pushes out nothing             df 0, dg 0
]


def test_ratio_rule_by_hand() -> None:
    match, positive = _instance(RATIO_ROWS, RATIO_COLS)
    # step 1: ratios c0 1.001/4, c1 0.001/1, c2 2.001/6, c3 0.001/2 -> c3 (the eps term
    #         makes the zero-cost boundary with the larger dg win over c1)
    # step 2 (N0-N3 inside): c0 1.001/4, c1 0.001/1, c2 2.001/4 -> c1
    # step 3 (N1-N3 inside): c0 1.001/3, c2 2.001/3 -> c0; all 6 negatives out
    res = greedy_cover(match, positive, delta=0, refine="none")
    assert res.selected.tolist() == [3, 1, 0]
    assert (res.cost, res.cover, res.delta, res.reached) == (1, 6, 0, True)
    assert res.inside.tolist() == [False, True, True, True] + [False] * 6
    assert res.selected.dtype == torch.int64
    # tighten: on the final region (P1-P3 inside) c2 has df 2, c4 has df 0 -> add c4
    assert greedy_cover(match, positive, delta=0).selected.tolist() == [3, 1, 0, 4]
    # prune, last pick first: c0 alone keeps N1-N3 out -> keep; c1 only pushes out N0,
    # which c0 pushes out too -> drop; c3 alone keeps N4, N5 out -> keep
    pruned = greedy_cover(match, positive, delta=0, refine="prune")
    assert pruned.selected.tolist() == [3, 0]
    assert (pruned.cost, pruned.cover) == (1, 6)
    # auto delta: every negative is cut by some candidate -> delta 0, same picks
    auto = greedy_cover(match, positive, refine="none")
    assert auto.delta == 0 and auto.selected.tolist() == [3, 1, 0]
    # delta 3: three negatives must go out -> c3 then c1 suffice, no positive lost
    short = greedy_cover(match, positive, delta=3, refine="none")
    assert short.selected.tolist() == [3, 1]
    assert (short.cost, short.cover, short.reached) == (0, 3, True)
    # a fraction: floor(0.5 * 6) = 3 -> the same
    assert greedy_cover(match, positive, delta=0.5, refine="none").selected.tolist() == [3, 1]


# rows 0-2 positives P0..P2, rows 3-8 negatives N0..N5
TIE_ROWS = ["P"] * 3 + ["N"] * 6
TIE_COLS = [
    {0, 1, 3, 4, 5, 6},  # c0: P0 P1, N0-N3  df 2, dg 4
    {2, 7, 8},  # c1: P2, N4 N5              df 1, dg 2
    {0, 3, 4},  # c2: P0, N0 N1              df 1, dg 2
]


def test_ties_by_hand() -> None:
    match, positive = _instance(TIE_ROWS, TIE_COLS)
    # eps 1e-3: c0 2.001/4 = 0.50025 beats c1, c2 at 1.001/2 = 0.5005 -> c0; then only
    # P2, N4, N5 are inside: c1 (df 1, dg 2), c2 removes nothing -> c1
    res = greedy_cover(match, positive, delta=0, refine="none")
    assert res.selected.tolist() == [0, 1]
    # eps 0: all three ratios are exactly 0.5 -> smaller df (c1, c2) -> smaller index c1;
    # then c0 (2/4) and c2 (1/2) tie -> smaller df -> c2; then c0 (P1 / N2 N3)
    res0 = greedy_cover(match, positive, delta=0, refine="none", eps=0.0)
    assert res0.selected.tolist() == [1, 2, 0]
    assert (res0.cost, res0.cover) == (3, 6)
    # eps 1e-12: the ratios differ by ~5e-13 (relative), below the tolerance 1e-9, so
    # they count as tied and the tie rule decides, as with eps 0
    res12 = greedy_cover(match, positive, delta=0, refine="none", eps=1e-12)
    assert res12.selected.tolist() == [1, 2, 0]
    # prune [1, 2, 0]: c0 alone keeps P1, N2, N3 out -> keep; c2's rows are all out by
    # c0 too -> drop; c1 alone keeps P2, N4, N5 out -> keep
    pruned = greedy_cover(match, positive, delta=0, refine="prune", eps=0.0)
    assert pruned.selected.tolist() == [1, 0]


def test_equal_columns_tie_goes_to_smaller_index() -> None:
    # P0, N0, N1; c0 pushes out N0, c1 pushes out N1: same df 0 and dg 1 -> c0 first
    match, positive = _instance(["P", "N", "N"], [{1}, {2}])
    assert greedy_cover(match, positive, refine="none").selected.tolist() == [0, 1]
    # swapping the columns swaps the contents, not the order of the picks by index
    assert greedy_cover(match.flip(1), positive, refine="none").selected.tolist() == [0, 1]
    # one pick allowed to stay short: delta 1 -> only c0
    assert greedy_cover(match, positive, delta=1, refine="none").selected.tolist() == [0]


def test_infeasible_stops_and_reports() -> None:
    # N1 is on the seed's side of every candidate: with delta 0 the greedy cuts N0 and
    # stops with reached=False; auto delta is 1 and reaches the same selection
    match, positive = _instance(["P", "N", "N"], [{1}, set()])
    res = greedy_cover(match, positive, delta=0, refine="none")
    assert res.selected.tolist() == [0]
    assert (res.reached, res.cover, res.delta) == (False, 1, 0)
    auto = greedy_cover(match, positive, refine="none")
    assert auto.selected.tolist() == [0] and auto.reached and auto.delta == 1


# --------------------------------------------------------------------------- edge cases
def test_no_candidates() -> None:
    positive = torch.tensor([True, False, False])
    match = torch.ones(3, 0, dtype=torch.bool)
    for refine in REFINES:
        res = greedy_cover(match, positive, delta=0, refine=refine)
        assert res.selected.tolist() == [] and not res.reached
        assert res.inside.all() and (res.cost, res.cover) == (0, 0)
        assert greedy_cover(match, positive, delta=2, refine=refine).reached
        auto = greedy_cover(match, positive, refine=refine)
        assert auto.reached and auto.delta == 2


def test_no_references() -> None:
    match = torch.ones(0, 4, dtype=torch.bool)
    positive = torch.ones(0, dtype=torch.bool)
    res = greedy_cover(match, positive, refine="none")
    assert res.reached and res.selected.tolist() == [] and res.inside.shape == (0,)
    # every candidate costs nothing on an empty set: tighten takes them all
    assert greedy_cover(match, positive).selected.tolist() == [0, 1, 2, 3]
    assert greedy_cover(torch.ones(0, 0, dtype=torch.bool), positive).reached


def test_no_negatives() -> None:
    match, positive = _instance(["P", "P", "P"], [{0}, set(), {1, 2}, set()])
    res = greedy_cover(match, positive, refine="none")
    assert res.selected.tolist() == [] and res.reached and res.inside.all()
    assert greedy_cover(match, positive, delta=0, refine="prune").selected.tolist() == []
    # tighten adds the zero-cost columns
    tight = greedy_cover(match, positive, delta=0)
    assert tight.selected.tolist() == [1, 3] and tight.cost == 0 and tight.inside.all()


def test_no_positives() -> None:
    match, positive = _instance(["N", "N", "N"], [{0}, {0, 1}, {2}])
    # all ratios are eps / dg: c1 (dg 2) first, then c2
    res = greedy_cover(match, positive, refine="none")
    assert res.selected.tolist() == [1, 2] and res.cover == 3 and res.cost == 0
    # every other column costs nothing: tighten adds c0
    assert greedy_cover(match, positive).selected.tolist() == [1, 2, 0]


# --------------------------------------------------------------------------- random
@st.composite
def instances(draw: st.DrawFn, max_n: int = 40, max_m: int = 12) -> tuple:
    n = draw(st.integers(0, max_n))
    m = draw(st.integers(0, max_m))
    p_match = draw(st.sampled_from([0.5, 0.7, 0.85, 0.95]))
    p_pos = draw(st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    match = torch.from_numpy(rng.random((n, m)) < p_match)
    positive = torch.from_numpy(rng.random(n) < p_pos)
    n_neg = int((~positive).sum())
    kind = draw(st.sampled_from(["auto", "int", "float"]))
    if kind == "auto":
        delta = None
    elif kind == "int":
        delta = draw(st.integers(0, n_neg))
    else:
        delta = draw(st.floats(0.0, 1.0, exclude_max=True, allow_nan=False))
    return match, positive, delta


def _expected_delta(positive: torch.Tensor, match: torch.Tensor, delta) -> int:
    n_neg = int((~positive).sum())
    if delta is None:
        return int((match.all(1) & ~positive).sum())
    if isinstance(delta, float):
        return math.floor(delta * n_neg)
    return delta


def _check_consistent(res: CoverResult, match: torch.Tensor, positive: torch.Tensor) -> None:
    sel = res.selected.tolist()
    assert res.selected.dtype == torch.int64
    assert len(set(sel)) == len(sel) and all(0 <= j < match.shape[1] for j in sel)
    inside = region_mask(match, sel)
    assert torch.equal(res.inside, inside)
    assert match[res.inside][:, res.selected].all()
    assert (res.cost, res.cover) == _counts(match, positive, sel)
    need = int((~positive).sum()) - res.delta
    assert res.reached == (res.cover >= need)


@settings(max_examples=150, deadline=None)
@given(inst=instances())
def test_properties(inst: tuple) -> None:
    match, positive, delta = inst
    d = resolve_delta(match, positive, delta)
    assert d == _expected_delta(positive, match, delta)
    n_neg = int((~positive).sum())
    feasible = int((match.all(1) & ~positive).sum()) <= d
    results = {r: greedy_cover(match, positive, delta=delta, refine=r) for r in REFINES}
    for res in results.values():
        _check_consistent(res, match, positive)
        assert res.delta == d
        assert res.reached == feasible
        if feasible:
            assert res.cover >= n_neg - d
    if delta is None:
        assert all(res.reached for res in results.values())

    # along the greedy sequence f never decreases and g strictly increases
    picks = results["none"].selected.tolist()
    seq = [_counts(match, positive, picks[:k]) for k in range(len(picks) + 1)]
    assert all(a[0] <= b[0] for a, b in zip(seq, seq[1:]))
    assert all(a[1] < b[1] for a, b in zip(seq, seq[1:]))
    # the loop stops as soon as the constraint holds
    assert all(g < n_neg - d for _, g in seq[:-1])

    none, tight, pruned = results["none"], results["tighten"], results["prune"]
    # tighten: the greedy picks, then ascending additions, and no positive lost
    extra = tight.selected.tolist()[len(picks) :]
    assert tight.selected.tolist()[: len(picks)] == picks and extra == sorted(extra)
    assert tight.cost == none.cost and tight.cover >= none.cover
    # every candidate left out would cost a positive on the tightened region
    left = sorted(set(range(match.shape[1])) - set(tight.selected.tolist()))
    for j in left:
        assert bool((tight.inside & positive & ~match[:, j]).any())
    # prune: same counts (same region), a subsequence of the picks, never longer
    assert (pruned.cost, pruned.cover) == (none.cost, none.cover)
    assert torch.equal(pruned.inside, none.inside)
    kept = pruned.selected.tolist()
    assert len(kept) <= len(picks)
    assert kept == [j for j in picks if j in set(kept)]
    # and nothing in it can be dropped any more
    for j in kept:
        assert _counts(match, positive, [k for k in kept if k != j]) != (
            pruned.cost,
            pruned.cover,
        )


# --------------------------------------------------------------------------- naive
EPS = Fraction(1, 1000)


def _naive(match: torch.Tensor, positive: torch.Tensor, delta: int, refine: str) -> list[int]:
    """The literal greedy loop of docs/method.md on Python sets, exact rational ratios."""
    n, m = match.shape
    pos = {r for r in range(n) if positive[r]}
    neg = set(range(n)) - pos
    out = [{r for r in range(n) if not match[r, j]} for j in range(m)]
    sel: list[int] = []
    inside = set(range(n))
    while len(neg - inside) < len(neg) - delta:
        best = None
        for j in range(m):
            if j in sel:
                continue
            df = len(inside & pos & out[j])
            dg = len(inside & neg & out[j])
            if dg == 0:
                continue
            key = ((df + EPS) / dg, df, j)
            if best is None or key < best:
                best = key
        if best is None:
            break
        sel.append(best[2])
        inside -= out[best[2]]
    if refine == "tighten":  # one at a time, recomputing df after each addition
        for j in range(m):
            if j not in sel and not inside & pos & out[j]:
                sel.append(j)
                inside -= out[j]
    elif refine == "prune":  # drop, last pick first, what leaves the region unchanged

        def region(s: list[int]) -> set[int]:
            return set(range(n)).difference(*(out[k] for k in s))

        for j in reversed(list(sel)):
            rest = [k for k in sel if k != j]
            if region(rest) == region(sel):
                sel = rest
    return sel


@settings(max_examples=120, deadline=None)
@given(inst=instances(max_n=30, max_m=8))
def test_brute_force_and_naive(inst: tuple) -> None:
    match, positive, delta = inst
    n, m = match.shape
    d = resolve_delta(match, positive, delta)
    n_neg = int((~positive).sum())
    res = greedy_cover(match, positive, delta=delta, refine="none")

    # brute force over all subsets of columns
    best = None
    for k in range(m + 1):
        for subset in itertools.combinations(range(m), k):
            f, g = _counts(match, positive, list(subset))
            if g >= n_neg - d and (best is None or f < best):
                best = f
    assert res.reached == (best is not None)
    if best is not None:
        assert best <= res.cost

    for refine in REFINES:
        got = greedy_cover(match, positive, delta=delta, refine=refine).selected.tolist()
        assert got == _naive(match, positive, d, refine), refine


@settings(max_examples=60, deadline=None)
@given(inst=instances(max_n=300, max_m=10))
def test_naive_across_several_words(inst: tuple) -> None:
    """The bit-packed solver (64 references per word) against the naive greedy when the
    references span several words and a partly filled last one."""
    match, positive, delta = inst
    d = resolve_delta(match, positive, delta)
    # the same match matrix stored candidate-major (the transpose of an m x N array, as
    # the package computes margins) must give the same answer
    candidate_major = match.T.contiguous().T
    assert candidate_major.T.is_contiguous()
    for refine in REFINES:
        res = greedy_cover(match, positive, delta=delta, refine=refine)
        assert res.selected.tolist() == _naive(match, positive, d, refine), refine
        _check_consistent(res, match, positive)
        other = greedy_cover(candidate_major, positive, delta=delta, refine=refine)
        assert torch.equal(other.selected, res.selected)
        assert torch.equal(other.inside, res.inside)


# --------------------------------------------------------------------------- invariance
@settings(max_examples=60, deadline=None)
@given(inst=instances(), perm_seed=st.integers(0, 2**31 - 1))
def test_row_permutation_invariance(inst: tuple, perm_seed: int) -> None:
    match, positive, delta = inst
    perm = torch.randperm(match.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    for refine in REFINES:
        a = greedy_cover(match, positive, delta=delta, refine=refine)
        b = greedy_cover(match[perm], positive[perm], delta=delta, refine=refine)
        assert torch.equal(a.selected, b.selected)
        assert torch.equal(a.inside[perm], b.inside)
        assert (a.cost, a.cover, a.delta, a.reached) == (b.cost, b.cover, b.delta, b.reached)


def test_larger_instance_is_fast_and_valid() -> None:
    rng = np.random.default_rng(0)
    match = torch.from_numpy(rng.random((20000, 50)) < 0.9)
    positive = torch.from_numpy(rng.random(20000) < 0.3)
    for refine in REFINES:
        res = greedy_cover(match, positive, refine=refine)
        _check_consistent(res, match, positive)
        assert res.reached


# --------------------------------------------------------------------------- validation
def test_region_mask() -> None:
    match, _ = _instance(["P", "N", "N"], [{1}, {2}])
    assert region_mask(match, []).tolist() == [True, True, True]
    assert region_mask(match, [0]).tolist() == [True, False, True]
    assert region_mask(match, torch.tensor([1, 0])).tolist() == [True, False, False]


def test_delta_validation() -> None:
    match, positive = _instance(["P", "N", "N"], [{1}, {2}])
    assert resolve_delta(match, positive, 2) == 2
    assert resolve_delta(match, positive, np.int64(1)) == 1
    assert resolve_delta(match, positive, 0.99) == 1
    assert resolve_delta(match, positive, 0.0) == 0
    for bad in (-1, 3, -0.1, 1.0, 1.5, float("nan"), float("inf"), True, False):
        with pytest.raises(ValueError, match="delta"):
            resolve_delta(match, positive, bad)
        with pytest.raises(ValueError, match="delta"):
            greedy_cover(match, positive, delta=bad)
    for bad in ("1", [1], torch.tensor(1), 1j):
        with pytest.raises(TypeError, match="delta"):
            greedy_cover(match, positive, delta=bad)


def test_argument_validation() -> None:
    match, positive = _instance(["P", "N", "N"], [{1}, {2}])
    with pytest.raises(ValueError, match="refine"):
        greedy_cover(match, positive, refine="tight")
    with pytest.raises(ValueError, match="refine"):
        greedy_cover(match, positive, refine=None)
    with pytest.raises(TypeError, match="match"):
        greedy_cover(match.int(), positive)
    with pytest.raises(TypeError, match="match"):
        greedy_cover(match.numpy(), positive)
    with pytest.raises(ValueError, match="match"):
        greedy_cover(match[:, 0], positive)
    with pytest.raises(TypeError, match="positive"):
        greedy_cover(match, positive.float())
    with pytest.raises(TypeError, match="positive"):
        greedy_cover(match, [True, False, False])
    with pytest.raises(ValueError, match="positive"):
        greedy_cover(match, positive[:2])
    with pytest.raises(ValueError, match="positive"):
        greedy_cover(match, positive[:, None])
    with pytest.raises(ValueError, match="eps"):
        greedy_cover(match, positive, eps=-1.0)
    with pytest.raises(TypeError, match="eps"):
        greedy_cover(match, positive, eps="0.1")
    with pytest.raises(TypeError, match="match"):
        region_mask(match.float(), [0])


# --------------------------------------------------------------------------- duplicated candidates
@st.composite
def _instances(draw):
    n = draw(st.integers(1, 80))
    m = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    match = torch.from_numpy(rng.random((n, m)) < draw(st.floats(0.2, 0.9)))
    positive = torch.from_numpy(rng.random(n) < draw(st.floats(0.0, 1.0)))
    dup = draw(st.integers(0, m - 1))
    return match, positive, dup


@settings(max_examples=80, deadline=None)
@given(inst=_instances(), delta=st.sampled_from([None, 0, 0.5]))
def test_a_duplicated_candidate_changes_no_region(inst, delta):
    """Appending a copy of a candidate column changes neither the region nor the counts
    (the copy can only tie with its original, and ties go to the smaller index)."""
    match, positive, dup = inst
    doubled = torch.cat([match, match[:, dup : dup + 1]], dim=1)
    for refine in ("none", "tighten", "prune"):
        a = greedy_cover(match, positive, delta=delta, refine=refine)
        b = greedy_cover(doubled, positive, delta=delta, refine=refine)
        assert torch.equal(a.inside, b.inside), refine
        assert (a.cost, a.cover, a.delta, a.reached) == (b.cost, b.cover, b.delta, b.reached)
        m = match.shape[1]
        picks = b.selected.tolist()
        if refine != "tighten":
            assert picks == a.selected.tolist()
        else:  # the copy joins exactly when its original is a zero-cost addition or pick
            assert [j for j in picks if j < m] == a.selected.tolist()
            assert (m in picks) == (dup in picks)
