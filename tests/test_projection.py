"""The exact projection shortcut for heads that start with an affine map."""

import numpy as np
import pytest
import torch
from torch import nn

from captum_repinterp import RepresentativeInterpretation, boundaries
from captum_repinterp.match import margins
from captum_repinterp.projection import build_projection


def test_projection_margins_equal_the_full_product(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    proj = ri.projection_
    assert proj is not None and proj.projected.shape == (200, 24)
    # rows of the basis are W1 itself (Flatten is the identity on psi)
    torch.testing.assert_close(proj.basis.float(), model.head[1].weight.detach())
    regs = ri.interpret(x[200:205])
    for reg in regs:
        fast = proj.margins(reg.weight, reg.bias)
        full = margins(ri.features_, reg.weight, reg.bias)
        torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-4)
        # the packed signs and the members' margins come from the same projection
        u = proj.coefficients(reg.weight)
        bits = proj.failing_bits_of(u, reg.bias)
        fails = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :200]
        clear = fast.abs() > 1e-4  # away from float round-off at the plane
        assert np.array_equal(fails.astype(bool).T[clear.numpy()], (fast <= 0)[clear].numpy())
        idx = torch.tensor([3, 0, 150, 7])
        sel = torch.arange(len(reg.bias))[::2]
        torch.testing.assert_close(
            proj.margins_rows(idx, u[sel], reg.bias[sel]), fast[idx][:, sel], rtol=1e-5, atol=1e-5
        )
    # a direction outside the row space is refused, not approximated
    w = torch.randn(3, ri.layout_.dim, generator=torch.Generator().manual_seed(0))
    assert proj.margins(w, torch.zeros(3)) is None


def test_same_interpretations_with_and_without_projection(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    with_proj = ri.interpret(x[200:206])
    ri.projection_ = None
    without = ri.interpret(x[200:206])
    for a, b in zip(with_proj, without):
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(a.members, b.members)


def test_no_projection_when_the_head_is_not_affine_first():
    torch.manual_seed(0)
    head = nn.Sequential(nn.ReLU(), nn.Linear(40, 3))  # ReLU before the linear layer
    feats = torch.randn(30, 40)
    assert build_projection(head, head, feats) is None
    wide = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 3))  # r * 4 > D
    assert build_projection(wide, wide, feats) is None
    narrow = nn.Sequential(nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 3))
    proj = build_projection(narrow, narrow, feats)
    assert proj is not None
    torch.testing.assert_close(
        proj.projected, feats @ narrow[0].weight.detach().T, rtol=1e-5, atol=1e-5
    )


class _SkipHead(nn.Module):
    """Affine first, but the features are read again after the first linear layer."""

    def __init__(self, d: int, r: int, c: int) -> None:
        super().__init__()
        self.first, self.out, self.skip = nn.Linear(d, r), nn.Linear(r, c), nn.Linear(d, c)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        f = a.flatten(1)
        return self.out(torch.relu(self.first(f))) + self.skip(f)


def _count_z_path(ri, monkeypatch):
    """Per seed, whether the crossings ran on z: the checked head on z, found either by
    ``Projection.sampling_head`` or, with the references' logits kept by fit, by
    comparing its values at the seed and the candidates with them."""
    used = []
    orig = ri.projection_.sampling_head

    def spy(*args, **kwargs):
        zhead = orig(*args, **kwargs)
        used.append(zhead is not None)
        return zhead

    orig_known = boundaries._zhead_matching

    def spy_known(*args, **kwargs):
        zhead, logits = orig_known(*args, **kwargs)
        used.append(zhead is not None)
        return zhead, logits

    ri.projection_.sampling_head = spy
    monkeypatch.setattr(boundaries, "_zhead_matching", spy_known)
    return used


@pytest.mark.parametrize("user_head", [False, True])
def test_sampling_in_z_gives_the_same_interpretations(tiny, user_head, monkeypatch):
    """The bisection and backward in the leading linear layer's output space pick the
    same boundaries as on the features, for a user Sequential head and a hook head."""
    model, x = tiny
    head = model.head if user_head else None
    ri = RepresentativeInterpretation(model, model.features[-1], head=head)
    ri.fit(x[:200], progress=False)
    used = _count_z_path(ri, monkeypatch)
    fast = ri.interpret(x[200:210], target=[i % 4 for i in range(10)])
    assert used == [True] * 10
    ri.projection_ = None
    plain = ri.interpret(x[200:210], target=[i % 4 for i in range(10)])
    for a, b in zip(fast, plain):
        assert torch.equal(a.members, b.members)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.bias, b.bias, rtol=1e-4, atol=1e-5)


def test_sampling_in_z_is_refused_when_the_head_reads_features_again(monkeypatch):
    torch.manual_seed(0)
    feats = torch.randn(60, 2, 4, 4)
    head = _SkipHead(32, 6, 3).eval()
    layer = nn.Identity()
    model = nn.Sequential(layer, head).eval()
    ri = RepresentativeInterpretation(model, layer, head=head).fit(feats, progress=False)
    assert ri.projection_ is not None and ri.projection_.module is head.first
    used = _count_z_path(ri, monkeypatch)
    regs = ri.interpret(feats[:4])
    assert used == [False] * 4
    # and the result is what the plain path gives
    ri.projection_ = None
    for a, b in zip(regs, ri.interpret(feats[:4])):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.members, b.members)


def test_two_writers_of_one_projection_file_do_not_collide(tmp_path):
    """Two fits of one finished store (two processes reading the same references) both
    write ``projected.npy``. They wrote it through the same temporary name: the second
    truncated the first's half-written file and moved it into place, and the first then
    failed with FileNotFoundError. Each writer now has its own temporary file."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(48, 4), nn.ReLU(), nn.Linear(4, 3))
    features = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    out = tmp_path / "projected.npy"
    expected = build_projection(head, head, features)
    assert expected is not None

    class OtherWriterMidway:
        """``features``, running a whole second build when the first reads its second
        chunk (as another process would, part-way through the first's writes)."""

        shape = features.shape

        def __init__(self) -> None:
            self.chunks = 0

        def __getitem__(self, index):
            if isinstance(index, slice) and index.start == 16:  # the write loop's 2nd chunk
                self.chunks += 1
                if self.chunks == 1:
                    other = build_projection(head, head, features, chunk_size=16, out_path=out)
                    torch.testing.assert_close(other.projected, expected.projected)
            return features[index]

    first = build_projection(head, head, OtherWriterMidway(), chunk_size=16, out_path=out)
    torch.testing.assert_close(first.projected, expected.projected)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "projected.npy"]
