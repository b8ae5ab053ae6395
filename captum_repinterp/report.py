"""A static HTML audit report: the regions that cover each class of a model.

``captum-repinterp report --out DIR`` writes ``DIR/index.html`` and one PNG per figure
next to it (no server, no JavaScript library, nothing downloaded); the figures that
an earlier report in ``DIR`` linked are removed first, so none is left behind. For every
audited class the report runs :func:`captum_repinterp.auditing.audit` on the held-out images
predicted as that class: the most central held-out image not yet inside a region is the
next seed, its region is scored as a rule on the held-out images, the images it contains
are marked covered, and this repeats (at most ``regions_per_class`` times).

Regions are numbered ``R1, R2, ...`` over the whole page, and the table, the summary
chart, the class figures and the region sections all use these numbers. Each region gets
its figure (seed and nearest members under the shared heat map, with predicted and true
labels), its numbers, the images inside it that the model puts in another class
(*intruders*) or, when true labels are known, that carry another label (*misclassified*),
and a table of its nearest members. The page carries a glossary of every column.

The page is rendered from the jinja2 template ``templates/report.html.j2`` with
autoescaping on. The model and data come from the user (``--model-factory pkg.mod:fn``
returning ``model``, ``(model, layer)`` or ``(model, layer, head)``; ``--data
pkg.mod:fn`` returning ``(reference_images, heldout_images)`` or ``(reference_images,
heldout_images, reference_labels, heldout_labels)``) or, by default, the bundled demo:
the small CNN on MNIST-5k.
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from ._checks import check_int
from .attribution import RepresentativeInterpretation
from .auditing import AuditRegion, ClassAudit, audit
from .features import caller_stacklevel, in_eval_mode, module_name
from .interpretation import Interpretation
from .report_inputs import ReportInputs, checked_labels, prepare_report
from .visualization import SEM_DIST, _plain, plot_audit, plot_images, plot_region

__all__ = [
    "GLOSSARY",
    "LABEL_ORDER_MARGIN",
    "LABEL_ORDER_MIN_IMAGES",
    "RegionRow",
    "audit_regions",
    "build_report",
    "label_order_mismatch",
    "run_report",
]

#: What every number and label on the page means (rendered as the page's glossary).
GLOSSARY: tuple[tuple[str, str], ...] = (
    (
        "R1, R2, ...",
        "the regions, numbered over the whole page in the order they were found (class by class).",
    ),
    (
        "#157",
        "the index of an image in its set: held-out images for seeds and class "
        "exemplars (#157), reference images for members (ref #157 in the figures, the "
        "'reference' column of the tables).",
    ),
    (
        "boundaries",
        "how many linear pieces of the model's decision boundary (hyperplanes in "
        "the layer's feature space) bound the region; an image is inside when it lies on the "
        "seed's side of every one.",
    ),
    (
        "delta",
        "how many references of other classes the region may keep inside. By default it "
        "is the fewest the candidate boundaries can reach, so it is the number left "
        "inside (0: none).",
    ),
    (
        "reached",
        "yes when the chosen boundaries met that bound (at most delta references "
        "of other classes inside); no when a delta asked for could not be met. With the "
        "default delta it is always yes.",
    ),
    ("members", "reference images inside the region."),
    (
        "purity",
        "share of the members that the model puts in the region's class (measured "
        "on the references the region was fitted on; n/a for a region with no member).",
    ),
    (
        "coverage",
        "share of the references the model puts in the class that are members (n/a when "
        "the model puts no reference in the class: its regions were fitted without one).",
    ),
    ("held-out inside", "held-out images inside the region, the seed not counted."),
    (
        "held-out precision",
        "share of the held-out images inside that the model puts in the "
        "class: how well the region works as a rule on images it was not fitted on (n/a when "
        "none is inside).",
    ),
    (
        "held-out coverage",
        "share of the class's held-out images (seed excluded) inside the region.",
    ),
    (
        "newly covered",
        "held-out images of the class that this region contains and no "
        "earlier region of the class did, the seed included; they are the region's row in "
        "the class figure.",
    ),
    (
        "sub-groups",
        "the newly covered images split by where the region's heat map falls on "
        "them (k-means on the maps, kept when the mean silhouette is at least 0.25); "
        '"2 (40, 19)" is two groups of 40 and 19 images, shown as group a and b.',
    ),
    (
        "intruders",
        "images inside the region (references and held-out images) that the "
        "model puts in another class; they are what lowers purity and held-out precision.",
    ),
    (
        "misclassified",
        "images inside the region (references and held-out images) that the model puts "
        "in the class but whose true label is another (only when true labels are given): "
        "the model's mistakes that this decision logic makes (or wrong labels).",
    ),
    ("sem. dist.", SEM_DIST[len("sem. dist. = ") :] + "; 0 for the seed itself."),
    (
        "heat map",
        "the region's map in logit units: at each position of the layer, the sum "
        "over channels of the region's direction times the activation, ReLU applied; computed "
        "at the layer's resolution, upsampled to the image, and the same for every image of "
        "the region.",
    ),
)


@dataclass
class RegionRow:
    """One region of the report.

    Attributes
    ----------
    target : int
        The class explained.
    seed_index : int
        Index of the seed among the held-out images.
    interpretation : Interpretation
        The region itself.
    heldout_inside : int
        Held-out images (other than the seed) inside the region.
    heldout_precision : float
        Share of those predicted as ``target`` (NaN when none is inside).
    heldout_coverage : float
        Share of the held-out images predicted as ``target`` (seed excluded) inside.
    newly_covered : int
        Held-out images of the class that no earlier region of the class contained
        (with the seed).
    region : AuditRegion
        The audit's record of the region (members, sub-groups, split score).
    figure : str
        File name of the region's PNG (set by :func:`build_report`).
    label : str
        The region's name on the page: ``"R1"``, ``"R2"``, ... in the order of the rows.
    """

    target: int
    seed_index: int
    interpretation: Interpretation
    heldout_inside: int
    heldout_precision: float
    heldout_coverage: float
    newly_covered: int
    region: AuditRegion | None = field(default=None, repr=False)
    figure: str = field(default="")
    label: str = field(default="")

    @property
    def subgroup_sizes(self) -> list[int]:
        """Sizes of the region's sub-groups (one entry when it was not split)."""
        if self.region is None:
            return []
        return [g.size for g in self.region.subgroups] or [self.region.size]


def audit_regions(
    ri: RepresentativeInterpretation,
    heldout: Tensor,
    classes: Sequence[int] | None = None,
    regions_per_class: int = 3,
    coverage_target: float = 0.95,
    random_state: int = 0,
    features: tuple[Tensor, Tensor] | None = None,
    **kwargs: Any,
) -> tuple[list[RegionRow], dict[int, ClassAudit]]:
    """Audit each class of the held-out images and score every region on them.

    Parameters
    ----------
    ri : RepresentativeInterpretation
        Fitted on the reference images.
    heldout : Tensor
        Held-out images; seeds are taken from them and regions are scored on them.
    classes : sequence of int, optional
        Predicted classes to audit (default: every class predicted on ``heldout``);
        classes not predicted on ``heldout`` are skipped with a ``UserWarning``.
    regions_per_class : int
        At most this many regions per class.
    coverage_target : float
        Stop a class once this share of its held-out images is covered.
    random_state : int
        Seed of every random choice.
    features : (Tensor, Tensor), optional
        ``ri.transform(heldout)`` when already computed.
    **kwargs
        More options of :func:`captum_repinterp.auditing.audit` (``subgroup_by``, ...) and
        of :meth:`RepresentativeInterpretation.interpret` (``n_boundaries``, ...).

    Returns
    -------
    rows : list of RegionRow
        By class, then in the order the regions were found, labelled ``R1, R2, ...``.
        Held-out precision and coverage leave the seed out.
    audits : dict
        The :class:`~captum_repinterp.auditing.ClassAudit` of each audited class.
    """
    check_int(regions_per_class, "regions_per_class")
    feats, preds = ri.transform(heldout) if features is None else features
    present = set(preds.unique().tolist())
    if classes is not None:  # each class once, in the order given
        classes = list(dict.fromkeys(check_int(c, "classes", 0) for c in classes))
        skipped = sorted(set(classes) - present)
        if skipped:
            warnings.warn(
                f"classes: {skipped} not predicted on heldout (predicted: "
                f"{sorted(present)}); skipped",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )
    classes = sorted(present) if classes is None else [c for c in classes if c in present]
    rows: list[RegionRow] = []
    audits: dict[int, ClassAudit] = {}
    for c in classes:
        result = audit(
            ri,
            heldout,
            target=c,
            coverage_target=coverage_target,
            max_regions=regions_per_class,
            features=(feats, preds),
            random_state=random_state,
            **kwargs,
        )
        audits[c] = result[c]
        for region in result[c].regions:
            interp = region.interpretation
            assert interp is not None
            score = interp.evaluate_features(feats, preds, exclude=region.seed_index)
            rows.append(
                RegionRow(
                    c,
                    region.seed_index,
                    interp,
                    score["n_inside"],
                    score["precision"],
                    score["coverage"],
                    region.size,
                    region,
                    label=f"R{len(rows) + 1}",
                )
            )
    return rows, audits


def _unaudited_classes(
    ref_preds: Tensor,
    preds: Tensor,
    classes: Sequence[int] | None,
    name: Callable[[int], str],
) -> str:
    """The page's note on the classes left out because no held-out image is predicted as
    them (seeds come from the held-out images), with their numbers of references; ``""``
    when there are none. Without ``classes``, every class predicted on the references."""
    wanted = set(ref_preds.unique().tolist()) if classes is None else set(classes)
    missing = sorted(wanted - set(preds.unique().tolist()))
    if not missing:
        return ""
    counts = ", ".join(
        f"{name(c)} ({n} reference{'s' * (n != 1)})"
        for c in missing
        for n in [int((ref_preds == c).sum())]
    )
    return (
        f"heldout: the model puts no held-out image in class(es) {counts}, so they are not "
        "audited (seeds come from the held-out images); a shortcut shows only when held-out "
        "images carry it: add held-out images of these classes"
    )


#: A relabelling of the true labels must agree with the model's predictions on at least
#: this share more of the images than the labels as given to be reported as their order.
LABEL_ORDER_MARGIN = 0.25
#: ... on at least this many labelled images (on 50 random labels over 4 classes the best
#: renumbering can agree 25% more by chance; on 200, at most 16% more in 300 draws).
LABEL_ORDER_MIN_IMAGES = 100


def label_order_mismatch(
    labels: Tensor, predictions: Tensor, margin: float = LABEL_ORDER_MARGIN
) -> tuple[dict[int, int], float, float] | None:
    """Whether true labels look numbered in another order than the model's classes.

    The one-to-one relabelling that agrees most with the predictions (a linear
    assignment on the ``labels x predictions`` confusion counts,
    ``scipy.optimize.linear_sum_assignment``) is compared with the labels as given. An
    ``ImageFolder`` numbers its folders in sorted order, which need not be the model's:
    its accuracy then reads as low and every name is another class's.

    Parameters
    ----------
    labels, predictions : Tensor
        ``n`` integer true labels and predicted classes.
    margin : float
        Reported when the relabelling agrees on at least this share more of the images.

    Returns
    -------
    tuple or None
        ``(relabelling, accuracy as given, accuracy relabelled)``, the relabelling
        ``{label: class}`` for the labels it moves; None when the labels as given are
        within ``margin`` of the best relabelling.
    """
    from scipy.optimize import linear_sum_assignment

    labels, predictions = labels.long().cpu(), predictions.long().cpu()
    if labels.numel() == 0:
        return None
    # counts over the labels and classes that occur (a label such as 10**6 must not
    # size the matrix); every label can keep its own number or take any class
    seen, label_row = torch.unique(labels, return_inverse=True)
    classes = torch.unique(torch.cat([seen, predictions]))
    class_col = torch.searchsorted(classes, predictions)
    counts = torch.zeros(len(seen), len(classes), dtype=torch.long)
    counts.index_put_((label_row, class_col), torch.ones_like(labels), accumulate=True)
    rows, cols = linear_sum_assignment(counts.numpy(), maximize=True)
    given = float((labels == predictions).sum()) / labels.numel()
    best = float(counts[rows, cols].sum()) / labels.numel()
    if best - given < margin:
        return None
    moved = {
        int(seen[r]): int(classes[c]) for r, c in zip(rows, cols) if int(seen[r]) != int(classes[c])
    }
    return moved, given, best


def _label_order_warning(
    labels: Tensor, predictions: Tensor, class_names: Sequence[str] | None
) -> str:
    """The report's warning for :func:`label_order_mismatch` (empty when none, or when
    fewer than :data:`LABEL_ORDER_MIN_IMAGES` images are labelled)."""
    if labels.numel() < LABEL_ORDER_MIN_IMAGES:
        return ""
    found = label_order_mismatch(labels, predictions)
    if found is None:
        return ""
    moved, given, best = found
    shown = ", ".join(
        f"{_class_name(a, class_names)} -> class {b}" for a, b in list(moved.items())[:8]
    ) + (", ..." if len(moved) > 8 else "")
    return (
        f"labels: the true labels look numbered in another order than the model's classes: "
        f"read as {shown} (label -> class) they agree with the model's predictions on "
        f"{best:.0%} of the images, as given on {given:.0%}. An ImageFolder numbers its "
        "folders in sorted order; name them in the model's class order (0_cat, 1_dog, ...) "
        "or map the labels, and give the class names in that order (--class-names)"
    )


def _class_name(c: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= c < len(class_names):
        return f"{c} ({class_names[c]})"
    return str(c)


def _sizes(row: RegionRow) -> str:
    sizes = row.subgroup_sizes
    return "1" if len(sizes) <= 1 else f"{len(sizes)} ({', '.join(map(str, sizes))})"


def _num(value: float) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.3f}"


def _pct(value: float) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.1%}"


@dataclass
class _Odd:
    """Images inside a region that are not plainly of its class (for the gallery)."""

    source: str  # "ref" or "held-out"
    index: int
    pred: int
    true: int | None
    intruder: bool  # predicted another class (else: misclassified)


def _odd_images(
    row: RegionRow,
    ref_preds: Tensor,
    held_inside: Tensor,
    held_preds: Tensor,
    ref_labels: Tensor | None,
    held_labels: Tensor | None,
) -> list[_Odd]:
    """Intruders (predicted another class) then misclassified images inside the region."""
    c = row.target
    out = []
    members = row.interpretation.members.tolist()
    held = torch.nonzero(held_inside).flatten().tolist()
    for intruder in (True, False):
        for source, idx_list, preds, labels in (
            ("ref", members, ref_preds, ref_labels),
            ("held-out", held, held_preds, held_labels),
        ):
            for i in idx_list:
                pred = int(preds[i])
                true = None if labels is None else int(labels[i])
                if intruder and pred != c:
                    out.append(_Odd(source, i, pred, true, True))
                elif not intruder and pred == c and true is not None and true != c:
                    out.append(_Odd(source, i, pred, true, False))
    return out


def _segment_colours(n: int) -> list:
    """``n`` colours, all different: matplotlib's cycle (``C0``-``C9``) up to 10, then
    ``tab20`` up to 20, then evenly spaced ``turbo`` colours."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](v) for v in np.linspace(0.05, 0.95, n)]


def _summary_figure(
    rows: list[RegionRow],
    audits: dict[int, ClassAudit],
    odd: dict[str, list[_Odd]],
    class_names: Sequence[str] | None,
    has_labels: bool,
) -> Figure:
    """Left: how each class's held-out images split over its regions. Right: intruders."""
    n_classes = len(audits)
    fig = Figure(
        figsize=(10, max(2.4, 0.45 * max(n_classes, len(rows)) + 1.4)), layout="constrained"
    )
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    ylabels = []
    for y, (c, ca) in enumerate(audits.items()):
        n = max(int(ca.indices.numel()), 1)
        start = 0.0
        own = [r for r in rows if r.target == c]
        for r, colour in zip(own, _segment_colours(len(own))):
            share = r.newly_covered / n
            left.barh(y, share, left=start, color=colour, edgecolor="white")
            if share >= 0.06:
                left.text(
                    start + share / 2,
                    y,
                    r.label,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                    fontweight="bold",
                )
            start += share
        left.barh(y, 1 - start, left=start, color="#ddd", edgecolor="white")
        if 1 - start >= 0.08:
            left.text(
                start + (1 - start) / 2,
                y,
                "uncovered",
                ha="center",
                va="center",
                fontsize=7,
                color="#555",
            )
        count = int(ca.indices.numel())
        ylabels.append(
            _plain(f"class {_class_name(c, class_names)}\n({count} image{'s' * (count != 1)})")
        )
    left.set_yticks(range(n_classes), ylabels, fontsize=7)
    left.invert_yaxis()
    left.set_xlim(0, 1)
    left.xaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    left.tick_params(axis="x", labelsize=7)
    left.set_xlabel(
        "share of the class's held-out images (newly covered by each region)", fontsize=7
    )
    left.set_title("Which region covers which images", fontsize=8)

    y = np.arange(len(rows))
    n_intr = [sum(o.intruder for o in odd[r.label]) for r in rows]
    right.barh(
        y - 0.2 if has_labels else y,
        n_intr,
        0.4 if has_labels else 0.6,
        color="tab:red",
        label="intruders (predicted another class)",
    )
    if has_labels:
        n_mis = [sum(not o.intruder for o in odd[r.label]) for r in rows]
        right.barh(
            y + 0.2,
            n_mis,
            0.4,
            color="tab:orange",
            label="misclassified (true label another class)",
        )
    right.set_yticks(
        y,
        [_plain(f"{r.label} (class {_class_name(r.target, class_names)})") for r in rows],
        fontsize=7,
    )
    right.invert_yaxis()
    right.tick_params(axis="x", labelsize=7)
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_xlabel("images inside the region (references and held-out)", fontsize=7)
    right.set_title("What does not belong inside", fontsize=8)
    right.legend(fontsize=6, loc="lower right")
    fig.suptitle("Regions by class: coverage and intruders", fontsize=9)
    return fig


#: The names of the report's figures (``index.html`` links nothing else).
_FIGURE_NAME = re.compile(r"(summary|class\d+_audit|region_\d+_(class\d+|intruders))\.png")


def _remove_earlier_figures(out: Path) -> None:
    """Delete the figures that a report written to ``out`` before links: a run with
    fewer classes or regions would leave them behind, unlinked, beside the new page.
    Only files that ``out/index.html`` links and that carry the report's own figure
    names are removed; nothing else in the folder is touched."""
    index = out / "index.html"
    if not index.is_file():
        return
    try:
        page = index.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    for src in set(re.findall(r'<img src="([^"/\\]+)"', page)):
        if _FIGURE_NAME.fullmatch(src) and (out / src).is_file():
            (out / src).unlink()


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("captum_repinterp", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=False,
    )
    env.filters["num"] = _num
    env.filters["pct"] = _pct
    return env


def _report_modules(out_dir: Any, model: Any, layer: Any, *args: Any, **kwargs: Any) -> tuple:
    """``build_report``'s model, layer and head (run in eval mode for the whole report:
    one training-mode warning, where fit, the audits and the figures gave one each)."""
    return model, layer, kwargs.get("head", args[2] if len(args) > 2 else None)


@in_eval_mode(_report_modules)
def build_report(
    out_dir: str | os.PathLike,
    model: nn.Module,
    layer: nn.Module,
    references: Tensor,
    heldout: Tensor,
    head: Callable | None = None,
    classes: Sequence[int] | None = None,
    regions_per_class: int = 2,
    class_names: Sequence[str] | None = None,
    members_shown: int = 6,
    title: str = "Representative interpretations: audit report",
    random_state: int = 0,
    progress: bool = False,
    reference_labels: Tensor | None = None,
    heldout_labels: Tensor | None = None,
    **interpret_kwargs: Any,
) -> Path:
    """Fit, audit the classes and write ``out_dir/index.html`` with its PNG figures.

    Parameters
    ----------
    out_dir : str or path
        Folder to write to (created if needed).
    model, layer : nn.Module
        The model and the layer to split at.
    references, heldout : Tensor
        Reference images (fit) and held-out images (seeds and scoring), batch first.
    head : callable, optional
        ``head(layer_output) -> logits`` (see :class:`RepresentativeInterpretation`).
    classes : sequence of int, optional
        Predicted classes to audit (default: all predicted on ``heldout``).
    regions_per_class : int
        At most this many regions per class.
    class_names : sequence of str, optional
        Names shown next to class indices.
    members_shown : int
        Members per region in the figure and the table.
    title : str
        Page title.
    random_state : int
        Random seed of the interpretations.
    progress : bool
        Show progress bars.
    reference_labels, heldout_labels : Tensor, optional
        True classes of the images: then the page gives the model's accuracy, the figures
        and tables the true labels, and each region its misclassified images.
    **interpret_kwargs
        More options of :meth:`RepresentativeInterpretation.interpret`.

    Returns
    -------
    pathlib.Path
        The path of ``index.html``.
    """
    if not isinstance(references, Tensor) or not isinstance(heldout, Tensor):
        raise TypeError("references and heldout must be tensors of images (batch first)")
    check_int(members_shown, "members_shown")
    ref_labels = checked_labels(reference_labels, references, "reference_labels")
    held_labels = checked_labels(heldout_labels, heldout, "heldout_labels")
    has_labels = ref_labels is not None or held_labels is not None
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ri = RepresentativeInterpretation(model, layer, head=head)
    ri.fit(references, batch_size=256, progress=progress)
    feats, preds = ri.transform(heldout)
    rows, audits = audit_regions(
        ri,
        heldout,
        classes,
        regions_per_class,
        random_state=random_state,
        features=(feats, preds),
        **interpret_kwargs,
    )
    if not rows:
        raise ValueError("classes: none of the requested classes is predicted on heldout")
    ref_preds = ri.predictions_
    label_warning = ""
    if has_labels:
        given = [(ref_labels, ref_preds), (held_labels, preds)]
        labels = torch.cat([a.cpu() for a, _ in given if a is not None])
        predicted = torch.cat([b.cpu() for a, b in given if a is not None])
        label_warning = _label_order_warning(labels, predicted, class_names)
        if label_warning:
            warnings.warn(label_warning, UserWarning, stacklevel=caller_stacklevel())

    def name(c: int) -> str:
        return _class_name(c, class_names)

    unfitted = [c for c in audits if not bool((ref_preds == c).any())]
    reference_warning = ""
    if unfitted:
        reference_warning = (
            f"references: the model puts no reference image in class(es) "
            f"{', '.join(name(c) for c in unfitted)}, so their regions were fitted without "
            "one image of the class (coverage n/a); add references of these classes"
        )
        warnings.warn(reference_warning, UserWarning, stacklevel=caller_stacklevel())
    heldout_warning = _unaudited_classes(ref_preds, preds, classes, name)
    if heldout_warning and classes is None:  # audit_regions warned of the classes given
        warnings.warn(heldout_warning, UserWarning, stacklevel=caller_stacklevel())

    # only now that the fit and the audit went through: a run that fails before leaves
    # the earlier report in ``out`` whole
    _remove_earlier_figures(out)
    odd: dict[str, list[_Odd]] = {}
    views = []
    for k, r in enumerate(rows):
        it = r.interpretation
        seed_img = heldout[r.seed_index : r.seed_index + 1]
        fig = plot_region(
            it,
            seed_img,
            references,
            k=members_shown,
            class_names=class_names,
            seed_label=None if held_labels is None else int(held_labels[r.seed_index]),
            reference_labels=ref_labels,
            title=f"{r.label}, region of class {name(r.target)}",
        )
        r.figure = f"region_{k + 1:02d}_class{r.target}.png"
        fig.savefig(out / r.figure, dpi=90)
        inside = it.contains_features(feats)
        seed_inside = inside.clone()
        inside[r.seed_index] = False
        odd[r.label] = _odd_images(r, ref_preds, inside, preds, ref_labels, held_labels)
        if (
            held_labels is not None
            and int(held_labels[r.seed_index]) != r.target
            and bool(seed_inside[r.seed_index])
        ):
            odd[r.label].append(
                _Odd("held-out", r.seed_index, r.target, int(held_labels[r.seed_index]), False)
            )
        shown = odd[r.label][: 2 * members_shown]
        intruder_figure = ""
        if shown:
            imgs = torch.stack(
                [(references if o.source == "ref" else heldout)[o.index] for o in shown]
            )
            maps = it.heatmap(imgs)
            maps = maps[0] if isinstance(maps, tuple) else maps
            titles = []
            for o in shown:
                text = f"{o.source} #{o.index}\npred {name(o.pred)}"
                titles.append(text + ("" if o.true is None else f"\ntrue {name(o.true)}"))
            intruder_figure = f"region_{k + 1:02d}_intruders.png"
            plot_images(
                imgs,
                titles,
                maps=maps,
                bad=[True] * len(shown),
                title=f"{r.label} (class {name(r.target)}): images inside that the model "
                "puts in another class, or whose true label is another",
                caption="Under the region's heat map: the region's one direction applied to "
                "each image's activations (not each image's own explanation; a coarse layer "
                "draws similar blobs), one colour scale. ref #i: reference image i; held-out "
                "#i: held-out image i.",
            ).savefig(out / intruder_figure, dpi=80)
        member_rows = []
        for rank in range(min(members_shown, len(it))):
            ref = int(it.members[rank])
            pred = int(ref_preds[ref])
            true = None if ref_labels is None else int(ref_labels[ref])
            member_rows.append(
                {
                    "rank": rank + 1,
                    "index": ref,
                    "pred": name(pred),
                    "true": "?" if true is None else name(true),
                    "distance": float(it.member_distances[rank]),
                    "bad": pred != r.target or (true is not None and true != r.target),
                }
            )
        views.append(
            {
                "label": r.label,
                "anchor": f"region-{r.label}",
                "class_name": name(r.target),
                "seed_index": r.seed_index,
                "interpretation": it,
                # of no member / no reference of the class: undefined, shown as n/a
                "purity": it.purity if len(it) else math.nan,
                "coverage": it.coverage if bool((ref_preds == r.target).any()) else math.nan,
                "heldout_inside": r.heldout_inside,
                "heldout_precision": r.heldout_precision,
                "heldout_coverage": r.heldout_coverage,
                "newly_covered": r.newly_covered,
                "sizes_text": _sizes(r),
                "figure": r.figure,
                "intruder_figure": intruder_figure,
                "n_intruders": sum(o.intruder for o in odd[r.label]),
                "n_mislabelled": sum(not o.intruder for o in odd[r.label]),
                "intruders_shown": len(shown),
                "member_rows": member_rows,
            }
        )
    class_views = []
    for c, class_audit in audits.items():
        if not class_audit.regions:
            continue
        mine = [v for v, r in zip(views, rows) if r.target == c]
        png = f"class{c}_audit.png"
        plot_audit(
            class_audit,
            heldout,
            n_exemplars=members_shown,
            class_names=class_names,
            region_labels=[v["label"] for v in mine],
            labels=held_labels,
        ).savefig(out / png, dpi=80)
        precision = None
        if held_labels is not None:
            precision = float((held_labels[class_audit.indices] == c).float().mean())
        class_views.append(
            {
                "target": c,
                "name": name(c),
                "figure": png,
                "rows": mine,
                "n_images": int(class_audit.indices.numel()),
                "class_precision": precision,
                "uncovered_share": class_audit.uncovered_share,
            }
        )
    summary = "summary.png"
    _summary_figure(rows, audits, odd, class_names, has_labels).savefig(out / summary, dpi=90)
    accuracy = []
    if ref_labels is not None:
        accuracy.append(("on the references", float((ref_preds == ref_labels).float().mean())))
    if held_labels is not None:
        accuracy.append(("on the held-out images", float((preds == held_labels).float().mean())))
    page = (
        _environment()
        .get_template("report.html.j2")
        .render(
            title=title,
            n_references=ri.n_references_,
            n_heldout=int(heldout.shape[0]),
            dim=ri.layout_.dim,
            layer_name=module_name(ri.forward_func, ri.layer) or None,
            accuracy=accuracy,
            label_warning=label_warning,
            reference_warning=reference_warning,
            heldout_warning=heldout_warning,
            audited=[name(c) for c in audits],
            elapsed=time.perf_counter() - start,
            glossary=GLOSSARY,
            summary_png=summary,
            rows=views,
            classes=class_views,
            has_labels=has_labels,
        )
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def run_report(
    out_dir: str | os.PathLike,
    model_factory: str | None = None,
    data: str | None = None,
    classes: Sequence[int] | None = None,
    regions_per_class: int = 2,
    random_state: int = 0,
    inputs: ReportInputs | None = None,
    layer: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """What ``captum-repinterp report`` runs: user model and data, or the bundled demo.

    See :func:`prepare_report` for ``model_factory``, ``data``, ``classes``, ``layer``
    and ``class_names``; pass ``inputs`` instead when they were prepared already.
    """
    if inputs is None:
        inputs = prepare_report(
            model_factory, data, classes, random_state, layer=layer, class_names=class_names
        )
    index = build_report(
        out_dir,
        inputs.model,
        inputs.layer,
        inputs.references,
        inputs.heldout,
        head=inputs.head,
        classes=inputs.classes,
        regions_per_class=regions_per_class,
        class_names=inputs.class_names,
        title=inputs.title,
        random_state=random_state,
        reference_labels=inputs.reference_labels,
        heldout_labels=inputs.heldout_labels,
    )
    print(f"report written to {index.resolve()}")
    return index
