"""Packed match matrix: the same signs as the float margins, chunk by chunk."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_repinterp.match import failing_bits, margins
from captum_repinterp.solver import greedy_cover, greedy_cover_bits, pack_failing


def _unpacked(bits: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :n].astype(bool)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(0, 300),
    k=st.integers(0, 6),
    d=st.integers(1, 5),
    chunk=st.sampled_from([1, 64, 70, 128, 8192]),
    nan_row=st.integers(-1, 299),
    seed=st.integers(0, 2**31 - 1),
)
def test_failing_bits_are_the_signs_of_the_margins(n, k, d, chunk, nan_row, seed):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=gen)
    # a few exact zeros: a margin of 0 is not on the positive side
    feats[: n // 7] = 0.0
    if 0 <= nan_row < n:
        feats[nan_row] = float("nan")
    w = torch.randn(k, d, generator=gen)
    b = torch.randn(k, generator=gen)
    b[: k // 2] = 0.0
    bits = failing_bits(feats, w, b, chunk_size=chunk)
    words = max(1, -(-n // 64))
    assert bits.dtype == np.uint64 and bits.shape == (k, words)
    expected = ~(margins(feats, w, b) > 0).numpy().T  # NaN margins fail
    assert np.array_equal(_unpacked(bits, n), expected)
    # nothing set past N, and the same as packing the bool matrix directly
    assert np.array_equal(bits, pack_failing(expected.reshape(k, n)))
    all_bits = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")
    assert not all_bits[:, n:].any()


def test_failing_bits_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="N x D and k x D"):
        failing_bits(torch.zeros(4, 3), torch.zeros(2, 5), torch.zeros(2))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), m=st.integers(0, 8), seed=st.integers(0, 2**31 - 1))
def test_cover_on_bits_ignores_what_lies_past_n(n, m, seed):
    rng = np.random.default_rng(seed)
    match = torch.from_numpy(rng.random((n, m)) < 0.8)
    positive = torch.from_numpy(rng.random(n) < 0.5)
    fail = pack_failing(~match.numpy().T)
    dirty = fail.copy()
    if n % 64:
        dirty[:, -1] |= ~np.uint64((1 << (n % 64)) - 1)  # garbage past N
    for refine in ("tighten", "prune", "none"):
        a = greedy_cover(match, positive, refine=refine)
        b = greedy_cover_bits(dirty, positive, refine=refine)
        assert torch.equal(a.selected, b.selected) and torch.equal(a.inside, b.inside)
        assert (a.cost, a.cover, a.delta, a.reached) == (b.cost, b.cover, b.delta, b.reached)


def test_cover_on_bits_validates_its_arguments():
    positive = torch.tensor([True, False, True])
    fail = pack_failing(np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="uint64 m x 1"):
        greedy_cover_bits(fail.astype(np.int64), positive)
    with pytest.raises(ValueError, match="uint64 m x 1"):
        greedy_cover_bits(np.zeros((2, 2), dtype=np.uint64), positive)
    with pytest.raises(TypeError, match="positive"):
        greedy_cover_bits(fail, positive.long())
    with pytest.raises(TypeError, match="failing"):
        pack_failing(np.zeros((2, 3)))
