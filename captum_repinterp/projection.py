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

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .match import failing_bits

__all__ = [
    "AffineHead",
    "LeadingMap",
    "Projection",
    "ProjectedHead",
    "build_projection",
    "close_logits",
    "find_affine_head",
    "find_leading_map",
    "leading_affine_basis",
    "parameter_dtype",
    "sum_rounding",
]


@dataclass
class Projection:
    """References projected on the head's leading affine map.

    Attributes
    ----------
    basis : Tensor
        ``r x D`` (float64): rows spanning every gradient of the head.
    gram : Tensor
        ``r x r`` (float64): ``A A^T`` (its Cholesky factor is kept as ``gram_chol``).
    projected : Tensor
        ``N x r`` (float32): ``features @ basis.T``.
    module : nn.Linear, optional
        The head's leading linear layer; its output at ``psi`` is
        ``z = basis @ psi + offset``.
    offset : Tensor, optional
        ``r`` (float64), see ``module``.
    tol : float
        Relative residual below which a boundary counts as inside the row space.
    """

    basis: Tensor
    gram: Tensor
    projected: Tensor
    module: nn.Module | None = None
    offset: Tensor | None = None
    tol: float = 1e-5

    def __post_init__(self) -> None:
        self.basis32 = self.basis.to(torch.float32)
        self.gram_chol = torch.linalg.cholesky(self.gram)

    def coefficients(self, weight: Tensor) -> Tensor | None:
        """``u`` with ``A^T u = w`` for every row of ``weight``, or None if one misses."""
        w = weight.detach().to("cpu", torch.float64)
        # the normal equations (A A^T) u^T = A w^T, solved with the Cholesky factor
        u = torch.cholesky_solve(self.basis @ w.T, self.gram_chol).T
        resid = (u @ self.basis - w).norm(dim=1)
        if bool((resid > self.tol * w.norm(dim=1).clamp_min(1e-300)).any()):
            return None
        return u

    def margins(self, weight: Tensor, bias: Tensor) -> Tensor | None:
        """``N x k`` margins ``features @ weight.T + bias`` through the projection."""
        u = self.coefficients(weight)
        if u is None:
            return None
        return self.margins_rows(None, u, bias)

    def failing_bits_of(self, u: Tensor, bias: Tensor) -> np.ndarray:
        """:func:`~captum_repinterp.match.failing_bits` of the boundaries ``w = A^T u``
        over all references, from the ``N x r`` projection in chunks."""
        return failing_bits(self.projected, u.to("cpu", torch.float32), bias.to("cpu"))

    def margins_rows(self, index: Tensor | None, u: Tensor, bias: Tensor) -> Tensor:
        """Margins of the references at ``index`` (all when None) for the boundaries
        ``w = A^T u`` (``len(index) x k``, float32)."""
        rows = self.projected if index is None else self.projected[index.cpu()]
        return torch.addmm(
            bias.to("cpu", torch.float32), rows.to(torch.float32), u.to("cpu", torch.float32).T
        )

    def sampling_head(
        self, head: Callable[[Tensor], Tensor], psi: Tensor, probes: Tensor
    ) -> ProjectedHead | None:
        """The head as a function of ``z`` (see :class:`ProjectedHead`), or None.

        ``psi`` (``D``) anchors the head; the result is used only when it gives the
        head's logits at ``psi`` and at every row of ``probes`` (``k x D``) within
        float32 rounding, so a head that is not ``rest(W1 T(psi))`` is never trusted.
        """
        if self.module is None or self.offset is None:
            return None
        return _checked_zhead(head, self.module, psi, probes, self.z_of)

    def z_of(self, psi: Tensor) -> Tensor:
        """``basis @ psi + offset`` for rows of ``psi``, in ``psi``'s dtype and device."""
        assert self.offset is not None
        z = psi.detach().to("cpu", torch.float64) @ self.basis.T + self.offset
        return z.to(psi.device, psi.dtype)

    def z_of_references(self, index: Tensor, like: Tensor) -> Tensor:
        """``z`` of the references at ``index`` (from ``projected``), like ``like``."""
        assert self.offset is not None
        z = self.projected[index.cpu()].double() + self.offset
        return z.to(like.device, like.dtype)

    def normal_gram(self, u: Tensor) -> Tensor:
        """``w_i . w_j`` of the normals ``w = A^T u`` (``k x k``, float64), via ``A A^T``."""
        u64 = u.detach().to("cpu", torch.float64)
        return u64 @ self.gram @ u64.T

    def to_features(self, u: Tensor, bias_z: Tensor) -> tuple[Tensor, Tensor]:
        """Boundaries ``u . z + bias_z`` as ``w . psi + b``: ``w = A^T u`` (float32, the
        precision of the gradients it stands for) and ``b`` (float64)."""
        assert self.offset is not None
        u64 = u.detach().to("cpu", torch.float64)
        weight = u64.to(torch.float32) @ self.basis32
        return weight, bias_z.detach().to("cpu", torch.float64) + u64 @ self.offset


def _sequential_rest(head: object, module: nn.Module) -> list[nn.Module] | None:
    """The layers that follow ``module`` when the user's head is a Sequential with
    ``module`` as a direct child (then ``z`` is fed to them directly), else None. A plain
    list: building an ``nn.Sequential`` for every seed costs more than applying it."""
    inner = getattr(head, "head", None)
    if not isinstance(inner, nn.Sequential):
        return None
    children = list(inner.children())
    for i, child in enumerate(children):
        if child is module:
            return children[i + 1 :]
    return None


class ProjectedHead:
    """The head as a function of its leading linear layer's output ``z`` (``B x r``).

    When the user's head is an ``nn.Sequential`` with that layer as a direct child, the
    layers after it are applied to ``z``. Otherwise ``head`` (a
    :class:`~captum_repinterp.features.UserHead` or ``HookHead``, which take the expected
    number of output rows as ``rows=``) runs on one anchor row ``psi`` and the linear
    layer returns ``z`` instead of computing its output, so its product is not done at
    all. Either way it is valid only when nothing after that layer reads
    the features again, which :meth:`Projection.sampling_head` checks before use.
    """

    def __init__(self, head: Callable[[Tensor], Tensor], module: nn.Module, anchor: Tensor) -> None:
        self.head = head
        self.module = module
        self.anchor = anchor.detach()
        self.rest = _sequential_rest(head, module)

    def __call__(self, z: Tensor) -> Tensor:
        # a copy: the layers that follow may work in place (``nn.ReLU(inplace=True)``)
        if self.rest is not None:
            out = z.to(self.anchor.dtype).clone()
            for layer in self.rest:
                out = layer(out)
            return out

        # the layer returns z instead of computing its output on the anchor row (its
        # hooks still run)
        dtype = self.module.weight.dtype if isinstance(self.module, nn.Linear) else z.dtype
        previous = self.module.__dict__.get("forward")
        self.module.__dict__["forward"] = lambda *args, **kwargs: z.to(dtype).clone()
        try:
            out = self.head(self.anchor, rows=z.shape[0])
        finally:
            if previous is None:
                self.module.__dict__.pop("forward", None)
            else:
                self.module.__dict__["forward"] = previous
        if not isinstance(out, Tensor) or out.shape[0] != z.shape[0]:
            raise ValueError("the head's output does not follow the batch of z")
        return out


def leading_affine_basis(
    head: Callable[[Tensor], Tensor],
    modules: nn.Module,
    psi: Tensor,
    probe: Tensor,
) -> tuple[nn.Module, Tensor, Tensor] | None:
    """The first ``nn.Linear`` the head applies to ``psi``, as an affine map of ``psi``.

    Returns ``(module, A, offset)``: the layer's output at ``psi`` is ``A @ psi + offset``
    with ``A = W1 J_T`` (``r x D``, float64) where ``T`` maps ``psi`` to that layer's
    input. Returned only when ``A`` and ``offset`` are the same at ``psi`` and at
    ``probe`` (``T`` affine) and ``r < D``.
    """
    calls: list[tuple[nn.Linear, Tensor]] = []

    def pre(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            calls.append((module, args[0]))  # type: ignore[arg-type]

    def map_at(point: Tensor) -> tuple[nn.Module, Tensor, Tensor, float] | None:
        calls.clear()
        handles = [
            m.register_forward_pre_hook(pre) for m in modules.modules() if isinstance(m, nn.Linear)
        ]
        try:
            with torch.enable_grad():
                p = point.detach().clone().requires_grad_(True)
                head(p)
                for module, x in calls:
                    if not _depends_on(x, p):
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
                    rows = grads.reshape(w1.shape[0], -1).double()
                    with torch.no_grad():
                        out = module(x.detach()).reshape(-1).double()
                    flat = p.detach().reshape(-1).double()
                    offset = out - rows @ flat
                    scale = float(out.abs().max() + (rows.abs() @ flat.abs()).max())
                    return module, rows, offset, scale
        finally:
            for h in handles:
                h.remove()
            calls.clear()
        return None

    first = map_at(psi)
    if first is None:
        return None
    second = map_at(probe)
    if second is None or second[0] is not first[0]:
        return None
    (module, a, off_a, scale_a), (_, b, off_b, scale_b) = first, second
    if not torch.allclose(a, b, rtol=1e-6, atol=1e-9 * float(a.abs().max())):
        return None
    # float32 rounding of the layer's output bounds how well the offsets can agree
    tol = 1e-5 * max(scale_a, scale_b, 1e-12)
    if not torch.allclose(off_a, off_b, rtol=0.0, atol=tol):
        return None
    return module, a, off_a


def build_projection(
    head: Callable[[Tensor], Tensor],
    modules: nn.Module,
    features: Tensor,
    chunk_size: int = 8192,
    out_path: str | os.PathLike | None = None,
) -> Projection | None:
    """The projection of ``features`` (``N x D``) on the head's leading affine map.

    With ``out_path`` the ``N x r`` projection is written to that ``.npy`` file in row
    chunks and read back memory-mapped (copy-on-write), so that an on-disk reference
    store keeps its memory bounded independently of ``N``.
    """
    if features.shape[0] < 2:
        return None
    try:
        device = _device_of(modules)
        psi = features[:1].to(device, torch.float32)
        probe = 0.5 * (features[:1] + features[1:2]).to(device, torch.float32) + 0.1
        found = leading_affine_basis(head, modules, psi, probe)
    except (RuntimeError, ValueError, TypeError):
        return None
    if found is None:
        return None
    module, basis, offset = found
    basis, offset = basis.cpu(), offset.cpu()  # the features live on the CPU
    if basis.shape[0] * 4 > basis.shape[1]:
        return None
    gram = basis @ basis.T
    if torch.linalg.matrix_rank(gram) < gram.shape[0]:
        return None
    a32 = basis.to(torch.float32)
    shape = (features.shape[0], basis.shape[0])
    if out_path is None:
        projected = torch.empty(shape, dtype=torch.float32)
        for s in range(0, shape[0], chunk_size):
            projected[s : s + chunk_size] = features[s : s + chunk_size].to(torch.float32) @ a32.T
    else:
        # written next to it, then moved into place: an explainer still mapping the old
        # file (an earlier fit of the same store) keeps reading it intact; the temporary
        # name is this writer's own, so two fits of one store (two processes) cannot
        # truncate or move each other's half-written file
        stem = f"{Path(out_path).stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp = Path(out_path).with_name(stem + ".tmp.npy")
        try:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            for s in range(0, shape[0], chunk_size):
                rows = features[s : s + chunk_size].to(torch.float32)
                mm[s : s + chunk_size] = (rows @ a32.T).numpy()
            mm.flush()
            del mm
            os.replace(tmp, out_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        projected = torch.from_numpy(np.load(out_path, mmap_mode="c"))
    return Projection(basis, gram, projected, module=module, offset=offset)


def _device_of(modules: nn.Module) -> torch.device:
    """Where the head's parameters live (the features are kept on the CPU)."""
    for q in modules.parameters():
        return q.device
    return torch.device("cpu")


class _Stop(Exception):
    """Raised by a hook to end a head call once the leading layer's input is known."""


def _linear_input(head: Callable[..., Tensor], module: nn.Module, psi: Tensor) -> Tensor:
    """The input (``B x in``) of ``module`` when the head runs on ``psi`` (``B x D``);
    the head stops there, so the layer and what follows it do not run."""
    if getattr(head, "broadcast", False) is None and psi.shape[0] > 1:
        with torch.no_grad():  # a HookHead decides how to batch on a full call
            head(psi[:2].detach())
    captured: list[Tensor] = []

    def grab(*args: Any, **kwargs: Any) -> None:
        captured.append(args[0])
        raise _Stop

    # the module's forward, not a pre-hook: it sees the input after the module's own
    # pre-hooks, among them the head's replacement when the split is at its input
    previous = module.__dict__.get("forward")
    module.__dict__["forward"] = grab
    try:
        head(psi)
    except _Stop:
        pass
    finally:
        if previous is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = previous
    if not captured:
        raise ValueError("the head did not reach its leading linear layer")
    return captured[0].reshape(psi.shape[0], -1)


@dataclass
class LeadingMap:
    """The head's first ``nn.Linear`` fed by an affine map ``T`` of the features.

    Its output ``z = W1 T(psi) + b1 = A psi + offset`` is affine in ``psi``, so along a
    segment it is affine in ``t``: computed at the segment's two ends, the rest of the
    head runs on ``r`` numbers per point. Nothing is stored per reference (the ``N x r``
    images are kept only where the :class:`Projection` pays for the match product too).

    Attributes
    ----------
    module : nn.Linear
        The layer.
    matrix : Tensor or None
        ``A`` (``r x D``, float32, on the layer's device), kept when ``T`` widens the
        features (e.g. VGG's adaptive pooling of a small map to 7 x 7 before its first
        Linear), where ``A`` costs ``D / in_features`` of the layer's own product.
    offset : Tensor or None
        ``r`` (float32): ``z`` at ``psi = 0``, with ``matrix``.
    """

    module: nn.Linear
    matrix: Tensor | None = None
    offset: Tensor | None = None

    def z_rows(self, head: Callable[..., Tensor], psi: Tensor) -> Tensor:
        """``z`` of rows of ``psi`` (``B x r``), running the head up to the layer only."""
        if self.matrix is not None and self.offset is not None:
            return torch.addmm(self.offset, psi.to(self.matrix.dtype), self.matrix.T).to(psi.dtype)
        x = _linear_input(head, self.module, psi)
        w = self.module.weight
        b = self.module.bias
        return nn.functional.linear(x.to(w.dtype), w, b).to(psi.dtype)

    def normals(self, head: Callable[..., Tensor], psi: Tensor, u: Tensor) -> Tensor:
        """``A^T u`` (``k x D``) for the rows of ``u`` (``k x r``): the features' normals
        of boundaries ``u . z + b`` (a backward pass through ``T`` only)."""
        if self.matrix is not None:
            return u.to(self.matrix.dtype) @ self.matrix
        return _pull_back(
            head, self.module, psi, u.to(self.module.weight.dtype) @ self.module.weight
        )

    def sampling_head(
        self, head: Callable[..., Tensor], psi: Tensor, probes: Tensor
    ) -> ProjectedHead | None:
        """The head as a function of ``z``, used only when it gives the head's logits at
        ``psi`` and every row of ``probes`` (see :meth:`Projection.sampling_head`)."""
        return _checked_zhead(head, self.module, psi, probes, lambda p: self.z_rows(head, p))


def _pull_back(head: Callable[..., Tensor], module: nn.Module, psi: Tensor, v: Tensor) -> Tensor:
    """``J_T^T v`` (``k x D``) for rows ``v`` (``k x in``) of covectors on ``module``'s
    input, ``T`` the (affine) map from the features to that input, taken at ``psi``."""
    k = v.shape[0]
    with torch.enable_grad():
        p = psi.detach()[None].expand(k, -1).clone().requires_grad_(True)
        x = _linear_input(head, module, p)
        (g,) = torch.autograd.grad(x, p, grad_outputs=v.to(x.dtype))
    return g.detach()


def _leading_matrix(
    head: Callable[..., Tensor], module: nn.Linear, a: Tensor, b: Tensor, chunk: int = 256
) -> tuple[Tensor, Tensor] | None:
    """``A = W1 J_T`` (``r x D``) and the offset, when ``T`` widens the features, checked
    at the point ``b`` (``z(b) = A b + offset`` within float32 rounding); else None."""
    w1 = module.weight.detach()
    d = a.shape[0]
    if w1.shape[1] <= d:
        return None
    with torch.no_grad():
        x = _linear_input(head, module, torch.stack([a, b]))
        z = nn.functional.linear(x.to(w1.dtype), w1, module.bias)
    if getattr(head, "broadcast", True) is False:
        return None  # every batched call would run the whole model on the batch
    rows = [_pull_back(head, module, a, w1[s : s + chunk]) for s in range(0, w1.shape[0], chunk)]
    matrix = torch.cat(rows).to(torch.float32)
    offset = (z[0].double() - matrix.double() @ a.double()).to(torch.float32)
    fast = matrix @ b.to(torch.float32) + offset
    scale = float(z.abs().max()) + float((matrix.abs() @ b.abs().to(torch.float32)).max())
    if not torch.allclose(fast.double(), z[1].double(), rtol=0.0, atol=1e-5 * scale):
        return None
    return matrix, offset


def _checked_zhead(
    head: Callable[..., Tensor],
    module: nn.Module,
    psi: Tensor,
    probes: Tensor,
    z_of: Callable[[Tensor], Tensor],
) -> ProjectedHead | None:
    """A :class:`ProjectedHead` at ``psi`` that gives the head's logits at ``psi`` and at
    every row of ``probes`` within float32 rounding, or None."""
    zhead = ProjectedHead(head, module, psi[None])
    points = torch.cat([psi[None], probes], dim=0)
    try:
        with torch.no_grad():
            full = head(points)
            fast = zhead(z_of(points))
    except (RuntimeError, ValueError, TypeError):
        return None
    if not close_logits(fast, full, through=module):
        return None
    return zhead


def _depends_on(output: Tensor, leaf: Tensor) -> bool:
    """Whether ``output`` is computed from ``leaf`` (autograd reaches it)."""
    if output.grad_fn is None:
        return output is leaf
    (grad,) = torch.autograd.grad(
        output, leaf, torch.ones_like(output), retain_graph=True, allow_unused=True
    )
    return grad is not None


def find_leading_map(
    head: Callable[..., Tensor], modules: nn.Module, features: Tensor
) -> LeadingMap | None:
    """The head's :class:`LeadingMap`, or None.

    The first ``nn.Linear`` (among ``modules``) whose input depends on the features is
    taken when the map ``T`` from the features to that input passes an affinity test on
    three references ``a, b, c`` (float64 comparison, relative tolerance ``1e-5``):
    ``T((a + b) / 2) = (T(a) + T(b)) / 2``, ``T(2a - b) = 2 T(a) - T(b)`` and
    ``T(a + c - b) = T(a) + T(c) - T(b)``; a max-pool, ReLU or other kink between the
    features and the layer breaks them for references in different pieces. When ``T``
    widens the features, ``A`` is kept too (see :class:`LeadingMap`).
    """
    dtype = parameter_dtype(modules)
    if features.shape[0] < 3 or dtype not in (torch.float32, torch.float64):
        return None  # half types: their rounding would hide kinks
    device = _device_of(modules)
    a, b, c = (features[i].to(device, dtype) for i in (0, features.shape[0] // 2, -1))
    points = torch.stack([a, b, c, (a + b) / 2, 2 * a - b, a + c - b])
    calls: list[tuple[nn.Module, Tensor]] = []

    def pre(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor) and args[0].requires_grad:
            calls.append((module, args[0]))

    handles = [
        m.register_forward_pre_hook(pre) for m in modules.modules() if isinstance(m, nn.Linear)
    ]
    found: list[tuple[nn.Module, Tensor]] = []
    try:
        # one row per call: the model runs on one example, as for the first reference
        for point in points:
            calls.clear()
            with torch.enable_grad():
                row = point[None].clone().requires_grad_(True)
                head(row)
                # inputs that require grad through the parameters alone (a Linear run
                # before the split, the split layer itself when the head runs the whole
                # model) do not depend on the features
                fed = next((c for c in calls if _depends_on(c[1], row)), None)
            if fed is None:
                return None
            found.append(fed)
    except (RuntimeError, ValueError, TypeError):
        return None
    finally:
        for h in handles:
            h.remove()
    module = found[0][0]
    if any(m is not module for m, _ in found):
        return None
    x = torch.cat([t.detach().reshape(1, -1) for _, t in found]).double()
    expected = torch.stack([(x[0] + x[1]) / 2, 2 * x[0] - x[1], x[0] + x[2] - x[1]])
    scale = float(x[:3].abs().max()) + 1e-30
    if not torch.allclose(x[3:], expected, rtol=0.0, atol=1e-5 * scale):
        return None
    try:
        found_matrix = _leading_matrix(head, module, a, b)  # type: ignore[arg-type]
    except (RuntimeError, ValueError, TypeError):
        found_matrix = None
    if found_matrix is None:
        return LeadingMap(module)  # type: ignore[arg-type]
    return LeadingMap(module, *found_matrix)  # type: ignore[arg-type]


@dataclass
class AffineHead:
    """A head that is affine in the features: ``G(psi) = weight @ psi + bias``.

    Then the decision region of class ``c`` is exactly the set where ``G_c - G_k > 0``
    for every other class ``k``: the boundaries ``(weight_c - weight_k, bias_c - bias_k)``
    need no sampling.

    Attributes
    ----------
    weight : Tensor
        ``C x D`` float32: the head's Jacobian.
    bias : Tensor
        ``C`` float64.
    """

    weight: Tensor
    bias: Tensor

    def predict(self, psi: Tensor) -> Tensor:
        """``psi @ weight.T + bias`` (``B x C``, float64)."""
        return psi.detach().to("cpu", torch.float64) @ self.weight.double().T + self.bias

    def matches(self, psi: Tensor, expected: Tensor) -> bool:
        """Whether :meth:`predict` gives ``expected`` (``B x C`` logits computed by the
        head) at the rows of ``psi``, within the head's rounding.

        The tolerance is :func:`close_logits`' plus ``4 eps`` times the sum of the
        absolute terms, ``|psi| @ |weight|.T + |bias|`` (``eps`` of the weight's float32):
        the rounding of a float32 dot product grows with its terms, not with its result,
        and heads whose terms cancel (a ResNet-18's ``fc`` on ``layer4`` at 224 px: terms
        800 times the logits) round by more than ``1e-5`` of the logits' scale. A kink
        that the map misses changes logits by far more than this bound.
        """
        pred = self.predict(psi)
        if pred.shape != expected.shape:
            return False
        exp = expected.detach().to("cpu", torch.float64)
        scale = max(float(exp.abs().max()), 1.0) if exp.numel() else 1.0
        terms = psi.detach().to("cpu", torch.float64).abs() @ self.weight.double().abs().T
        eps = torch.finfo(self.weight.dtype).eps
        tol = LOGIT_ATOL * scale + LOGIT_RTOL * exp.abs() + 4 * eps * (terms + self.bias.abs())
        return bool(((pred - exp).abs() <= tol).all())

    def agrees(self, head: Callable[..., Tensor], psi: Tensor) -> bool:
        """Whether ``head`` gives :meth:`predict`'s logits at the rows of ``psi``
        (a per-seed check that the head is the affine map found at fit)."""
        with torch.no_grad():
            out = head(psi).detach()
        return self.matches(psi, out)

    def boundaries(self, target: int, classes: Tensor) -> tuple[Tensor, Tensor]:
        """``G_target - G_k`` for the classes ``k`` in ``classes``: ``k x D`` float32
        normals and ``k`` float64 offsets (positive on the class-``target`` side)."""
        w = self.weight[target][None].double() - self.weight[classes].double()
        b = self.bias[target] - self.bias[classes]
        return w.to(torch.float32), b


def parameter_dtype(modules: nn.Module) -> torch.dtype | None:
    """The type of the first floating-point parameter of ``modules`` (None without one)."""
    return next((q.dtype for q in modules.parameters() if q.is_floating_point()), None)


#: :func:`close_logits`' tolerance: relative to each value, and absolute as a share of
#: the larger of 1 and the expected values' scale
LOGIT_RTOL, LOGIT_ATOL = 1e-4, 1e-5


def close_logits(out: Tensor, expected: Tensor, through: nn.Module | None = None) -> bool:
    """Whether two ``B x C`` logit tensors agree within float32 rounding (relative
    ``1e-4``, absolute ``1e-5`` of the larger of 1 and the expected values' scale).

    With ``through`` (a linear layer both were computed through, summed in a different
    order), the absolute share is at least :func:`sum_rounding` of its input width.
    """
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    share = LOGIT_ATOL if through is None else max(LOGIT_ATOL, sum_rounding(through))
    return out.shape == expected.shape and bool(
        torch.allclose(out, expected, rtol=LOGIT_RTOL, atol=share * max(scale, 1.0))
    )


def sum_rounding(module: nn.Module) -> float:
    """``4 u sqrt(n)``: the probabilistic rounding bound of a sum of ``n`` products
    (``n`` the layer's ``in_features``, ``u`` the unit roundoff of its weight's type;
    Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019, with lambda = 4), as a share of
    the logits' scale.

    The head on a leading layer's output and the model's own pass sum that layer's
    ``n`` products in different orders (the fold ``A = W1 J_T``, another batch), so the
    logits differ by rounding that grows like ``sqrt(n)``: on a VGG-11 (``n`` = 25,088)
    by up to 1.4e-5 of their scale beyond the relative share, more than the ``1e-5``
    that suits the small heads (``n`` <= 1,152 keeps ``1e-5``). A head that is not a
    function of the layer's output differs by far more.
    """
    n = getattr(module, "in_features", None)
    weight = getattr(module, "weight", None)
    if not isinstance(n, int) or not isinstance(weight, Tensor) or not weight.is_floating_point():
        return 0.0
    return 4.0 * torch.finfo(weight.dtype).eps / 2 * float(n) ** 0.5


def find_affine_head(
    head: Callable[..., Tensor],
    modules: nn.Module,
    features: Tensor,
    max_entries: int = 2**25,
) -> AffineHead | None:
    """The head as an :class:`AffineHead` when it is affine, else None.

    A loose first test (``1e-3`` of the logits' scale) that the head keeps the midpoint
    of two references ``a, b`` and the line through them (one-row calls) stops most
    curved heads before any backward pass. Then the affine map defined by the head's
    Jacobian at ``a`` (one backward pass over ``C`` rows) must give those logits at
    ``a``, ``b``, their midpoint and on the line beyond ``a``; the Jacobian at ``b``
    must equal it; and the map must give the head's logits at three more points
    (two references and the extrapolation, one batched call), all within the head's
    float32 rounding (:meth:`AffineHead.matches`). Heads in a half-precision type and
    heads whose ``C x D`` Jacobian would exceed ``max_entries`` numbers are not examined.
    """
    dtype = parameter_dtype(modules)
    n = features.shape[0]
    if n < 4 or dtype not in (torch.float32, torch.float64):
        return None
    device = _device_of(modules)
    a, b = features[0].to(device, dtype), features[n // 2].to(device, dtype)
    try:
        points = torch.stack([a, b, (a + b) / 2, 2 * a - b])
        with torch.no_grad():
            g = torch.cat([head(p[None]) for p in points])  # one-row calls
        # a cheap first test, loose enough for any rounding: affine maps keep
        # midpoints and lines (most curved heads stop here, before any backward pass)
        g64 = g.double()
        loose = 1e-3 * max(float(g64.abs().max()), 1.0)
        if (g64[2] - (g64[0] + g64[1]) / 2).abs().max() > loose or (
            g64[3] - (2 * g64[0] - g64[1])
        ).abs().max() > loose:
            return None
        c = g.shape[1]
        if c * features.shape[1] > max_entries:
            return None
        jac_a, out_a = _jacobian(head, a, c)
        bias = out_a.double() - jac_a.double() @ a.double()
        affine = AffineHead(jac_a.to(torch.float32).cpu(), bias.cpu())
        # the same points, within the head's rounding
        if not affine.matches(points, g):
            return None
        jac_b, _ = _jacobian(head, b, c)
        if not torch.allclose(jac_a, jac_b, rtol=1e-5, atol=1e-6 * float(jac_a.abs().max())):
            return None
        probes = torch.stack(
            [features[n // 3].to(device, dtype), features[-1].to(device, dtype), 2 * a - b]
        )
        if not affine.agrees(head, probes):
            return None
    except (RuntimeError, ValueError, TypeError):
        return None
    return affine


def _jacobian(head: Callable[..., Tensor], psi: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """``C x D`` Jacobian of the head at ``psi`` and the logits there."""
    with torch.enable_grad():
        p = psi.detach()[None].expand(c, -1).clone().requires_grad_(True)
        out = head(p)
        eye = torch.eye(c, dtype=out.dtype, device=out.device)
        (jac,) = torch.autograd.grad(out, p, grad_outputs=eye)
    return jac.detach(), out.detach()[0]
