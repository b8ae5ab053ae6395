"""Auditing a class: the decision logics a model uses for the images it puts in a class.

One representative interpretation explains one seed; an audit explains a whole predicted
class by peeling regions off it (see "Auditing a class" in ``ALGORITHM.md``)::

    images --ri.transform (once)--> features psi (n x D), predictions
    for each class c:
        repeat: seed = most central uncovered image of c
                region = ri.interpret(seed, target=c)
                members = uncovered images of c inside the region (contains_features)
                heat maps of the region's direction on the members (features reshaped)
                sub-groups = clusters of the members' heat maps
        until coverage_target of c is covered or max_regions regions were taken

Only the seeds go through the model again (one ``interpret`` per region); membership,
semantic distances and heat maps are computed from the features of one batched pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import check_int
from .interpretation import Interpretation
from .match import margins, semantic_distance

__all__ = ["AuditGroup", "AuditRegion", "ClassAudit", "AuditResult", "audit"]

_SUBGROUP_BY = ("heatmap", "margins", "none")


@dataclass
class AuditGroup:
    """A group of audited images that share a decision logic.

    Attributes
    ----------
    members : Tensor
        Indices into the audited images, nearest first to the group's centre by the
        region's semantic distance (the member whose margins are nearest, in L1, to the
        coordinate-wise median margins of the group).
    mean_heatmap : Tensor or tuple of Tensor
        Mean over the members of their heat maps (the region's direction reused on each
        member's layer activations, ReLU applied, not rescaled), ``LayerGradCam``-shaped
        for one example (``1 x h x w`` for a convolutional layer); a tuple for a layer
        with several outputs.
    exemplars : Tensor
        The first ``n_exemplars`` of ``members``.
    """

    members: Tensor
    mean_heatmap: Tensor | tuple[Tensor, ...]
    exemplars: Tensor

    @property
    def size(self) -> int:
        """Number of members."""
        return int(self.members.numel())


@dataclass
class AuditRegion(AuditGroup):
    """One peeled-off region of a class (an :class:`AuditGroup` of its new members).

    Attributes
    ----------
    seed_index : int
        Index (into the audited images) of the seed the region was grown from.
    interpretation : Interpretation
        The seed's representative interpretation (region fitted on the references).
    members : Tensor
        The images of the class inside the region that no earlier region covered (with
        the seed), ranked by semantic distance to the seed. ``size`` counts them.
    n_inside : int
        Audited images inside the region, of any predicted class and covered or not.
    purity : float
        Share of ``n_inside`` predicted as the class (NaN if ``n_inside == 0``).
    heldout : dict or None
        ``Interpretation.evaluate_features`` on the held-out images: ``n_inside``,
        ``precision`` (share inside predicted as the class) and ``coverage``.
    uncovered_share : float
        Share of the class's audited images left uncovered after this region.
    subgroups : list of AuditGroup
        The members split by how the region's heat map falls on them (one group when
        the split rule finds no clear split).
    split_score : float
        Mean silhouette of the chosen split (NaN when no split was tried).
    """

    seed_index: int = -1
    interpretation: Interpretation | None = field(default=None, repr=False)
    n_inside: int = 0
    purity: float = float("nan")
    heldout: dict[str, float] | None = None
    uncovered_share: float = float("nan")
    subgroups: list[AuditGroup] = field(default_factory=list)
    split_score: float = float("nan")


@dataclass
class ClassAudit:
    """The audit of one predicted class.

    Attributes
    ----------
    target : int
        The class.
    indices : Tensor
        Audited images predicted as the class.
    regions : list of AuditRegion
        In the order they were peeled off.
    uncovered : Tensor
        Images of the class that no region covers.
    seconds : float
        Wall-clock time of this class's audit.
    """

    target: int
    indices: Tensor
    regions: list[AuditRegion]
    uncovered: Tensor
    seconds: float

    @property
    def uncovered_share(self) -> float:
        """Share of the class's images that no region covers."""
        n = int(self.indices.numel())
        return int(self.uncovered.numel()) / n if n else 0.0


@dataclass
class AuditResult:
    """Audits by class, with the features they were computed from.

    Index it by class: ``result[c]`` is a :class:`ClassAudit`.
    """

    classes: dict[int, ClassAudit]
    features: Tensor = field(repr=False)
    predictions: Tensor = field(repr=False)
    seconds: float = 0.0

    def __getitem__(self, target: int) -> ClassAudit:
        return self.classes[target]

    def __iter__(self):
        return iter(self.classes.values())

    def __len__(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------- clustering
def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, n_init: int = 4,
            iters: int = 50) -> tuple[np.ndarray, float]:
    """Lloyd's k-means with k-means++ starts; the labels of the lowest-inertia run."""
    n = x.shape[0]
    best_labels, best_inertia = np.zeros(n, dtype=np.int64), np.inf
    sq = (x * x).sum(1)
    for _ in range(n_init):
        centres = [x[rng.integers(n)]]
        for _ in range(1, k):
            d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
            total = d2.sum()
            idx = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
            centres.append(x[idx])
        c = np.stack(centres)
        labels = np.full(n, -1)
        for _ in range(iters):
            d = sq[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]
            new = d.argmin(1)
            if np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                if np.any(labels == j):
                    c[j] = x[labels == j].mean(0)
        d = sq[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]
        inertia = float(np.maximum(d[np.arange(n), labels], 0).sum())
        if inertia < best_inertia - 1e-12:
            best_labels, best_inertia = labels.copy(), inertia
    return best_labels, best_inertia


def _silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (Euclidean); members of singleton clusters count 0."""
    d = np.sqrt(np.maximum((x * x).sum(1)[:, None] - 2 * x @ x.T + (x * x).sum(1)[None], 0))
    np.fill_diagonal(d, 0.0)
    ks = np.unique(labels)
    onehot = (labels[:, None] == ks[None]).astype(np.float64)
    counts = onehot.sum(0)
    sums = d @ onehot
    own = onehot.argmax(1)
    n_own = counts[own] - 1
    a = np.where(n_own > 0, sums[np.arange(len(x)), own] / np.maximum(n_own, 1), 0.0)
    mean_other = sums / counts[None]
    mean_other[np.arange(len(x)), own] = np.inf
    b = mean_other.min(1)
    s = np.where(n_own > 0, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0.0)
    return float(s.mean())


def _split(x: np.ndarray, max_groups: int, min_size: int, min_silhouette: float,
           seed: int) -> tuple[np.ndarray, float]:
    """Labels of the best k-means split (k = 2..max_groups) by silhouette, or one group."""
    n = x.shape[0]
    one = np.zeros(n, dtype=np.int64)
    if max_groups < 2 or n < 2 * min_size:
        return one, float("nan")
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(n, size=min(n, 1000), replace=False))
    best, best_score = one, -np.inf
    for k in range(2, max_groups + 1):
        labels, _ = _kmeans(x, k, np.random.default_rng([seed, k]))
        sizes = np.bincount(labels, minlength=k)
        if sizes.min() < min_size:
            continue
        score = _silhouette(x[sub], labels[sub])
        if score > best_score + 1e-12:
            best, best_score = labels, score
    if best_score < min_silhouette:
        return one, (best_score if np.isfinite(best_score) else float("nan"))
    # number groups by size (largest first), ties by smallest member index
    order = sorted(range(best.max() + 1), key=lambda j: (-int((best == j).sum()),
                                                         int(np.argmax(best == j))))
    relabel = np.empty(len(order), dtype=np.int64)
    relabel[order] = np.arange(len(order))
    return relabel[best], best_score


# ---------------------------------------------------------------------- helpers
def _mean_maps(maps: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    means = tuple(m.mean(dim=0) for m in maps)
    return means[0] if len(means) == 1 else means


def _group(members: Tensor, member_margins: Tensor, maps: tuple[Tensor, ...],
           n_exemplars: int) -> AuditGroup:
    """An AuditGroup ranked by semantic distance to its most central member."""
    if members.numel() == 0:
        empty = tuple(m[:0].sum(dim=0) for m in maps)
        return AuditGroup(members, empty[0] if len(empty) == 1 else empty, members)
    med = member_margins.median(dim=0).values
    centre = int(torch.argmin((member_margins - med).abs().sum(1)))
    dist = semantic_distance(member_margins[centre], member_margins)
    order = torch.argsort(dist, stable=True)
    ranked = members[order]
    return AuditGroup(ranked, _mean_maps(maps), ranked[:n_exemplars])


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


# ---------------------------------------------------------------------- audit
def audit(
    ri: Any,
    images: Tensor,
    target: int | None = None,
    coverage_target: float = 0.95,
    max_regions: int = 10,
    heldout: Tensor | None = None,
    seed: int = 0,
    subgroup_by: str = "heatmap",
    max_subgroups: int = 3,
    min_subgroup_size: int | None = None,
    min_silhouette: float = 0.25,
    n_exemplars: int = 8,
    features: tuple[Tensor, Tensor] | None = None,
    batch_size: int = 128,
    **interpret_kwargs: Any,
) -> AuditResult:
    r"""Audit the decision logics a model uses for one predicted class or for all of them.

    For each class ``c`` (``target``, or every class predicted in ``images``), regions are
    peeled off the images predicted as ``c``:

    1. **Seed**: the most central uncovered image of ``c``: the one whose layer features
       are nearest (Euclidean) to the coordinate-wise median of the features of the
       uncovered images of ``c`` (ties: lowest index). The median is taken again after
       every region, so each seed is typical of what is still unexplained.
    2. **Region**: ``ri.interpret(seed, target=c, seed=seed, **interpret_kwargs)``. Its
       members are the uncovered images of ``c`` inside the region
       (``contains_features`` on the features of one batched ``ri.transform``), plus the
       seed itself (so that every region makes progress); they are marked covered.
    3. **Heat maps**: the region's direction reused on every member
       (``heatmap_from_activations`` on the member's features reshaped to the layer), and
       their mean.
    4. **Sub-groups** (a region can cover almost the whole class; the head's boundaries
       separate classes, not the reasons inside one): with ``subgroup_by="heatmap"`` each
       member's heat map is scaled to unit total mass (where the evidence is, not how
       much), with ``"margins"`` each member's margins to the region's boundaries are
       z-scored per boundary. Seeded k-means (k-means++ starts, 4 restarts) is run for
       ``k = 2 .. max_subgroups``; the split with the highest mean silhouette (on at most
       1000 members) is kept if it is at least ``min_silhouette`` and every group has at
       least ``min_subgroup_size`` members; otherwise the region is one group. Groups are
       numbered by size. Each has its own mean heat map and exemplars. (Measured with a
       SmallCNN on MNIST-5k: the best split of a clean class scored 0.17-0.24, so 8 of 10
       classes stay whole, digits 1 and 5 split at 0.36-0.38; a class where 60% of the
       images carry a planted corner patch split at 0.58 into patched and clean images.)

    This stops when at least ``coverage_target`` of the class is covered, after
    ``max_regions`` regions, or when nothing is left.

    Parameters
    ----------
    ri : RepresentativeInterpretation
        A fitted explainer.
    images : Tensor
        The images to audit, ``n x ...`` as given to ``fit`` (they may be the references).
    target : int, optional
        The class to audit; ``None`` audits every class predicted in ``images``.
    coverage_target : float
        Share of a class to cover, in ``(0, 1]``.
    max_regions : int
        Most regions per class.
    heldout : Tensor, optional
        Held-out images; each region is scored on them as a rule (precision: share of the
        held-out images inside that are predicted as the class).
    seed : int
        Seed of every random choice (boundary sampling, k-means, silhouette subsample).
    subgroup_by : {"heatmap", "margins", "none"}
        What the sub-groups are clustered on; ``"none"`` keeps each region whole.
    max_subgroups : int
        Most sub-groups per region.
    min_subgroup_size : int, optional
        Smallest sub-group; default ``max(5, ceil(5% of the region))``.
    min_silhouette : float
        Smallest mean silhouette for which a split is kept.
    n_exemplars : int
        Exemplars kept per region and sub-group.
    features : (Tensor, Tensor), optional
        Precomputed ``(features, predictions)`` of ``images`` (e.g.
        ``(ri.features_, ri.predictions_)`` when ``images`` are the references).
    batch_size : int
        Batch size of ``ri.transform``.
    **interpret_kwargs
        Passed to ``ri.interpret`` (``n_boundaries``, ``delta``, ``refine``,
        ``heatmap_rule``, ``combine``, ``bisection_steps``).

    Returns
    -------
    AuditResult
        ``result[c]`` is a :class:`ClassAudit` with its regions (:class:`AuditRegion`).

    Examples
    --------
    >>> ri = RepresentativeInterpretation(model, model.features[-1]).fit(images)
    >>> result = audit(ri, images, target=7,
    ...                features=(ri.features_, ri.predictions_))
    >>> [(r.size, r.purity, [g.size for g in r.subgroups]) for r in result[7].regions]
    """
    start = time.perf_counter()
    ri.references_  # noqa: B018  (raises NotFittedError before fit)
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a tensor, got {type(images).__name__}")
    coverage_target = _check_fraction(coverage_target, "coverage_target")
    max_regions = check_int(max_regions, "max_regions")
    max_subgroups = check_int(max_subgroups, "max_subgroups")
    n_exemplars = check_int(n_exemplars, "n_exemplars", 0)
    if min_subgroup_size is not None:
        min_subgroup_size = check_int(min_subgroup_size, "min_subgroup_size")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if subgroup_by not in _SUBGROUP_BY:
        raise ValueError(f"subgroup_by must be one of {_SUBGROUP_BY}, got {subgroup_by!r}")
    if isinstance(min_silhouette, bool) or not isinstance(min_silhouette, (int, float)):
        raise TypeError(f"min_silhouette must be a number, got {min_silhouette!r}")
    for bad in ("target", "inputs"):
        if bad in interpret_kwargs:
            raise TypeError(f"audit() got an unexpected keyword argument {bad!r}")

    if features is None:
        feats, preds = ri.transform(images, batch_size=batch_size)
    else:
        if not (isinstance(features, tuple) and len(features) == 2):
            raise TypeError("features must be a (features, predictions) tuple of tensors")
        feats, preds = features
        if feats.shape != (images.shape[0], ri.layout_.dim) or preds.shape != (images.shape[0],):
            raise ValueError(
                f"features: expected shapes ({images.shape[0]}, {ri.layout_.dim}) and "
                f"({images.shape[0]},), got {tuple(feats.shape)} and {tuple(preds.shape)}"
            )
    feats = feats.detach().cpu().float()
    preds = preds.detach().cpu().long()
    held = None
    if heldout is not None:
        if not isinstance(heldout, Tensor):
            raise TypeError(f"heldout must be a tensor or None, got {type(heldout).__name__}")
        held = ri.transform(heldout, batch_size=batch_size)

    if target is None:
        classes = [int(c) for c in torch.unique(preds)]
    else:
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
            raise TypeError(f"target must be an int or None, got {target!r}")
        target = int(target)
        if not bool((preds == target).any()):
            raise ValueError(f"target: no image in images is predicted as class {target}")
        classes = [target]

    args = (coverage_target, max_regions, seed, subgroup_by, max_subgroups, min_subgroup_size,
            float(min_silhouette), n_exemplars, interpret_kwargs)
    run = getattr(ri.references_, "map_classes", None)  # classes as parallel tasks
    if run is not None and len(classes) > 1:
        audits = run(_audit_class, ri, images, feats, preds, held, classes, args)
    else:
        audits = [_audit_class(ri, images, feats, preds, held, c, *args) for c in classes]
    return AuditResult(dict(zip(classes, audits)), feats, preds, time.perf_counter() - start)


def _audit_class(
    ri: Any, images: Tensor, feats: Tensor, preds: Tensor,
    held: tuple[Tensor, Tensor] | None, c: int, coverage_target: float, max_regions: int,
    seed: int, subgroup_by: str, max_subgroups: int, min_subgroup_size: int | None,
    min_silhouette: float, n_exemplars: int, interpret_kwargs: dict[str, Any],
) -> ClassAudit:
    start = time.perf_counter()
    in_class = preds == c
    indices = torch.nonzero(in_class).flatten()
    n_class = int(indices.numel())
    uncovered = in_class.clone()
    regions: list[AuditRegion] = []
    while len(regions) < max_regions and bool(uncovered.any()):
        if 1 - int(uncovered.sum()) / n_class >= coverage_target:
            break
        left = torch.nonzero(uncovered).flatten()
        pts = feats[left]
        med = pts.median(dim=0).values
        seed_index = int(left[torch.argmin(((pts - med) ** 2).sum(1))])
        interp = ri.interpret(images[seed_index : seed_index + 1], target=c, random_state=seed,
                              **interpret_kwargs)
        inside = interp.contains_features(feats)
        new = inside & uncovered
        new[seed_index] = True
        n_inside = int(inside.sum())
        members = torch.nonzero(new).flatten()
        dist = interp.distance_features(feats[members])
        members = members[torch.argsort(dist, stable=True)]
        uncovered &= ~new
        member_feats = feats[members]
        maps = interp.heatmap_from_activations(ri.layout_.unflatten(member_feats))
        if interp.n_boundaries:
            member_margins = margins(member_feats, interp.weight, interp.bias)
        else:
            member_margins = torch.zeros(len(members), 1)
        labels, score = _subgroup_labels(
            maps, member_margins, subgroup_by, max_subgroups, min_subgroup_size,
            min_silhouette, seed,
        )
        subgroups = []
        for g in range(int(labels.max()) + 1 if len(labels) else 0):
            sel = torch.from_numpy(labels == g)
            subgroups.append(_group(members[sel], member_margins[sel],
                                    tuple(m[sel] for m in maps), n_exemplars))
        regions.append(
            AuditRegion(
                members=members,
                mean_heatmap=_mean_maps(maps),
                exemplars=members[:n_exemplars],
                seed_index=seed_index,
                interpretation=interp,
                n_inside=n_inside,
                purity=int((inside & in_class).sum()) / n_inside if n_inside else float("nan"),
                heldout=interp.evaluate_features(*held) if held is not None else None,
                uncovered_share=int(uncovered.sum()) / n_class,
                subgroups=subgroups,
                split_score=score,
            )
        )
    return ClassAudit(c, indices, regions, torch.nonzero(uncovered).flatten(),
                      time.perf_counter() - start)


def _subgroup_labels(
    maps: tuple[Tensor, ...], member_margins: Tensor, subgroup_by: str, max_subgroups: int,
    min_subgroup_size: int | None, min_silhouette: float, seed: int,
) -> tuple[np.ndarray, float]:
    n = member_margins.shape[0]
    if subgroup_by == "none" or n == 0:
        return np.zeros(n, dtype=np.int64), float("nan")
    if subgroup_by == "heatmap":
        x = torch.cat([m.reshape(n, -1) for m in maps], dim=1).double()
        mass = x.sum(1, keepdim=True)
        x = torch.where(mass > 0, x / mass.clamp_min(1e-300), torch.full_like(x, 1 / x.shape[1]))
    else:
        x = member_margins.double()
        x = (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-12)
    min_size = min_subgroup_size or max(5, int(np.ceil(0.05 * n)))
    return _split(x.numpy(), max_subgroups, min_size, min_silhouette, seed)
