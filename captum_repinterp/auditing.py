"""Auditing a class: the decision logics a model uses for the images it puts in a class.

One representative interpretation explains one seed; an audit explains a whole predicted
class by peeling regions off it (see "Auditing a class" in ``docs/method.md``)::

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
The sub-groups are clustered with scikit-learn (``pip install captum_repinterp[audit]``).
"""

from __future__ import annotations

import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._captum_compat import _format_additional_forward_args
from ._checks import check_grad_mode, check_int
from .audit_saving import load_audit, save_audit
from .features import caller_stacklevel, in_eval_mode
from .inputs import per_example, slice_args
from .interpretation import Interpretation
from .match import margins, semantic_distance
from .options import AUTO, InterpretOptions
from .references import NotFittedError

__all__ = ["AUDIT_HEATMAP_RULE", "AuditGroup", "AuditRegion", "ClassAudit", "AuditResult", "audit"]

#: The heat-map rule of :func:`audit` when none is given: the region's direction position
#: by position at the split layer (the sub-groups are split by where the evidence lies),
#: the authors' rule; the one that separated the planted shortcut in all three of our
#: shortcut tests (see the choices page).
AUDIT_HEATMAP_RULE = "elementwise"

_SUBGROUP_BY = ("heatmap", "margins", "none")


def _num(value: float | None, digits: int = 3) -> str:
    """A number for a summary: fixed digits, ``n/a`` for NaN, ``-`` for None."""
    if value is None:
        return "-"
    return "n/a" if np.isnan(value) else f"{value:.{digits}f}"


def _indices(t: Tensor, most: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in t[:most])
    return f"[{shown}, ...]" if t.numel() > most else f"[{shown}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Plain-text columns: numbers right-aligned, the last (text) column left-aligned."""
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header) - 1)]
    return ["  ".join([*(c.rjust(w) for c, w in zip(r, widths)), r[-1]]) for r in [header, *rows]]


def _same(a: Any, b: Any) -> bool:
    """Equal by value: tensors exactly (values and dtype), NaN equal to NaN, lists,
    tuples and dicts item by item (interpretations with their own ``==``)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dtype == b.dtype
            and torch.equal(a.cpu(), b.cpu())
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


class _ByValue:
    """``==`` by value (:func:`_same`) over the dataclass fields that are compared: the
    times are not, so a re-run or a pickled copy equals the original. Unhashable, as
    the objects are mutable."""

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(
            _same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self) if f.compare
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(repr=False, eq=False)
class AuditGroup(_ByValue):
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

    def __repr__(self) -> str:
        return f"AuditGroup(size={self.size}, exemplars={_indices(self.exemplars)})"


@dataclass(repr=False, eq=False)
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

    @property
    def heldout_precision(self) -> float | None:
        """``heldout["precision"]`` (None without held-out images)."""
        return None if self.heldout is None else self.heldout["precision"]

    def __repr__(self) -> str:
        return (
            f"AuditRegion(seed_index={self.seed_index}, size={self.size}, "
            f"purity={_num(self.purity)}, heldout_precision={_num(self.heldout_precision)}, "
            f"subgroups={[g.size for g in self.subgroups]}, "
            f"split_score={_num(self.split_score, 2)})"
        )


def _subgroups_text(region: AuditRegion) -> str:
    """Sizes of the sub-groups and the silhouette of the split (or of the best one tried)."""
    if len(region.subgroups) > 1:
        sizes = " + ".join(str(g.size) for g in region.subgroups)
        return f"{sizes} (silhouette {_num(region.split_score, 2)})"
    if np.isfinite(region.split_score):
        return f"1 (best split {_num(region.split_score, 2)})"
    return "1"


@dataclass(repr=False, eq=False)
class ClassAudit(_ByValue):
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
        Wall-clock time of this class's regions and sub-groups, without the features of
        ``images`` and ``heldout``, which are read once for all classes (they are in
        :attr:`AuditResult.seconds`).
    """

    target: int
    indices: Tensor
    regions: list[AuditRegion]
    uncovered: Tensor
    seconds: float = field(compare=False)

    @property
    def uncovered_share(self) -> float:
        """Share of the class's images that no region covers."""
        n = int(self.indices.numel())
        return int(self.uncovered.numel()) / n if n else 0.0

    def __repr__(self) -> str:
        return (
            f"ClassAudit(target={self.target}, images={int(self.indices.numel())}, "
            f"regions={len(self.regions)}, uncovered={int(self.uncovered.numel())} "
            f"({self.uncovered_share:.1%}), {self.seconds:.1f} s)"
        )

    def summary(self) -> str:
        """A table of the regions: seed, size, purity, held-out precision, sub-groups.

        ``size`` counts the region's new members, ``inside`` every audited image inside
        it, ``held-out inside`` (with held-out images) the held-out images inside it, of
        which the held-out precision is taken (n/a when none: no held-out image of the
        class reaches the region, itself a finding); ``sub-groups`` lists the group sizes
        and the silhouette of the split (or of the best split tried, when it was too weak
        to keep).
        """
        n = int(self.indices.numel())
        plural = "" if len(self.regions) == 1 else "s"
        images = "image" if n == 1 else "images"
        lines = [
            f"class {self.target}: {n} {images}, {len(self.regions)} region{plural}, "
            f"{int(self.uncovered.numel())} uncovered ({self.uncovered_share:.1%}), "
            f"{self.seconds:.1f} s"
        ]
        held = any(r.heldout is not None for r in self.regions)
        rows = [
            [
                str(i),
                str(r.seed_index),
                str(r.size),
                str(r.n_inside),
                _num(r.purity),
                *([str(int(r.heldout["n_inside"])) if r.heldout else "-"] if held else []),
                _num(r.heldout_precision),
                _subgroups_text(r),
            ]
            for i, r in enumerate(self.regions, 1)
        ]
        if rows:
            header = [
                "region",
                "seed",
                "size",
                "inside",
                "purity",
                *(["held-out inside"] if held else []),
                "held-out precision",
                "sub-groups",
            ]
            lines += _table(header, rows)
            lines.append(
                "(size: the region's new members, of this class and in no earlier region; "
                "inside: audited images of any class inside it)"
            )
        return "\n".join(lines)


@dataclass(repr=False, eq=False)
class AuditResult(_ByValue):
    """Audits by class, with the features they were computed from.

    Index it by class: ``result[c]`` is a :class:`ClassAudit`. ``print(result)`` gives
    one line; ``print(result.summary())`` a table per class.
    """

    classes: dict[int, ClassAudit]
    features: Tensor = field(repr=False)
    predictions: Tensor = field(repr=False)
    seconds: float = field(default=0.0, compare=False)

    def __getitem__(self, target: int) -> ClassAudit:
        return self.classes[target]

    def __iter__(self):
        return iter(self.classes.values())

    def __len__(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        n_regions = sum(len(ca.regions) for ca in self.classes.values())
        return (
            f"AuditResult(classes={list(self.classes)}, regions={n_regions}, {self.seconds:.1f} s)"
        )

    def summary(self) -> str:
        """:meth:`ClassAudit.summary` of every class, after a one-line total."""
        parts = [repr(self)] + [ca.summary() for ca in self.classes.values()]
        return "\n\n".join(parts)

    def save(self, path: str | os.PathLike) -> None:
        """Save the audit as one ``.npz`` file, to be loaded with :meth:`load`.

        Everything is kept: the features and predictions, each class's images and
        uncovered images, and each region with its members, exemplars, mean heat map,
        sub-groups, scores (NaN included), held-out scores and its interpretation (as
        :meth:`Interpretation.save` writes one, with the model's fingerprint and the
        split layer's name), and the times. No pickle: a pickled audit carries the whole
        model through each interpretation's reader, and unpickling a file runs code, so
        only a trusted one can be opened. The file is written through a temporary file
        renamed at the end (an interrupted save leaves an earlier file whole), at
        ``path`` as given (no ``.npz`` suffix is added).

        Parameters
        ----------
        path : str or os.PathLike
            The file to write.

        Raises
        ------
        TypeError
            For a ``path`` that is not a str or os.PathLike.
        ValueError
            For an empty ``path`` or a directory.
        """
        save_audit(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, explainer: Any = None) -> AuditResult:
        """Load an audit written by :meth:`save` (``allow_pickle=False``: no code is run).

        The loaded audit equals the saved one (``==``) and gives the same
        :meth:`summary`. The regions' interpretations need the model for ``contains``,
        ``distance`` and ``heatmap``: pass the fitted explainer the audit was made with
        (or its ``reader_``) as ``explainer``; it is checked as
        :meth:`Interpretation.load` checks it, and a model with other weights, or a layer
        of another name, gives one ``UserWarning`` for the whole audit. Without it
        everything else works (the ``*_features`` methods, the summary,
        :func:`~captum_repinterp.visualization.plot_audit`).

        Parameters
        ----------
        path : str or os.PathLike
            A file written by :meth:`save`.
        explainer : RepresentativeInterpretation or LayerReader, optional
            The fitted explainer the audit was made with, or its ``reader_``.

        Returns
        -------
        AuditResult

        Raises
        ------
        ValueError
            Naming ``path`` for a file that is not an audit (an interpretation's file,
            another archive, not an archive) or of another format version; naming
            ``explainer`` for an explainer whose layer is shaped unlike the regions',
            that reads the other side of it, or that was fitted on fewer references than
            the regions' members need.
        TypeError, NotFittedError
            For an ``explainer`` that is not a (fitted) explainer or reader; a ``path``
            that is not a str or os.PathLike is a TypeError too.
        FileNotFoundError
            For a ``path`` that does not exist.
        """
        return load_audit(cls, path, explainer)


# ---------------------------------------------------------------------- clustering
#: What to install for the sub-group split (scikit-learn's k-means and silhouette).
_SKLEARN_HINT = (
    "audit() clusters sub-groups with scikit-learn, which is not installed: "
    "pip install 'captum_repinterp[audit]' (or pass subgroup_by='none')"
)


def _sklearn() -> tuple[Any, Any]:
    """``(KMeans, silhouette_score)``, imported lazily (scikit-learn is an optional extra)."""
    try:
        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score
    except ImportError as exc:
        raise ImportError(_SKLEARN_HINT) from exc
    return KMeans, silhouette_score


#: Members on which the silhouette of a split is computed (a seeded subsample above this).
_SILHOUETTE_SAMPLE = 1000


def _split(
    x: np.ndarray, max_groups: int, min_size: int, min_silhouette: float, random_state: int
) -> tuple[np.ndarray, float]:
    """Labels of the best k-means split (k = 2..max_groups) by silhouette, or one group.

    k-means is scikit-learn's ``KMeans`` (k-means++ starts, 4 restarts, seeded); the mean
    silhouette (Euclidean) is ``silhouette_score`` on all members, or on a seeded subsample
    of 1000 members above that. Splits with a group smaller than ``min_size`` are skipped.
    A silhouette needs 2 to ``m - 1`` groups among the ``m`` members it is taken on, so
    ``k`` stops at ``n - 1``, and a split of which the subsample holds one group only
    (a small group it missed) is skipped. ``k`` also stops at the members' distinct rows
    (k-means finds no more groups; every map of a 1 x 1 layer is the same) and at
    ``n // min_size`` (a group would be smaller): no split those skip could be kept.
    Groups are numbered by size (largest first), ties by their smallest member index.
    """
    n = x.shape[0]
    one = np.zeros(n, dtype=np.int64)
    if max_groups < 2 or n < 2 * min_size:
        return one, float("nan")
    kmeans, silhouette_score = _sklearn()
    rows = None  # the subsample silhouette_score(sample_size=, random_state=) would draw
    if n > _SILHOUETTE_SAMPLE:
        rows = np.random.RandomState(random_state).permutation(n)[:_SILHOUETTE_SAMPLE]
    best, best_score = one, -np.inf
    most = min(max_groups, n - 1, n // min_size, len(np.unique(x, axis=0)))
    for k in range(2, most + 1):
        labels = kmeans(n_clusters=k, n_init=4, random_state=random_state).fit_predict(x)
        sizes = np.bincount(labels, minlength=k)
        if sizes.min() < min_size:
            continue
        scored = labels if rows is None else labels[rows]
        if np.unique(scored).size < 2:
            continue
        score = float(silhouette_score(x if rows is None else x[rows], scored))
        if score > best_score + 1e-12:
            best, best_score = labels.astype(np.int64), score
    if best_score < min_silhouette:
        return one, (best_score if np.isfinite(best_score) else float("nan"))
    order = sorted(
        range(best.max() + 1), key=lambda j: (-int((best == j).sum()), int(np.argmax(best == j)))
    )
    relabel = np.empty(len(order), dtype=np.int64)
    relabel[order] = np.arange(len(order))
    return relabel[best], best_score


# ---------------------------------------------------------------------- helpers
def _mean_maps(maps: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    means = tuple(m.mean(dim=0) for m in maps)
    return means[0] if len(means) == 1 else means


def _group(
    members: Tensor, member_margins: Tensor, maps: tuple[Tensor, ...], n_exemplars: int
) -> AuditGroup:
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
    """``value`` as a float in (0, 1] (Python or NumPy numbers; not bools)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _explainer_modules(ri: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """The model and layer of ``audit``'s explainer (run in eval mode for the whole
    audit: one training-mode warning, as the other entry points give)."""
    return getattr(ri, "forward_func", None), getattr(ri, "layer", None)


# ---------------------------------------------------------------------- audit
@in_eval_mode(_explainer_modules)
def audit(
    ri: Any,
    images: Tensor,
    target: int | None = None,
    coverage_target: float = 0.95,
    max_regions: int = 10,
    heldout: Tensor | None = None,
    random_state: int = 0,
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
    2. **Region**: ``ri.interpret(seed, target=c, random_state=random_state,
       **interpret_kwargs)``. Its
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
       z-scored per boundary. scikit-learn's ``KMeans`` (k-means++ starts, 4 restarts,
       ``random_state``) is run for ``k = 2 .. max_subgroups``; the split with the highest
       mean silhouette (``silhouette_score``, on a seeded subsample of 1000 members when
       there are more) is kept if it is at least ``min_silhouette`` and every group has at
       least ``min_subgroup_size`` members; otherwise the region is one group. Groups are
       numbered by size. Each has its own mean heat map and exemplars. At a split layer
       of one position per example (1 x 1) every member's map is the same once scaled,
       so nothing can split by heat map: a ``UserWarning`` says so. (Measured with a
       SmallCNN on MNIST-5k's 80% split: the best splits of 7 of the 10 classes scored
       0.20-0.24, so they stay whole, digits 1, 5 and 6 split at 0.25-0.32; a class where
       60% of the images carry a planted corner patch split at 0.69 into patched and clean
       images. A split is not by itself a shortcut: on a ResNet-18 trained on synthetic
       shapes, clean classes split at 0.35-0.49 by where the shape sits, and the class
       with a planted mark at 0.50-0.55. Read each group's exemplars and mean map.)
       The maps are drawn at the split layer, so groups split by *where* the evidence
       lies can be no finer than its grid: split where the layer's output is at least
       4 x 4. (A DenseNet-121 at 64 px trained on shapes with a corner patch on half of
       one class, in a user trial: at ``features``, 2 x 2, the groups were 73% / 26% /
       40% patched; at ``features.denseblock3``, 4 x 4, every patched image fell in one
       group, 84% patched, and the other groups were clean.)

    This stops when at least ``coverage_target`` of the class is covered, after
    ``max_regions`` regions, or when nothing is left.

    Parameters
    ----------
    ri : RepresentativeInterpretation
        A fitted explainer.
    images : Tensor
        The images to audit, ``n x ...`` as given to ``fit`` (they may be the references).
    target : int or one-element integer Tensor, optional
        The class to audit; ``None`` audits every class predicted in ``images``.
    coverage_target : float
        Share of a class to cover, in ``(0, 1]``.
    max_regions : int
        Most regions per class.
    heldout : Tensor, optional
        Held-out images; each region is scored on them as a rule (precision: share of the
        held-out images inside that are predicted as the class).
    random_state : int
        Seed of every random choice (boundary sampling, k-means, silhouette subsample).
        (Named as in scikit-learn; "seed" is the image a region is grown from.)
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
        ``heatmap_rule``, ``combine``, ``bisection_steps``). The maps are drawn at the
        split layer, by default with ``heatmap_rule=AUDIT_HEATMAP_RULE``
        (``"elementwise"``: the region's direction position by position, so that
        sub-groups split by where the evidence lies; ``interpret``'s default,
        ``"channel-members"``, draws one weight per channel there). ``additional_forward_args``
        (Captum's: extra arguments of the model's forward after the inputs) is used for
        ``images`` (a tensor with one row per image is per example: each seed gets its
        row) and for ``heldout`` (only extra arguments that hold for every example).

    Returns
    -------
    AuditResult
        ``result[c]`` is a :class:`ClassAudit` with its regions (:class:`AuditRegion`);
        ``print(result.summary())`` shows a table per class.

    Raises
    ------
    NotFittedError
        If ``ri`` is not fitted (a TypeError if it is no explainer at all).
    ImportError
        If scikit-learn is missing and ``subgroup_by`` is not ``"none"``.
    TypeError, ValueError
        On a bad argument (the message names it).

    Examples
    --------
    >>> ri = RepresentativeInterpretation(model, model.features[-1]).fit(images)
    >>> result = audit(ri, images, target=7,
    ...                features=(ri.features_, ri.predictions_))
    >>> [(r.size, r.purity, [g.size for g in r.subgroups]) for r in result[7].regions]
    """
    start = time.perf_counter()
    if not hasattr(type(ri), "features_"):
        raise TypeError(
            f"ri must be a fitted RepresentativeInterpretation, got {type(ri).__name__}"
        )
    if not hasattr(ri, "features_") or not hasattr(ri, "layout_"):
        raise NotFittedError("ri is not fitted yet: call ri.fit(reference_images) before audit()")
    ri._check_model()  # a model changed after fit, refused before any work
    check_grad_mode("audit")
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a tensor, got {type(images).__name__}")
    coverage_target = _check_fraction(coverage_target, "coverage_target")
    max_regions = check_int(max_regions, "max_regions")
    max_subgroups = check_int(max_subgroups, "max_subgroups")
    n_exemplars = check_int(n_exemplars, "n_exemplars", 0)
    if min_subgroup_size is not None:
        min_subgroup_size = check_int(min_subgroup_size, "min_subgroup_size")
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)):
        raise TypeError(f"random_state must be an int, got {random_state!r}")
    random_state = int(random_state)
    if not 0 <= random_state < 2**32:  # scikit-learn's range (k-means, silhouette)
        raise ValueError(f"random_state must be an int in [0, 2**32), got {random_state}")
    if subgroup_by not in _SUBGROUP_BY:
        raise ValueError(f"subgroup_by must be one of {_SUBGROUP_BY}, got {subgroup_by!r}")
    if subgroup_by != "none":
        _sklearn()  # fail before any region is computed
    if subgroup_by == "heatmap" and all(math.prod(s[1:]) == 1 for s in ri.layout_.shapes):
        warnings.warn(
            f"subgroup_by='heatmap': the split layer gives one position per example "
            f"({' + '.join('x'.join(map(str, s)) for s in ri.layout_.shapes)}), so every "
            "member's heat map is one value, the same once scaled to unit mass, and no "
            "region can be split by where its evidence is; split at an earlier layer "
            "(4 x 4 positions or more) or pass subgroup_by='margins'",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    if isinstance(min_silhouette, bool) or not isinstance(min_silhouette, numbers.Real):
        raise TypeError(f"min_silhouette must be a number, got {min_silhouette!r}")
    if not math.isfinite(min_silhouette):
        raise ValueError(f"min_silhouette must be finite, got {min_silhouette!r}")
    known = {f.name for f in fields(InterpretOptions)} | {"additional_forward_args"}
    for name in interpret_kwargs:
        if name not in known:  # target and inputs are audit's own (per class, per seed)
            raise TypeError(f"audit() got an unexpected keyword argument {name!r}")
    # "auto", interpret's default, and the split layer itself are taken as leaving it out
    layer = interpret_kwargs.get("heatmap_layer")
    at_split = layer is None or layer is ri.layer or (isinstance(layer, str) and layer == AUTO)
    if not at_split:
        raise ValueError(
            "heatmap_layer: audit draws the members' maps from their features at the "
            "split layer, so it cannot draw them at another layer; leave heatmap_layer out"
        )
    # the members' maps are clustered by where their evidence lies: by default the
    # region's direction position by position (interpret's default draws one weight per
    # channel at the split layer, which blurs a cue at one place, such as a patch)
    interpret_kwargs = {
        "heatmap_rule": AUDIT_HEATMAP_RULE,
        **interpret_kwargs,
        "heatmap_layer": None,
    }
    extra = _format_additional_forward_args(interpret_kwargs.pop("additional_forward_args", None))
    InterpretOptions(**interpret_kwargs)  # checked before any work, not at the first region
    if images.dim() == 0:
        raise ValueError("images: tensors need a batch dimension (got a 0-d tensor)")
    n_images = int(images.shape[0])
    if n_images == 0:
        raise ValueError("images: empty (no examples); audit needs images of the class")
    if isinstance(heldout, Tensor) and heldout.dim() > 0 and heldout.shape[0] == 0:
        raise ValueError("heldout: empty (no examples); pass None to leave it out")
    per_example_args = n_images > 1 and bool(per_example(extra, n_images))
    if target is not None:
        if isinstance(target, Tensor) and target.numel() == 1 and not target.is_floating_point():
            target = target.item()  # a one-element integer tensor, as interpret takes
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
            raise TypeError(f"target must be an int or None, got {target!r}")
        target = int(target)
    if heldout is not None:
        if not isinstance(heldout, Tensor):
            raise TypeError(f"heldout must be a tensor or None, got {type(heldout).__name__}")
        if per_example_args:
            raise ValueError(
                "additional_forward_args: its per-example tensors (one row per image of "
                "images) cannot be given to heldout; pass extra arguments that hold for "
                "every example, or leave heldout out"
            )

    if features is None:
        feats, preds = ri.reader_.features(
            images, batch_size, additional_forward_args=extra, name="images"
        )
    else:
        if not (
            isinstance(features, tuple)
            and len(features) == 2
            and all(isinstance(t, Tensor) for t in features)
        ):
            raise TypeError("features must be a (features, predictions) tuple of tensors")
        feats, preds = features
        if feats.shape != (images.shape[0], ri.layout_.dim) or preds.shape != (images.shape[0],):
            raise ValueError(
                f"features: expected shapes ({images.shape[0]}, {ri.layout_.dim}) and "
                f"({images.shape[0]},), got {tuple(feats.shape)} and {tuple(preds.shape)}"
            )
        if preds.is_floating_point() or preds.is_complex():
            raise TypeError(
                f"features: the predictions must be integer classes, got {preds.dtype} "
                "(ri.transform(images) gives them as int64)"
            )
        finite = torch.isfinite(feats).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten()
            raise ValueError(
                f"features: NaN or inf in the features of example(s) {_indices(bad, 10)[1:-1]} "
                "(ri.transform(images) gives them finite)"
            )
    feats = feats.detach().cpu().float()
    preds = preds.detach().cpu().long()
    held = None
    if heldout is not None:
        held = ri.reader_.features(
            heldout, batch_size, additional_forward_args=extra, name="heldout"
        )

    if target is None:
        classes = [int(c) for c in torch.unique(preds)]
    else:
        if not bool((preds == target).any()):
            raise ValueError(f"target: no image in images is predicted as class {target}")
        classes = [target]

    args = (
        coverage_target,
        max_regions,
        random_state,
        subgroup_by,
        max_subgroups,
        min_subgroup_size,
        float(min_silhouette),
        n_exemplars,
        extra,
        interpret_kwargs,  # last: the parallel runner reads heatmap_layer from it
    )
    run = getattr(ri.references_, "map_classes", None)  # classes as parallel tasks
    if run is not None and len(classes) > 1:
        audits = run(_audit_class, ri, images, feats, preds, held, classes, args)
    else:
        audits = [_audit_class(ri, images, feats, preds, held, c, *args) for c in classes]
    return AuditResult(dict(zip(classes, audits)), feats, preds, time.perf_counter() - start)


def _audit_class(
    ri: Any,
    images: Tensor,
    feats: Tensor,
    preds: Tensor,
    held: tuple[Tensor, Tensor] | None,
    c: int,
    coverage_target: float,
    max_regions: int,
    random_state: int,
    subgroup_by: str,
    max_subgroups: int,
    min_subgroup_size: int | None,
    min_silhouette: float,
    n_exemplars: int,
    additional_forward_args: tuple | None,
    interpret_kwargs: dict[str, Any],
) -> ClassAudit:
    start = time.perf_counter()
    in_class = preds == c
    indices = torch.nonzero(in_class).flatten()
    n_class = int(indices.numel())
    uncovered = in_class.clone()
    regions: list[AuditRegion] = []
    while len(regions) < max_regions and bool(uncovered.any()):
        # covered share >= coverage_target, in integers (1 - 9/10 < 0.1 in floats)
        if n_class - int(uncovered.sum()) >= math.ceil(coverage_target * n_class - 1e-9):
            break
        left = torch.nonzero(uncovered).flatten()
        pts = feats[left]
        med = pts.median(dim=0).values
        seed_index = int(left[torch.argmin(((pts - med) ** 2).sum(1))])
        interp = ri.interpret(
            images[seed_index : seed_index + 1],
            additional_forward_args=slice_args(
                additional_forward_args, int(images.shape[0]), seed_index, seed_index + 1
            ),
            target=c,
            random_state=random_state,
            **interpret_kwargs,
        )
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
            maps,
            member_margins,
            subgroup_by,
            max_subgroups,
            min_subgroup_size,
            min_silhouette,
            random_state,
        )
        subgroups = []
        for g in range(int(labels.max()) + 1 if len(labels) else 0):
            sel = torch.from_numpy(labels == g)
            subgroups.append(
                _group(members[sel], member_margins[sel], tuple(m[sel] for m in maps), n_exemplars)
            )
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
    return ClassAudit(
        c, indices, regions, torch.nonzero(uncovered).flatten(), time.perf_counter() - start
    )


def _subgroup_labels(
    maps: tuple[Tensor, ...],
    member_margins: Tensor,
    subgroup_by: str,
    max_subgroups: int,
    min_subgroup_size: int | None,
    min_silhouette: float,
    random_state: int,
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
    return _split(x.numpy(), max_subgroups, min_size, min_silhouette, random_state)
