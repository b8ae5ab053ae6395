"""Boundary sampler: exact on linear heads, correct on piecewise-linear heads."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captum_repinterp.sampler import (
    bisect_segments,
    choose_candidates,
    linear_pieces,
    near_duplicates,
    sample_boundaries,
)


def _linear_head(d: int, c: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(d, c).double()
    return head


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(2, 12), c=st.integers(2, 6))
def test_linear_head_boundaries_are_exact(seed: int, d: int, c: int) -> None:
    head = _linear_head(d, c, seed)
    gen = torch.Generator().manual_seed(seed)
    pts = torch.randn(200, d, generator=gen, dtype=torch.float64) * 3
    preds = head(pts).argmax(1)
    cls = int(preds[0])
    others = pts[preds != cls]
    if others.shape[0] == 0:
        return
    b = sample_boundaries(head, pts[0], others[:10], cls, n_steps=40, duplicate_tol=0.0)
    assert len(b) >= 1
    w_true = head.weight.detach()
    b_true = head.bias.detach()
    for w, bias, cp in zip(b.weight, b.bias, b.runner_up):
        # the local piece of G_c - G_c' is exactly the difference of the two rows
        torch.testing.assert_close(w, w_true[cls] - w_true[cp], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(bias, b_true[cls] - b_true[cp], rtol=1e-7, atol=1e-7)
    # oriented so that the seed is on the positive side
    assert ((b.weight @ pts[0] + b.bias) > 0).all()


def _relu_head(d: int, c: int) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, c)
    ).double()


def test_relu_head_boundary_points_and_normals() -> None:
    d, c = 8, 4
    head = _relu_head(d, c)
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(400, d, generator=gen, dtype=torch.float64) * 2
    preds = head(pts).argmax(1)
    cls = int(preds[0])
    ends = pts[preds != cls][:30]
    t, valid = bisect_segments(head, pts[0], ends, cls, n_steps=45)
    assert valid.all()
    p = pts[0][None] + t[:, None] * (ends - pts[0][None])
    logits = head(p).detach()
    top2 = logits.topk(2, dim=1).values
    # at the boundary the two largest logits are equal within tolerance
    assert (top2[:, 0] - top2[:, 1]).abs().max() < 1e-8
    assert (logits.argmax(1) == cls).all()  # the point is on the class-c side
    w, b, runner = linear_pieces(head, p, cls)
    # normal equals finite differences of G_c - G_c' at the point (on its own piece:
    # step towards the seed's side, which stays inside the class-c piece)
    eps = 1e-7
    for i in range(5):

        def f(z: torch.Tensor, i: int = i) -> torch.Tensor:
            out = head(z)
            return out[:, cls] - out[:, runner[i]]

        inward = (pts[0] - p[i]) * 1e-4
        base = p[i] + inward
        fd = (
            torch.stack(
                [
                    (f((base + eps * e)[None]) - f((base - eps * e)[None])) / (2 * eps)
                    for e in torch.eye(d, dtype=torch.float64)
                ]
            )
            .squeeze(1)
            .detach()
        )
        torch.testing.assert_close(w[i], fd, rtol=1e-5, atol=1e-6)
        # and the piece passes through the boundary point
        assert abs(float(w[i] @ p[i] + b[i]) - float(f(p[i][None]).detach())) < 1e-10


def test_bisection_is_batched_one_call_per_step() -> None:
    head = _relu_head(6, 3)
    calls = []

    def counting(z: torch.Tensor) -> torch.Tensor:
        calls.append(z.shape[0])
        return head(z)

    gen = torch.Generator().manual_seed(1)
    pts = torch.randn(300, 6, generator=gen, dtype=torch.float64)
    preds = head(pts).argmax(1)
    cls = int(preds[0])
    ends = pts[preds != cls][:25]
    bisect_segments(counting, pts[0], ends, cls, n_steps=12)
    assert len(calls) == 1 + 12
    assert calls[1:] == [ends.shape[0]] * 12


def test_linear_pieces_one_backward_matches_per_sample() -> None:
    head = _relu_head(5, 3)
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    w, b, r = linear_pieces(head, p, 1)
    for i in range(20):
        wi, bi, ri = linear_pieces(head, p[i : i + 1], 1)
        torch.testing.assert_close(w[i : i + 1], wi)
        torch.testing.assert_close(b[i : i + 1], bi)
        assert int(r[i]) == int(ri[0])


def test_candidates_deterministic_and_from_other_classes() -> None:
    preds = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    a = choose_candidates(preds, 0, True, 4, random_state=5)
    b = choose_candidates(preds, 0, True, 4, random_state=5)
    assert torch.equal(a, b)
    assert (preds[a] != 0).all() and a.unique().numel() == 4
    c = choose_candidates(preds, 0, False, 10, random_state=5)
    assert (preds[c] == 0).all() and c.numel() == 4


def test_near_duplicates_and_drop_of_non_bracketing() -> None:
    w = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1e-9]])
    b = torch.tensor([1.0, 2.0, 0.5, 1.0])
    assert near_duplicates(w, b).tolist() == [False, True, False, True]
    head = _linear_head(3, 2, 0)
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(100, 3, generator=gen, dtype=torch.float64)
    preds = head(pts).argmax(1)
    cls = int(preds[0])
    same = pts[preds == cls][:5]  # no class change on these segments
    assert len(sample_boundaries(head, pts[0], same, cls)) == 0


def test_near_duplicates_from_a_gram_matrix_equal_the_direct_ones():
    """Normals w = A^T u: the Gram matrix U (A A^T) U^T gives the same merges."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(6, 30, generator=gen, dtype=torch.float64)
    u = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    u[3] = 2.5 * u[1]  # same plane as 1 once the bias is scaled too
    u[5] = u[0] * (1 + 1e-9)  # a near-duplicate of 0
    bias = torch.randn(7, generator=gen, dtype=torch.float64)
    bias[3] = 2.5 * bias[1]
    bias[5] = bias[0]
    w = u @ a
    direct = near_duplicates(w, bias)
    via_gram = near_duplicates(w, bias, gram=u @ (a @ a.T) @ u.T)
    assert direct.tolist() == via_gram.tolist() == [False, False, False, True, False, True, False]
    assert not near_duplicates(w, bias, tol=-1.0).any()
