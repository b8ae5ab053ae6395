"""An exact shortcut for the match matrix when the head starts with an affine map.

Most heads begin with a linear layer (after flattening or permuting): ``psi -> W1 T(psi)``
with ``T`` affine. Every gradient of the head with respect to ``psi`` then lies in the
row space of ``A = W1 J_T`` (``r x D``, ``r`` hidden units): ``w = A^T u``. The margins of
all references, ``F w + b``, are then ``P u + b`` with ``P = F A^T`` (``N x r``) computed
once at fit time, which is ``D / r`` times cheaper per seed.

Nothing here is trusted blindly: every boundary's ``u`` is solved by least squares and
the shortcut is used only when ``||A^T u - w|| <= tol * ||w||`` for all of them;
otherwise the caller falls back to the full product.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Projection", "leading_affine_basis", "build_projection"]


@dataclass
class Projection:
    """References projected on the head's leading affine map.

    Attributes
    ----------
    basis : Tensor
        ``r x D`` (float64): rows spanning every gradient of the head.
    gram_inv : Tensor
        ``r x r`` (float64): ``(A A^T)^{-1}``.
    projected : Tensor
        ``N x r`` (float32): ``features @ basis.T``.
    tol : float
        Relative residual below which a boundary counts as inside the row space.
    """

    basis: Tensor
    gram_inv: Tensor
    projected: Tensor
    tol: float = 1e-5

    def coefficients(self, weight: Tensor) -> Tensor | None:
        """``u`` with ``A^T u = w`` for every row of ``weight``, or None if one misses."""
        w = weight.detach().to("cpu", torch.float64)
        u = (w @ self.basis.T) @ self.gram_inv
        resid = (u @ self.basis - w).norm(dim=1)
        if bool((resid > self.tol * w.norm(dim=1).clamp_min(1e-300)).any()):
            return None
        return u

    def margins(self, weight: Tensor, bias: Tensor) -> Tensor | None:
        """``N x k`` margins ``features @ weight.T + bias`` through the projection."""
        u = self.coefficients(weight)
        if u is None:
            return None
        return torch.addmm(bias.to(torch.float32), self.projected, u.to(torch.float32).T)


def leading_affine_basis(
    head: Callable[[Tensor], Tensor],
    modules: nn.Module,
    psi: Tensor,
    probe: Tensor,
) -> Tensor | None:
    """Rows ``A`` (``r x D``) of the first ``nn.Linear`` the head applies to ``psi``.

    ``A = W1 J_T`` where ``T`` maps ``psi`` to that layer's input. Returned only when
    ``J_T`` is the same at ``psi`` and at ``probe`` (``T`` affine) and ``r < D``.
    """
    calls: list[tuple[nn.Linear, Tensor]] = []

    def pre(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            calls.append((module, args[0]))  # type: ignore[arg-type]

    def rows_at(point: Tensor) -> Tensor | None:
        calls.clear()
        handles = [
            m.register_forward_pre_hook(pre) for m in modules.modules() if isinstance(m, nn.Linear)
        ]
        try:
            with torch.enable_grad():
                p = point.detach().clone().requires_grad_(True)
                head(p)
                for module, x in calls:
                    if not x.requires_grad:
                        continue
                    (g,) = torch.autograd.grad(
                        x.sum(), p, retain_graph=True, allow_unused=True
                    )
                    if g is None:
                        continue  # a linear layer before the split, not fed by psi
                    w1 = module.weight.detach()
                    if w1.shape[0] >= p.shape[1] or x.shape[0] != 1:
                        return None
                    grads = torch.autograd.grad(
                        x.reshape(1, -1),
                        p,
                        grad_outputs=w1.to(x.dtype)[:, None, :],
                        is_grads_batched=True,
                        retain_graph=True,
                    )[0]
                    return grads.reshape(w1.shape[0], -1).double()
        finally:
            for h in handles:
                h.remove()
            calls.clear()
        return None

    a = rows_at(psi)
    if a is None:
        return None
    b = rows_at(probe)
    if b is None or not torch.allclose(a, b, rtol=1e-6, atol=1e-9 * float(a.abs().max())):
        return None
    return a


def build_projection(
    head: Callable[[Tensor], Tensor],
    modules: nn.Module,
    features: Tensor,
    chunk_size: int = 8192,
) -> Projection | None:
    """The projection of ``features`` (``N x D``) on the head's leading affine map."""
    if features.shape[0] < 2:
        return None
    try:
        psi = features[:1].to(torch.float32)
        probe = 0.5 * (features[:1] + features[1:2]).to(torch.float32) + 0.1
        basis = leading_affine_basis(head, modules, psi, probe)
    except (RuntimeError, ValueError, TypeError):
        return None
    if basis is None or basis.shape[0] * 4 > basis.shape[1]:
        return None
    gram = basis @ basis.T
    if torch.linalg.matrix_rank(gram) < gram.shape[0]:
        return None
    gram_inv = torch.linalg.inv(gram)
    a32 = basis.to(torch.float32)
    projected = torch.empty(features.shape[0], basis.shape[0], dtype=torch.float32)
    for s in range(0, features.shape[0], chunk_size):
        projected[s : s + chunk_size] = features[s : s + chunk_size].to(torch.float32) @ a32.T
    return Projection(basis, gram_inv, projected)
