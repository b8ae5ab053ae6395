"""The real setups of the evaluation and the JSON / markdown report.

================  =====================================  ==================================
setup             model, layer                           references / unseen
================  =====================================  ==================================
``mnist``         ``SmallCNN`` trained on MNIST-5k's      the 80% train split / the 20% test
                  train split (seed 0), ``features[-1]``  split (stratified, seed 0)
``faces``         pretrained MTCNN ONet (facenet-        70% of ``lfw_subset`` / the other
                  pytorch weights), ``features[-1]``      30% (stratified, seed 0)
``digits``        ``SmallCNN`` on scikit-learn digits     80% / 20%
================  =====================================  ==================================

The check setups (:data:`CHECK_SETUPS`: ``mnist-s4``, ``digits-s4``, ``pooled-mnist-s2``,
``pooled-digits-s2``, ``resnet18-shapes``) run the reuse protocol and the sanity check of
the top block only, for the rule that chooses the default heat map: the ``SmallCNN``
trained with seed 4, and a ``SmallCNN`` with a global-average-pooling head trained with
seed 2, each on MNIST-5k and on digits (80% / 20%, stratified, split with the same seed);
and torchvision's ResNet-18 (``weights=None``) trained with seed 5 on 3,000 synthetic
coloured shapes at 64 px (:func:`~captum_repinterp.datasets.make_shapes`, data seed 1),
split at ``layer3``, with the first 1,500 training images as references and 600 images
it was not trained on as unseen images (masked pixels = 0, black).

Each setup belongs to a model family (:data:`FAMILIES`); the rule weighs every family
the same.

Masked pixels are set to 0 **in the model's input space**: black for the digit setups
(inputs in [0, 1]) and mid grey (raw value 127.5) for the MTCNN-scaled faces, whose
inputs are ``(x * 255 - 127.5) / 128``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..heatmap import INPUT
from ..options import AUTO
from .protocol import EvalConfig, Setup, Timer, evaluate_setup
from .selection import candidate_name

__all__ = [
    "ALL_SETUPS",
    "CHECK_SETUPS",
    "FAMILIES",
    "SETUPS",
    "load_setup",
    "markdown_report",
    "run_evaluation",
]

#: The bundled setups: the published tables and the figures.
SETUPS = ("mnist", "faces", "digits")
#: Models trained only for the rule that chooses the default heat map (``docs/choices.md``,
#: fourth and fifth versions): the bundled ``SmallCNN`` with seed 4, and the same CNN with
#: a global-average-pooling head (``SmallCNN(head="pooled")``) with seed 2, each on
#: MNIST-5k and on digits (their seed is in their name); torchvision's ResNet-18 on
#: synthetic coloured shapes (``resnet18-shapes``, seed 5).
CHECK_SETUPS = (
    "mnist-s4",
    "digits-s4",
    "pooled-mnist-s2",
    "pooled-digits-s2",
    "resnet18-shapes",
)
ALL_SETUPS = SETUPS + CHECK_SETUPS
#: The model family of each setup (the fifth version of the rule weighs every family the
#: same, whatever its number of setups).
FAMILIES = {
    "mnist": "SmallCNN",
    "digits": "SmallCNN",
    "mnist-s4": "SmallCNN",
    "digits-s4": "SmallCNN",
    "pooled-mnist-s2": "SmallCNN, pooled head",
    "pooled-digits-s2": "SmallCNN, pooled head",
    "faces": "MTCNN ONet",
    "resnet18-shapes": "ResNet-18",
}


def _digit_data(data: str, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """Images, labels, train and test indices (80% / 20%, stratified, ``seed``) and a
    label of MNIST-5k (``"mnist"``) or scikit-learn's digits at 28 x 28 (``"digits"``)."""
    from .. import datasets

    x, y = datasets.load_mnist5k() if data == "mnist" else datasets.load_digits(28)
    train, test = datasets.split_indices(len(y), 0.2, seed=seed, stratify=y)
    label = "MNIST-5k" if data == "mnist" else "scikit-learn digits (28x28)"
    return x, y, train, test, label


def _resnet_setup(name: str) -> Setup:
    from .. import datasets, models

    x, y = datasets.make_shapes(3600, 64, seed=1)
    model = models.train_resnet18(x[:3000], y[:3000], seed=5).eval()
    return Setup(
        name,
        model,
        model.layer3,
        x[:1500],
        x[3000:],
        cascade=[("fc", model.fc)],
        class_names=list(datasets.SHAPE_CLASSES),
        family=FAMILIES[name],
        notes="check setup: torchvision ResNet-18 (weights=None) trained with seed 5 on "
        "3,000 synthetic coloured shapes at 64 px (make_shapes, data seed 1), split at "
        "layer3 (256 x 4 x 4); references = the first 1,500 training images, unseen = "
        "600 images not trained on; masked pixels = 0 (black)",
    )


def _check_setup(name: str) -> Setup:
    from .. import models

    if name == "resnet18-shapes":
        return _resnet_setup(name)
    pooled = name.startswith("pooled-")
    data, seed = name.removeprefix("pooled-").split("-s")
    x, y, train, test, label = _digit_data(data, int(seed))
    kwargs = {"head": "pooled", "channels": (16, 32, 64)} if pooled else {}
    model = models.train_small_cnn(x[train], y[train], seed=int(seed), **kwargs).eval()
    kind = (
        "SmallCNN with a global-average-pooling head (16, 32, 64 channels)"
        if pooled
        else "SmallCNN"
    )
    return Setup(
        name,
        model,
        model.features[-1],
        x[train],
        x[test],
        head=model.head,
        cascade=[("head", model.head)],
        family=FAMILIES[name],
        notes=f"check setup: {kind} trained with seed {seed} on {label}; references = "
        f"train split ({len(train)}), unseen = test split ({len(test)}); masked pixels = 0",
    )


def load_setup(name: str, seed: int = 0) -> Setup:
    """Build one of :data:`ALL_SETUPS` (data and models come from installed packages).

    ``seed`` is the split and training seed of the bundled setups; a check setup's seed
    is in its name (``mnist-s4``: seed 4).
    """
    from .. import datasets, models

    if name in CHECK_SETUPS:
        return _check_setup(name)
    if name in ("mnist", "digits"):
        x, y, train, test, label = _digit_data(name, seed)
        model = models.train_small_cnn(x[train], y[train], seed=seed).eval()
        f = model.features
        cascade = [
            ("head", model.head),
            ("features[2]", f[2]),
            ("features[1]", f[1]),
            ("features[0]", f[0]),
        ]
        other = [
            (f"features[{i}]", f[i], nn.Sequential(*f[i + 1 :], model.head).eval())
            for i in reversed(range(len(f) - 1))
        ]
        return Setup(
            name,
            model,
            f[-1],
            x[train],
            x[test],
            head=model.head,
            cascade=cascade,
            other_layers=other,
            heatmap_layers=[(n, m) for n, m, _ in other],
            family=FAMILIES[name],
            notes=f"SmallCNN on {label}; references = train split "
            f"({len(train)}), unseen = test split ({len(test)}); "
            "masked pixels = 0 (black)",
        )
    if name == "faces":
        x, y = datasets.load_faces(48)
        train, test = datasets.split_indices(len(y), 0.3, seed=seed, stratify=y)
        model = models.load_onet().eval()
        f = model.features
        cascade = [("head", model.head)] + [
            (f"features[{i}]", f[i]) for i in reversed(range(len(f)))
        ]
        other = [
            (f"features[{i}]", f[i], nn.Sequential(*f[i + 1 :], model.head).eval())
            for i in (len(f) - 2, len(f) - 3)
        ]
        return Setup(
            name,
            model,
            f[-1],
            x[train],
            x[test],
            head=model.head,
            cascade=cascade,
            class_names=["non-face", "face"],
            other_layers=other,
            heatmap_layers=[(n, m) for n, m, _ in other],
            family=FAMILIES[name],
            notes=f"pretrained MTCNN ONet (facenet-pytorch) on lfw_subset; references "
            f"= train split ({len(train)}), unseen = test split ({len(test)}); "
            "masked pixels = 0 in input space (mid grey)",
        )
    raise ValueError(f"name must be one of {ALL_SETUPS}, got {name!r}")


def default_config(name: str, quick: bool = False) -> EvalConfig:
    """The configuration used for each setup by the benchmark (recorded in the results)."""
    cfg = EvalConfig(
        seeds_per_class=10, n_explain_per_class=5, n_sanity=8, n_fidelity=4, n_perturb=4
    )
    default = (cfg.ri_kwargs["heatmap_rule"], cfg.ri_kwargs["heatmap_layer"])
    # the candidates of the rule in docs/choices.md: every rule at the split layer, and
    # the elementwise rules at the two resolutions every model has (the input, "auto")
    candidates = [
        (rule, None)
        for rule in (
            "elementwise",
            "channel",
            "elementwise-positive",
            "elementwise-members",
            "region-score",
            "region-members",
        )
    ] + [
        (rule, where)
        for rule in ("elementwise", "elementwise-positive", "elementwise-members")
        for where in (INPUT, AUTO)
    ]
    cfg.ri_variants = {
        f"ri[{candidate_name(rule, where)}]": {"heatmap_rule": rule, "heatmap_layer": where}
        for rule, where in candidates
        if (rule, where) != default
    }
    cfg.heatmap_layer_rules = ("region-score", "region-members")

    if name == "faces":
        cfg.seeds_per_class = 15
        cfg.n_explain_per_class = 10
    if name in CHECK_SETUPS:  # the reuse protocol and the sanity check of the top block
        cfg.seeds_per_class = 5
        cfg.no_reuse = cfg.fidelity = cfg.layer_sweep = False
        cfg.heatmap_layer_rules = ()
    if quick:
        cfg.seeds_per_class, cfg.k, cfg.n_explain_per_class = 1, 4, 1
        cfg.n_sanity, cfg.n_fidelity, cfg.n_perturb = 2, 2, 2
        cfg.layer_sweep = False
    return cfg


def run_evaluation(
    setups: list[str],
    out: str | Path,
    seed: int = 0,
    quick: bool = False,
    ri_variants: dict[str, dict[str, Any]] | None = None,
    fractions: Sequence[float] = (0.2, 0.5),
) -> dict[str, Any]:
    """Evaluate each named setup; write ``results.json`` and ``evaluation.md`` to ``out``.

    Parameters
    ----------
    setups : list of str
        Names from :data:`ALL_SETUPS` (the bundled setups and the check setups).
    out : str or Path
        Folder for the results (created if needed); its paths are printed at the end.
    seed : int
        Random seed of the setups' splits and training and of the protocol.
    quick : bool
        A small run (one seed per class, no layer sweep): a smoke test. Its intervals
        are reported as ``n/a`` (too few seeds), so it declares no winner.
    ri_variants : dict, optional
        RI variants to run instead of :func:`default_config`'s.
    fractions : sequence of float
        Keep shares of the masking metrics (default: 20%, the paper's, and 50%).

    Returns
    -------
    dict
        ``{"setups": {name: results}, "total_seconds": ...}``, as written to
        ``results.json``; the masking metrics are under ``["keep"][keep_key(f)]``
        (:func:`~captum_repinterp.evaluation.protocol.keep_key`).
    """
    for s in setups:
        if s not in ALL_SETUPS:
            raise ValueError(f"setups: {s!r} is not one of {ALL_SETUPS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with Timer() as total:
        for name in setups:
            cfg = default_config(name, quick)
            cfg.seed = seed
            cfg.fractions = tuple(fractions)
            if ri_variants is not None:
                cfg.ri_variants = dict(ri_variants)
            with Timer(label=f"[{name}] done"):
                with Timer() as load:
                    setup = load_setup(name, seed)
                res = evaluate_setup(setup, cfg)
            res["timings_s"]["load"] = round(load.seconds, 2)
            results[name] = res
    report = {"setups": results, "total_seconds": round(total.seconds, 1)}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "evaluation.md").write_text(markdown_report(report))
    print(f"results written to {out / 'results.json'} and {out / 'evaluation.md'}")
    return report


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(row: dict[str, Any], key: str) -> str:
    lo, hi = row.get(f"{key}_ci", (None, None))
    if lo is None or hi is None:
        return f"{_f(row[key])} [n/a]"
    return f"{_f(row[key])} [{_f(lo)}, {_f(hi)}]"


def _metric_table(metrics: dict[str, Any]) -> list[str]:
    lines = [
        "| method | images | mAD [95% CI] | mAI [95% CI] | seeds | images |",
        "|---|---|---|---|---|---|",
    ]
    for m, row in metrics.items():
        kind = "RI's" if m.startswith("ri") and not m.endswith("@nn") else "NN"
        lines.append(
            f"| {m} | {kind} | {_ci(row, 'mAD')} | {_ci(row, 'mAI')} | "
            f"{row['n_seeds']} | {row['n_images']} |"
        )
    return lines


TOO_FEW = "n/a (too few seeds)"


def _mark(row: dict[str, Any], metric: str) -> str:
    if not row.get("estimable", True):
        return TOO_FEW
    win = row[f"win_{metric}"]
    return "=" if win is None else ("**better**" if win else "worse")


def _short(row: dict[str, Any], metric: str) -> str:
    mark = _mark(row, metric)
    if mark == TOO_FEW:
        return "n/a"
    value = row[f"d{metric}"]
    text = "n/a" if value is None else f"{value:+.3f}"
    if mark == "**better**":
        return f"**{text}**"
    return f"{text} (worse)" if mark == "worse" else text


def _comparison_table(rows: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in rows if not r["ri"].endswith("@nn") or r["ri"] == "ri @nn"]
    if not rows:
        return []
    names = list(dict.fromkeys(r["ri"] for r in rows))
    bases = list(dict.fromkeys(r["baseline"] for r in rows))
    by = {(r["ri"], r["baseline"]): r for r in rows}
    lines = [
        "",
        "Paired per-seed differences, RI config minus baseline, dAD / dAI: **bold** when "
        "the 95% interval shows RI better, (worse) when it shows it worse, "
        f"plain when it contains 0 ({TOO_FEW}: the classes hold too few seeds). The "
        "intervals are in `evaluation_results.json`.",
        "",
        "| RI config | " + " | ".join(f"vs {b}" for b in bases) + " |",
        "|---" * (len(bases) + 1) + "|",
    ]
    for n in names:
        cells = []
        for b in bases:
            r = by.get((n, b))
            cells.append("" if r is None else f"{_short(r, 'AD')} / {_short(r, 'AI')}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def _selection_section(report: dict[str, Any]) -> list[str]:
    from .selection import choose_default

    sel = choose_default(report)
    if not sel["ranking"]:
        return []
    families = [res.get("family") or name for name, res in report["setups"].items()]
    lines = [
        "## Choosing the default heat-map rule",
        "",
        "The rule written in `docs/choices.md` (fifth version) before the run: each "
        "candidate (a `heatmap_rule` at the split layer; an elementwise rule drawn at the "
        'input, `<rule>@input`, or where `heatmap_layer="auto"` chose on the '
        'references, `<rule>@auto`; or a pair for `"auto"`, `<layer rule>/<input '
        "rule>@auto`, whose cells on each setup are those of its layer rule or of its "
        'input rule, as `"auto"` chose there) against the best baseline of each cell '
        "(setup, metric, keep share; the bundled setups and the check setups), paired per "
        "seed; win / loss when the 95% interval excludes 0. Eligible: no extra forward "
        "pass per channel of the layer (the cost bound) and, on every setup, a mean "
        "Spearman correlation of at most 0.5 between its maps and its maps after the top "
        "block is re-initialised (the sanity bound; `sanity` is the largest over the "
        "setups). Ranked by the score (wins minus losses, each cell weighted by one over "
        "its model family's number of setups: "
        + "; ".join(f"{f}: {families.count(f)} setups" for f in dict.fromkeys(families))
        + "), then the weighted wins, then cost (passes per seed, K = channels of the "
        f"layer; then the split layer before the input). First: **{sel['default']}**. In "
        "the tables `ri` is the row of the run's `heatmap_rule` and `heatmap_layer` (the "
        "package's defaults, below each setup's title) and `ri[<candidate>]` the other "
        "candidates, on the same seeds and images. Where `ri` is not the first-ranked "
        "candidate, the package's default differs from the rule's answer, and "
        "`docs/choices.md` says why.",
        "",
        "| config | heatmap_rule | score | wins | losses | ties | sanity | cost | eligible |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sel["ranking"]:
        why = [] if r["within_cost"] else ["cost"]
        why += [] if r["within_sanity"] else ["sanity"]
        eligible = "yes" if r["eligible"] else "no (" + ", ".join(why) + ")"
        lines.append(  # the table of candidates
            f"| {r['config']} | {r['rule']} | {r['score']:.2f} | {r['wins']} | "
            f"{r['losses']} | {r['ties']} | {_f(r['sanity'])} | {r['forward_passes']} | "
            f"{eligible} |"
        )
    lines += ["", 'Where `heatmap_layer="auto"` drew (chosen on each setup\'s references):', ""]
    for name, res in report["setups"].items():
        c = res.get("heatmap_resolution")
        if c:
            where = "the input" if c["heatmap_layer"] == INPUT else "the split layer"
            scores = ", ".join(f"{k} {v:.3f}" for k, v in c["scores"].items())
            lines.append(f"- {name}: {where} (mean insertion score {scores}; {c['reason']})")
    shown = [sel["ranking"][0]]
    shown += [r for r in sel["ranking"] if r["config"] == "ri" and r is not shown[0]]
    over = [r for r in sel["ranking"] if not r["eligible"]]
    if over and shown[0]["eligible"]:
        shown.append(over[0])  # the best candidate out of the bounds, for comparison
    for row in shown:
        bound = "" if row["eligible"] else ", out of the bounds"
        if row["config"] == "ri" and row is not shown[0]:
            bound = " (the package's default)"
        lines += [
            "",
            f"Cells of {row['config']}{bound} (value, best baseline's value, difference "
            "[95% interval]):",
            "",
            "| setup | keep | metric | best baseline | value | baseline | difference | outcome |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in sel["cells"]:
            if c["candidate"] != row["config"]:
                continue
            lo, hi = c["ci"]
            ci = "n/a" if lo is None or hi is None else f"[{_f(lo)}, {_f(hi)}]"
            lines.append(
                f"| {c['setup']} | {_keep_title(c['keep'])} | {c['metric']} | "
                f"{c['opponent']} | {_f(c['value'])} | {_f(c['opponent_value'])} | "
                f"{_f(c['diff'])} {ci} | {c['outcome']} |"
            )
    return [*lines, ""]


def _keep_title(key: str) -> str:
    return f"keep {float(key):.0%}"


def markdown_report(report: dict[str, Any]) -> str:
    """The results as markdown tables: one section per setup, masking tables per keep share."""
    lines = [
        "# Evaluation results",
        "",
        "Written by `benchmarks/evaluate.py` (`captum-repinterp evaluate`); do not edit "
        "by hand. Protocol: [Method and evaluation protocol](method.md), code: "
        "`captum_repinterp/evaluation/`.",
        "",
    ]
    if report.get("intervals_recomputed"):
        lines += [
            "The intervals and the win / loss / tie calls were recomputed from the run's "
            "per-seed values (stratified t intervals; the run itself printed percentile "
            f"bootstrap intervals): {report['intervals_recomputed']}. Nothing else was "
            "run again.",
            "",
        ]
    lines += _selection_section(report)
    for name, res in report["setups"].items():
        cfg = res["config"]
        ri = cfg["ri_kwargs"]
        shares = " and ".join(f"{f:.0%}" for f in cfg["fractions"])
        lines += [
            f"## {name}",
            "",
            res["notes"] + ".",
            "",
            f"Seeds: {cfg['seeds_per_class']} per predicted class (random, seed "
            f"{cfg['seed']}) from the references; k = {cfg['k']} unseen images per seed; "
            f"top {shares} of the pixels kept (one table each), the rest set to "
            f"{cfg['baseline']}; RI: n_boundaries = {ri['n_boundaries']}, delta = "
            f"{ri['delta']}, refine = {ri['refine']}, heatmap_rule = "
            f"{ri['heatmap_rule']}, heatmap_layer = {ri.get('heatmap_layer')}, "
            f"combine = {ri['combine']}.",
            "",
        ]
        for key, part in res["reuse"]["keep"].items():
            lines += [
                f"### Reuse protocol, {_keep_title(key)} (mAD lower is better, mAI "
                "higher is better)",
                "",
                "RI's images: unseen images inside the region, ranked by semantic "
                "distance (the protocol). NN images: the k nearest unseen images in "
                "feature space with the seed's prediction (the baselines' images; `@nn` "
                "rows reuse the RI map on them, so maps are compared on the same "
                "images). `ri[map@L]`, `ri[<rule>@L]`: the RI map drawn at the earlier "
                "layer L (`heatmap_layer=`, elementwise or the named rule; the region "
                "stays at the split layer, the baselines stay there too). Brackets: 95% "
                "stratified t interval over seeds, by class "
                "(n/a: too few seeds per class).",
                "",
            ]
            lines += _metric_table(part["metrics"])
            lines += _comparison_table(part["comparisons"])
            if "no_reuse" in res:
                lines += [
                    "",
                    f"### Without reuse, {_keep_title(key)} (each method explains the image "
                    "itself)",
                    "",
                    "| method | mAD | mAI | images |",
                    "|---|---|---|---|",
                ]
                for m, row in res["no_reuse"]["keep"][key]["metrics"].items():
                    lines.append(
                        f"| {m} | {_ci(row, 'mAD')} | {_ci(row, 'mAI')} | {row['n_seeds']} |"
                    )
            for sweep in res.get("layers", []):
                lines += [
                    "",
                    f"### Reuse protocol at {sweep['layer']}, {_keep_title(key)} "
                    f"(layer output {' x '.join(map(str, sweep['shape']))}; every "
                    f"method at this layer; {sweep['seconds']} s for both keep shares)",
                    "",
                ]
                lines += _metric_table(sweep["keep"][key]["metrics"])
                lines += _comparison_table(sweep["keep"][key]["comparisons"])
            lines.append("")
        lines += [
            "### RI regions as rules on unseen images",
            "",
            "| config | precision | coverage | inside (mean) | seeds with images inside "
            "| boundaries | purity (refs) | coverage (refs) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m, r in res["reuse"]["rule_summary"].items():
            lines.append(
                f"| {m} | {_f(r['precision'])} | {_f(r['coverage'])} | "
                f"{_f(r['n_inside'], 1)} | {r['seeds_with_images_inside']}/"
                f"{r['n_seeds']} | {_f(r['boundaries'], 1)} | {_f(r['ref_purity'])} | "
                f"{_f(r['ref_coverage'])} |"
            )
        if "sanity" in res:
            stages = res["sanity"]["stages"]
            names = [k for k in stages[0] if k not in ("randomised", "note")]
            configs = [n for n in names if n.startswith("ri[")]
            names = [n for n in names if not n.startswith("ri[")]
            lines += [
                "",
                "### Sanity check: Spearman correlation with the original maps "
                f"({len(res['sanity']['images'])} images; lower = the map depends more "
                "on the weights)",
                "",
                "| randomised (cascading) | " + " | ".join(names) + " | note |",
                "|---" * (len(names) + 2) + "|",
            ]
            for st in stages:
                lines.append(
                    f"| {st['randomised']} | "
                    + " | ".join(_f(st[n]) for n in names)
                    + f" | {st.get('note', '')} |"
                )
            if configs:
                lines += [
                    "",
                    "The other RI configs on the same images, the first stage (the head "
                    f"randomised: {stages[0]['randomised']}):",
                    "",
                    "| config | Spearman correlation |",
                    "|---|---|",
                    *(f"| {n} | {_f(stages[0][n])} |" for n in configs),
                ]
        if "fidelity" in res:
            fid = res["fidelity"]
            lines += [
                "",
                f"### Infidelity and max-sensitivity (n = {fid['n_images']} images, "
                f"{fid['n_perturb']} perturbations each; Gaussian noise std "
                f"{fid['perturb_std']} for infidelity with `normalize=True`, uniform "
                f"radius {fid['sensitivity_radius']} for sensitivity; lower is better)",
                "",
                "| method | infidelity | sensitivity_max |",
                "|---|---|---|",
            ]
            for m, r in fid["metrics"].items():
                lines.append(f"| {m} | {_f(r['infidelity'], 4)} | {_f(r['sensitivity_max'])} |")
        t = res["timings_s"]
        lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in t.items()), ""]
    lines += [f"Total run time: {report['total_seconds']} s.", ""]
    return "\n".join(lines)
