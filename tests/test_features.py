"""Small pure helpers of ``features.py``."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_repinterp.features import all_finite


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 9),
    cols=st.integers(1, 7),
    bad=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]),
    where=st.integers(0, 10_000),
    chunk=st.integers(1, 40),
)
def test_all_finite_matches_torch_in_any_chunking(rows, cols, bad, where, chunk):
    t = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    if bad is not None and t.numel():
        t.view(-1)[where % t.numel()] = bad
    assert all_finite(t, chunk_elements=chunk) == bool(torch.isfinite(t).all())


def test_all_finite_on_other_shapes():
    assert all_finite(torch.tensor(1.0)) and not all_finite(torch.tensor(float("nan")))
    assert all_finite(torch.arange(5))  # integers are always finite
    x = torch.zeros(3, 2, 2)
    x[2, 1, 1] = float("inf")
    assert not all_finite(x, chunk_elements=4)
