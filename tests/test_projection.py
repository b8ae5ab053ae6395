"""The exact projection shortcut for heads that start with an affine map."""

import torch
from torch import nn

from captum_repinterp import RepresentativeInterpretation
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
    torch.testing.assert_close(proj.projected, feats @ narrow[0].weight.detach().T,
                               rtol=1e-5, atol=1e-5)
