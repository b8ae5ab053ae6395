"""Small pure helpers of ``features.py``."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_repinterp.inputs import all_finite


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


@settings(max_examples=60, deadline=None)
@given(
    n_huge=st.integers(0, 6),
    bad=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]),
    where=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
)
def test_all_finite_when_the_sum_overflows(n_huge, bad, where, dtype):
    """The fast path sums the values; finite values whose sum overflows (or infinities
    of both signs, whose sum is NaN) must still get the exact answer."""
    big = torch.finfo(dtype).max
    t = torch.zeros(4, 5, dtype=dtype)
    t.view(-1)[:n_huge] = big  # two or more of these overflow any sum
    if bad is not None:
        t.view(-1)[where % t.numel()] = bad
    assert all_finite(t, chunk_elements=3) == bool(torch.isfinite(t).all())


def test_layout_flatten_of_one_output_is_a_view_and_of_several_a_concatenation():
    from captum_repinterp.features import LayerLayout

    a = torch.arange(24.0).reshape(2, 3, 4)
    b = torch.arange(10.0).reshape(2, 5)
    one = LayerLayout.from_outputs((a,), False)
    flat = one.flatten((a,))
    assert flat.shape == (2, 12) and flat.data_ptr() == a.data_ptr()
    torch.testing.assert_close(one.unflatten(flat)[0], a)
    two = LayerLayout.from_outputs((a, b), True)
    both = two.flatten((a, b))
    torch.testing.assert_close(both, torch.cat([a.reshape(2, -1), b], dim=1))
    back = two.unflatten(both)
    torch.testing.assert_close(back[0], a)
    torch.testing.assert_close(back[1], b)
    # a non-contiguous output (channels last) is copied into row-major order
    cl = torch.arange(48.0).reshape(2, 3, 2, 4).to(memory_format=torch.channels_last)
    flat_cl = LayerLayout.from_outputs((cl,), False).flatten((cl,))
    torch.testing.assert_close(flat_cl, cl.contiguous().reshape(2, -1))
    assert flat_cl.is_contiguous()
