"""Stages 2-3 for one seed: find candidate boundaries and test every reference on them.

:func:`sample_and_match` is the one place that chooses how the boundaries are found and
decides near-duplicates:

- an affine head (found at fit and checked on the seed and a candidate): no sampling,
  the boundaries ``G_c - G_k > 0`` against the other classes are exact;
- the projected space, when the head starts with an affine map whose ``N x r`` images of
  the references pay for themselves (see :mod:`captum_repinterp.projection`) and the
  projected head is checked to give the head's logits on the seed and two candidates:
  the crossings and the backward pass run on the ``r``-dimensional output ``z`` of the
  leading linear layer, and the boundaries are the same planes (``w = A^T u``);
- the leading layer's output space otherwise, when the head starts with a linear layer
  fed by an affine map: ``z`` is computed at the segments' ends only (one call of the
  head up to that layer), the rest of the head runs on ``z``;
- the plain space: the head runs on the features ``psi`` (``D`` numbers).

Either way every reference's side of every boundary is computed as packed bits
(:func:`~captum_repinterp.match.failing_bits`), the input of the greedy cover.

When ``fit`` kept the references' logits (:attr:`FittedReferences.logits`) and the seed's
are given, the head is not evaluated at the segments' ends, which are references: the
checks of the exact shortcuts compare with those logits, and in the plain space the
crossings start from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .match import failing_bits, margins
from .projection import AffineHead, ProjectedHead, close_logits
from .references import FittedReferences
from .sampler import Boundaries, feature_scale, near_duplicates, sample_boundaries

__all__ = ["SampledBoundaries", "sample_and_match", "sample_candidates"]


@dataclass(frozen=True)
class SampledBoundaries:
    """Candidate boundaries of one seed and the references each one pushes out.

    Attributes
    ----------
    boundaries : Boundaries
        Oriented candidates, ``weight`` (``m x D``) and ``bias`` (``m``) float32 on the
        CPU.
    failing : numpy.ndarray
        uint64 ``m x ceil(N / 64)`` packed bits: reference ``r`` is not on the seed's
        side of boundary ``j`` (see :func:`~captum_repinterp.match.failing_bits`).
    coefficients : Tensor or None
        ``m x r`` coefficients ``u`` with ``w = A^T u`` when the projection is used.
    references : FittedReferences
        The reference set matched against.
    """

    boundaries: Boundaries
    failing: np.ndarray
    coefficients: Tensor | None
    references: FittedReferences

    def margins(self, index: Tensor, selected: Tensor) -> Tensor:
        """Margins ``w_j . psi(r) + b_j`` (``len(index) x len(selected)``, float32) of
        the references ``index`` for the boundaries ``selected``."""
        bias = self.boundaries.bias[selected]
        if self.coefficients is None:
            feats = self.references.features[index]
            return margins(feats, self.boundaries.weight[selected], bias)
        projection = self.references.projection
        assert projection is not None
        return projection.margins_rows(index, self.coefficients[selected], bias)


def sample_and_match(
    head: Callable[..., Tensor],
    seed_features: Tensor,
    references: FittedReferences,
    candidates: Tensor,
    target: int,
    n_steps: int = 20,
    duplicate_tol: float = 1e-6,
    seed_logits: Tensor | None = None,
) -> SampledBoundaries:
    """Candidate boundaries between the seed and ``candidates``, matched against every
    reference.

    :func:`sample_candidates`, then the packed failing bits of every reference.

    Parameters
    ----------
    head : callable
        ``B x D -> B x C`` logits for this seed (see :mod:`captum_repinterp.heads`).
    seed_features : Tensor
        ``D`` features ``psi(x)`` of the seed.
    references : FittedReferences
        The fitted reference set.
    candidates : Tensor
        int64 indices of the candidate references (other side of the decision).
    target : int
        The class ``c`` explained.
    n_steps : int
        Bisection steps.
    duplicate_tol : float
        Boundaries whose ``[w, b / s]`` (``s`` the seed's feature norm) have cosine
        >= ``1 - duplicate_tol`` with an earlier one are merged (the first is kept).
    seed_logits : Tensor, optional
        The model's output on the seed (``1 x C`` or ``C``); with the references' logits
        kept by ``fit``, the head is not evaluated at the candidates (see
        :func:`sample_candidates`).

    Returns
    -------
    SampledBoundaries
    """
    bounds, u = sample_candidates(
        head, seed_features, references, candidates, target, n_steps, duplicate_tol,
        seed_logits,
    )  # fmt: skip
    if u is None:
        fail = failing_bits(references.features, bounds.weight, bounds.bias)
    else:
        fail = references.projection.failing_bits_of(u, bounds.bias)
    return SampledBoundaries(bounds, fail, u, references)


def sample_candidates(
    head: Callable[..., Tensor],
    seed_features: Tensor,
    references: FittedReferences,
    candidates: Tensor,
    target: int,
    n_steps: int = 20,
    duplicate_tol: float = 1e-6,
    seed_logits: Tensor | None = None,
) -> tuple[Boundaries, Tensor | None]:
    """The sampling half of :func:`sample_and_match`: the candidates' boundaries, without
    matching the references.

    Reads only the candidates' rows of ``references.features`` (and of the projection,
    and of ``references.logits``), so a reference set held elsewhere
    (:mod:`captum_repinterp.distributed`) can sample where the head is and match where
    its rows are.

    With ``seed_logits`` (the model's output on the seed) and the references' logits
    kept by ``fit`` (``references.logits``, absent on other reference sets), the head is
    not run at the candidates: the affine head is checked against both logits (no head
    call at all), the head on the leading layer's output is checked on the seed and on
    every candidate against them (its values there are the crossings' first step), and
    the plain search takes the candidates' logits as the segments' ends.

    Returns
    -------
    (Boundaries, Tensor or None)
        The oriented candidates (float32, CPU) and, when the projection is used, their
        ``k x r`` coefficients ``u`` (``w = A^T u``).
    """
    projection = references.projection
    leading = references.leading

    def cand_feats(count: int | None = None) -> Tensor:
        """The features of the first ``count`` candidates (all by default): read only
        where a path needs them (the projection's path reads its ``N x r`` images)."""
        index = candidates if count is None else candidates[:count]
        return references.features[index].to(seed_features.device, seed_features.dtype)

    # the features' size, in whose units near-duplicate offsets are compared
    scale = feature_scale(seed_features)
    affine = references.affine
    known = _known_logits(references, candidates, seed_logits)
    if affine is not None:
        if known is None:
            exact = affine.agrees(head, torch.cat([seed_features[None], cand_feats(1)]))
        else:
            points = torch.cat([seed_features[None], cand_feats(1)])
            exact = affine.matches(points, known[: points.shape[0]])
        if exact:
            return _exact_affine(affine, references, target, duplicate_tol, scale)
    zhead = None
    z = None
    z_logits = None
    if projection is not None and known is not None:
        if projection.module is not None and projection.offset is not None:
            z = torch.cat(
                [
                    projection.z_of(seed_features[None]),
                    projection.z_of_references(candidates, seed_features),
                ]
            )
            zhead, z_logits = _zhead_matching(head, projection.module, seed_features, z, known)
    elif projection is not None:
        zhead = projection.sampling_head(head, seed_features, cand_feats(2))
    elif leading is not None and seed_features.dtype in (torch.float32, torch.float64):
        if known is None:
            zhead = leading.sampling_head(head, seed_features, cand_feats(2))
        else:
            with torch.no_grad():
                z = leading.z_rows(head, torch.cat([seed_features[None], cand_feats()]))
            zhead, z_logits = _zhead_matching(head, leading.module, seed_features, z, known)
    gram = None
    u = None
    if zhead is None:
        found = sample_boundaries(
            head, seed_features, cand_feats(), target, n_steps=n_steps, duplicate_tol=-1.0,
            end_logits=None if known is None else known[1:],
        )  # fmt: skip
        weight = found.weight.to("cpu", torch.float32)
        bias = found.bias.to("cpu", torch.float32)
    elif projection is not None:
        if z is None:
            z_x = projection.z_of(seed_features[None])[0]
            z_c = projection.z_of_references(candidates, seed_features)
        else:
            z_x, z_c = z[0], z[1:]
        found = sample_boundaries(
            zhead, z_x, z_c, target, n_steps=n_steps, duplicate_tol=-1.0, logits=z_logits
        )
        weight, bias = projection.to_features(found.weight, found.bias)
        bias = bias.to(torch.float32)
        u = found.weight.cpu()
        gram = projection.normal_gram(found.weight)
    else:
        assert leading is not None
        # the leading layer's output at the segment's ends only; the rest runs on z
        if z is None:
            with torch.no_grad():
                z = leading.z_rows(head, torch.cat([seed_features[None], cand_feats()]))
        found = sample_boundaries(
            zhead, z[0], z[1:], target, n_steps=n_steps, duplicate_tol=-1.0, logits=z_logits
        )
        w = leading.normals(head, seed_features, found.weight)
        # u . z + b_z = w . psi + b with z = A psi + offset: b = b_z + u . z_x - w . psi_x
        b64 = (
            found.bias.double()
            + (found.weight.double() @ z[0].double())
            - (w.double() @ seed_features.double())
        )
        weight = w.to("cpu", torch.float32)
        bias = b64.to("cpu", torch.float32)
    # near-duplicates are judged on the features' [w, b] in both spaces
    keep = ~near_duplicates(weight, bias, duplicate_tol, gram=gram, scale=scale)
    weight, bias = weight[keep], bias[keep]
    bounds = Boundaries(weight, bias, found.source[keep], found.runner_up[keep])
    if u is None and projection is not None:
        u = projection.coefficients(weight)
    elif u is not None:
        u = u[keep]
    return bounds, u


def _known_logits(
    references: FittedReferences, candidates: Tensor, seed_logits: Tensor | None
) -> Tensor | None:
    """``(1 + m) x C`` float64 (CPU): the seed's logits, then the candidates' kept by
    ``fit``; None when either is missing or they do not have the same classes."""
    kept = getattr(references, "logits", None)
    if kept is None or seed_logits is None:
        return None
    seed = seed_logits.detach().reshape(1, -1).to("cpu", torch.float64)
    if kept.dim() != 2 or kept.shape[1] != seed.shape[1]:
        return None
    return torch.cat([seed, kept[candidates.cpu()].to(torch.float64)])


def _zhead_matching(
    head: Callable[..., Tensor], module: nn.Module, psi: Tensor, z: Tensor, known: Tensor
) -> tuple[ProjectedHead | None, Tensor | None]:
    """The head as a function of the leading layer's output (anchored at ``psi``) and its
    logits at ``z`` (the seed's row, then the candidates'), when they are ``known`` (the
    model's outputs there) within float32 rounding; else ``(None, None)``."""
    zhead = ProjectedHead(head, module, psi[None])
    try:
        with torch.no_grad():
            out = zhead(z)
    except (RuntimeError, ValueError, TypeError):
        return None, None
    if not close_logits(out.detach().to("cpu", torch.float64), known, through=module):
        return None, None
    return zhead, out


#: with more classes than this and no projection, the exact boundaries of an affine head
#: are those against the classes predicted for some reference (the match product costs
#: one ``N x D`` pass per boundary)
MAX_ALL_CLASSES = 256


def _exact_affine(
    affine: AffineHead,
    references: FittedReferences,
    target: int,
    duplicate_tol: float,
    scale: float = 1.0,
) -> tuple[Boundaries, Tensor | None]:
    """The exact boundaries ``G_c - G_k > 0`` of an affine head (and their ``u``);
    ``scale`` as in :func:`~captum_repinterp.sampler.near_duplicates`."""
    n_classes = affine.weight.shape[0]
    if references.projection is not None or n_classes - 1 <= MAX_ALL_CLASSES:
        classes = torch.arange(n_classes)
    else:
        classes = torch.unique(references.predictions)
    classes = classes[classes != target]
    weight, bias64 = affine.boundaries(target, classes)
    good = weight.abs().sum(dim=1) > 0  # a class whose logit equals c's everywhere
    weight, bias64, classes = weight[good], bias64[good], classes[good]
    keep = ~near_duplicates(weight, bias64.to(torch.float32), duplicate_tol, scale=scale)
    weight, bias, classes = weight[keep], bias64[keep].to(torch.float32), classes[keep]
    source = torch.full((classes.numel(),), -1, dtype=torch.long)
    bounds = Boundaries(weight, bias, source, classes.to(torch.long))
    projection = references.projection
    u = None if projection is None else projection.coefficients(weight)
    return bounds, u
