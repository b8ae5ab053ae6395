"""A static HTML audit report: the regions that cover each class of a model.

``captum-repinterp report --out DIR`` writes ``DIR/index.html`` and one PNG per figure
next to it (no server, no JavaScript library, nothing downloaded). For every audited
class the report runs :func:`captum_repinterp.audit.audit` on the held-out images
predicted as that class: the most central held-out image not yet inside a region is the
next seed, its region is scored as a rule on the held-out images, the images it contains
are marked covered, and this repeats (at most ``regions_per_class`` times). Each region
gets its figure (seed and nearest members under the shared heat map), its numbers
(boundaries, members, purity and coverage on the references, precision and coverage on
held-out images, sub-groups) and a table of its nearest members; each class gets the
audit figure (one row per sub-group: mean heat map and exemplars).

The model and data come from the user (``--model-factory pkg.mod:fn`` returning
``model``, ``(model, layer)`` or ``(model, layer, head)``; ``--data pkg.mod:fn``
returning ``(reference_images, heldout_images)``) or, by default, the bundled demo: the
small CNN on MNIST-5k.
"""

from __future__ import annotations

import html
import importlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from ._checks import check_int
from .attribution import RepresentativeInterpretation
from .audit import AuditRegion, ClassAudit, audit
from .interpretation import Interpretation
from .visualization import plot_audit, plot_region

__all__ = ["RegionRow", "audit_regions", "build_report", "load_callable", "resolve_model"]


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

    @property
    def subgroup_sizes(self) -> list[int]:
        """Sizes of the region's sub-groups (one entry when it was not split)."""
        if self.region is None:
            return []
        return [g.size for g in self.region.subgroups] or [self.region.size]


def load_callable(spec: str, name: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the function.

    The current directory is put on ``sys.path`` first, so a module next to the user's
    working directory is found.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"{name} must look like 'package.module:function', got {spec!r}")
    module_name, attr = spec.split(":")
    if not module_name or not attr:
        raise ValueError(f"{name} must look like 'package.module:function', got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{name}: cannot import module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{name}: {module_name!r} has no callable {attr!r}")
    return fn


def resolve_model(obj: Any) -> tuple[nn.Module, nn.Module, Callable | None]:
    """``(model, layer, head)`` from what a model factory returned.

    Accepts ``model`` (then ``layer = model.features[-1]``), ``(model, layer)`` or
    ``(model, layer, head)``.
    """
    head = None
    if isinstance(obj, (tuple, list)):
        if len(obj) not in (2, 3):
            raise ValueError(
                "model factory must return model, (model, layer) or (model, layer, head); "
                f"got a sequence of length {len(obj)}"
            )
        model, layer = obj[0], obj[1]
        head = obj[2] if len(obj) == 3 else None
    else:
        model = obj
        features = getattr(model, "features", None)
        if not isinstance(features, nn.Sequential) or len(features) == 0:
            raise ValueError(
                "model factory: the model has no non-empty nn.Sequential .features; "
                "return (model, layer) to name the layer to interpret"
            )
        layer = features[-1]
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory must return an nn.Module, got {type(model).__name__}")
    if not isinstance(layer, nn.Module):
        raise TypeError(f"model factory: layer must be an nn.Module, got {type(layer).__name__}")
    return model, layer, head


def audit_regions(
    ri: RepresentativeInterpretation,
    heldout: Tensor,
    classes: Sequence[int] | None = None,
    regions_per_class: int = 3,
    coverage_target: float = 0.95,
    seed: int = 0,
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
        classes not predicted on ``heldout`` are skipped.
    regions_per_class : int
        At most this many regions per class.
    coverage_target : float
        Stop a class once this share of its held-out images is covered.
    seed : int
        Seed of every random choice.
    **kwargs
        More options of :func:`captum_repinterp.audit.audit` (``subgroup_by``, ...) and
        of :meth:`RepresentativeInterpretation.interpret` (``n_boundaries``, ...).

    Returns
    -------
    rows : list of RegionRow
        By class, then in the order the regions were found. Held-out precision and
        coverage leave the seed out.
    audits : dict
        The :class:`~captum_repinterp.audit.ClassAudit` of each audited class.
    """
    check_int(regions_per_class, "regions_per_class")
    feats, preds = ri.transform(heldout)
    present = set(preds.unique().tolist())
    classes = sorted(present) if classes is None else [int(c) for c in classes if c in present]
    rows: list[RegionRow] = []
    audits: dict[int, ClassAudit] = {}
    for c in classes:
        result = audit(
            ri, heldout, target=c, coverage_target=coverage_target,
            max_regions=regions_per_class, seed=seed, features=(feats, preds), **kwargs,
        )
        audits[c] = result[c]
        for region in result[c].regions:
            interp = region.interpretation
            assert interp is not None
            score = interp.evaluate_features(feats, preds, exclude=region.seed_index)
            rows.append(
                RegionRow(
                    c, region.seed_index, interp, score["n_inside"], score["precision"],
                    score["coverage"], region.size, region,
                )
            )
    return rows, audits


def _fmt(value: float) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.3f}"


_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1150px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: right; font-size: 13px; }
th { background: #eee; }
img { max-width: 100%; border: 1px solid #ddd; }
.status { color: #555; font-size: 12px; }
section { margin-bottom: 2em; }
"""

_JS = """
function checkImages() {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var all = ok.length === imgs.length;
  document.body.setAttribute('data-images-loaded', all ? 'all' : 'missing');
  var s = document.getElementById('image-status');
  s.textContent = 'images loaded: ' + ok.length + '/' + imgs.length +
      (all ? ' IMAGES-OK' : ' IMAGES-MISSING');
}
window.addEventListener('load', checkImages);
"""


def _sizes(row: RegionRow) -> str:
    sizes = row.subgroup_sizes
    return "1" if len(sizes) <= 1 else f"{len(sizes)} ({', '.join(map(str, sizes))})"


def _class_name(c: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= c < len(class_names):
        return f"{c} ({class_names[c]})"
    return str(c)


def _render_html(
    title: str,
    rows: list[RegionRow],
    ri: RepresentativeInterpretation,
    n_heldout: int,
    class_names: Sequence[str] | None,
    summary_png: str,
    n_members: int,
    elapsed: float,
    class_figures: dict[int, str],
) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>{ri.n_references_} reference images, {n_heldout} held-out images, layer "
        f"features D = {ri.layout_.dim}. Regions are peeled off each predicted class of "
        "the held-out images: the most central held-out image (nearest the median of the "
        "layer features) outside every earlier region of its class is the next seed. "
        "Purity and coverage are measured on the references, precision and coverage of "
        "the region used as a rule on the held-out images (the seed excluded). A region's "
        "new members are split into sub-groups when their heat maps cluster clearly "
        f"(mean silhouette >= 0.25). Built in {elapsed:.1f} s.</p>",
        '<p id="image-status" class="status">images loading...</p>',
        "<h2>Summary</h2>",
        f'<img src="{e(summary_png)}" alt="summary of the regions">',
        "<table><thead><tr><th>region</th><th>class</th><th>seed (held-out index)</th>"
        "<th>boundaries</th><th>members</th><th>purity</th><th>coverage</th>"
        "<th>held-out inside</th><th>held-out precision</th><th>held-out coverage</th>"
        "<th>newly covered</th><th>sub-groups</th><th>delta</th><th>reached</th>"
        "</tr></thead><tbody>",
    ]
    for k, r in enumerate(rows):
        it = r.interpretation
        out.append(
            f'<tr><td><a href="#region-{k}">{k}</a></td>'
            f"<td>{e(_class_name(r.target, class_names))}</td><td>{r.seed_index}</td>"
            f"<td>{it.n_boundaries}</td><td>{len(it)}</td><td>{_fmt(it.purity)}</td>"
            f"<td>{_fmt(it.coverage)}</td><td>{r.heldout_inside}</td>"
            f"<td>{_fmt(r.heldout_precision)}</td><td>{_fmt(r.heldout_coverage)}</td>"
            f"<td>{r.newly_covered}</td><td>{_sizes(r)}</td><td>{it.delta}</td>"
            f"<td>{it.reached}</td></tr>"
        )
    out.append("</tbody></table>")
    for c, png in class_figures.items():
        name = e(_class_name(c, class_names))
        out.append(f'<section id="class-{c}"><h2>Class {name}: regions and sub-groups</h2>')
        out.append(f'<img src="{e(png)}" alt="class {name}: mean heat maps and exemplars">')
        out.append("</section>")
    preds = ri.predictions_
    for k, r in enumerate(rows):
        it = r.interpretation
        out.append(f'<section id="region-{k}">')
        out.append(
            f"<h2>Region {k}: class {e(_class_name(r.target, class_names))}, "
            f"seed {r.seed_index}</h2>"
        )
        out.append(f'<img src="{e(r.figure)}" alt="region {k}: seed and nearest members">')
        out.append(
            f"<p>{len(it)} members, purity {_fmt(it.purity)}, coverage {_fmt(it.coverage)}, "
            f"{it.n_boundaries} of {it.n_sampled} sampled boundaries; on held-out images "
            f"{r.heldout_inside} inside, precision {_fmt(r.heldout_precision)}; "
            f"{r.newly_covered} newly covered, sub-groups {_sizes(r)}.</p>"
        )
        out.append(
            "<table><thead><tr><th>rank</th><th>reference index</th>"
            "<th>predicted class</th><th>semantic distance</th></tr></thead><tbody>"
        )
        for rank in range(min(n_members, len(it))):
            ref = int(it.members[rank])
            out.append(
                f"<tr><td>{rank + 1}</td><td>{ref}</td>"
                f"<td>{e(_class_name(int(preds[ref]), class_names))}</td>"
                f"<td>{float(it.member_distances[rank]):.4g}</td></tr>"
            )
        out.append("</tbody></table></section>")
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out)


def _summary_figure(rows: list[RegionRow], class_names: Sequence[str] | None) -> Figure:
    fig = Figure(figsize=(max(4.0, 0.6 * len(rows) + 2), 2.8))
    ax = fig.subplots()
    x = torch.arange(len(rows)).numpy()
    purity = [r.interpretation.purity for r in rows]
    prec = [0.0 if math.isnan(r.heldout_precision) else r.heldout_precision for r in rows]
    cov = [r.interpretation.coverage for r in rows]
    ax.bar(x - 0.27, purity, 0.27, label="purity (refs)")
    ax.bar(x, cov, 0.27, label="coverage (refs)")
    ax.bar(x + 0.27, prec, 0.27, label="precision (held-out)")
    ax.set_xticks(x)
    ax.set_xticklabels([f"R{k}\nc={r.target}" for k, r in enumerate(rows)], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("regions by class", fontsize=9)
    fig.tight_layout()
    return fig


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
    seed: int = 0,
    progress: bool = False,
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
    seed : int
        Random seed of the interpretations.
    progress : bool
        Show progress bars.
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
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ri = RepresentativeInterpretation(model, layer, head=head)
    ri.fit(references, batch_size=256, progress=progress)
    rows, audits = audit_regions(
        ri, heldout, classes, regions_per_class, seed=seed, **interpret_kwargs
    )
    if not rows:
        raise ValueError("classes: none of the requested classes is predicted on heldout")
    class_figures = {}
    for c, class_audit in audits.items():
        if class_audit.regions:
            png = f"class{c}_audit.png"
            plot_audit(class_audit, heldout, n_exemplars=members_shown,
                       class_names=class_names).savefig(out / png, dpi=80)
            class_figures[c] = png
    for k, r in enumerate(rows):
        seed_img = heldout[r.seed_index : r.seed_index + 1]
        fig = plot_region(
            r.interpretation, seed_img, references, k=members_shown, class_names=class_names
        )
        r.figure = f"region_{k:02d}_class{r.target}.png"
        fig.savefig(out / r.figure, dpi=90)
    summary = "summary.png"
    _summary_figure(rows, class_names).savefig(out / summary, dpi=90)
    page = _render_html(
        title, rows, ri, int(heldout.shape[0]), class_names, summary, members_shown,
        time.perf_counter() - start, class_figures,
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def demo_setup(seed: int = 0) -> tuple[nn.Module, nn.Module, Callable, Tensor, Tensor]:
    """The bundled demo: the small CNN on MNIST-5k (80% references, 20% held-out)."""
    from . import datasets, models

    x, y = datasets.load_mnist5k()
    train, test = datasets.split_indices(len(y), 0.2, seed=seed, stratify=y)
    cnn = models.train_small_cnn(x[train], y[train], seed=seed)
    return cnn, cnn.features[-1], cnn.head, x[train], x[test]


def run_report(
    out_dir: str | os.PathLike,
    model_factory: str | None = None,
    data: str | None = None,
    classes: Sequence[int] | None = None,
    regions_per_class: int = 2,
    seed: int = 0,
) -> Path:
    """What ``captum-repinterp report`` runs: user model and data, or the bundled demo.

    ``model_factory`` and ``data`` are ``"package.module:function"`` strings; give both
    or neither. Without them the demo (small CNN, MNIST-5k) audits ``classes`` (default
    ``0, 1, 2`` to keep it fast).
    """
    if (model_factory is None) != (data is None):
        raise ValueError("give both --model-factory and --data, or neither (the demo)")
    if model_factory is None:
        model, layer, head, refs, held = demo_setup(seed)
        if classes is None:
            classes = (0, 1, 2)
        title = "Audit report: small CNN on MNIST-5k"
    else:
        model, layer, head = resolve_model(load_callable(model_factory, "model_factory")())
        got = load_callable(data, "data")()  # type: ignore[arg-type]
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise ValueError("data must return (reference_images, heldout_images)")
        refs, held = got
        title = f"Audit report: {model_factory}"
    index = build_report(
        out_dir, model, layer, refs, held, head=head, classes=classes,
        regions_per_class=regions_per_class, title=title, seed=seed,
    )
    print(f"report written to {index.resolve()}")
    return index
