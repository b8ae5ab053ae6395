"""The evaluation protocol (``docs/method.md``) on one setup (model, layer, data).

:func:`evaluate_setup` runs, with every random choice seeded:

1. the reuse protocol (mAD, mAI) for RI and the channel-weight baselines, at each keep
   share (the top 20% of pixels kept, as in the paper, and 50%);
2. the same masking metrics without reuse (each method explains the image itself), with
   Integrated Gradients added;
3. precision and coverage of the RI regions on held-out images;
4. the cascading parameter-randomisation sanity check (Adebayo et al. 2018);
5. Captum's ``infidelity`` and ``sensitivity_max`` on a small sample.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import torch
from captum.metrics import infidelity, sensitivity_max
from torch import Tensor, nn

from ..attribution import RepresentativeInterpretation
from ..heatmap import HEATMAP_RULES, HeatmapRule
from ..interpretation import Interpretation
from ..options import AUTO, DEFAULT_HEATMAP_LAYER, DEFAULT_HEATMAP_RULE, resolve_heatmap_layer
from .methods import (
    ChannelWeightMethod,
    acts_and_grads,
    channel_weight_methods,
    integrated_gradients_maps,
)
from .metrics import average_drop_increase, rank_correlation, stratified_t_ci, upsample

__all__ = [
    "MIN_SEEDS_FOR_INTERVAL",
    "EvalConfig",
    "Setup",
    "Timer",
    "evaluate_setup",
    "interval_estimable",
    "keep_key",
    "randomise",
    "recompute_intervals",
]


#: Paired seeds needed (in classes with at least two of them) before an interval is
#: reported; with fewer, the within-class variance rests on (almost) nothing.
MIN_SEEDS_FOR_INTERVAL = 5


def keep_key(fraction: float) -> str:
    """The key of a keep share in the results (``0.2 -> "0.2"``; JSON keys are strings)."""
    return f"{fraction:g}"


class Timer:
    """Wall-clock time of a block: ``with Timer(timings, "fit", "[mnist] fit") as t: ...``.

    At exit ``t.seconds`` holds the elapsed time; it is also stored as ``timings[key]``
    when ``timings`` is given, and ``"<label>: <seconds> s"`` is printed when ``label`` is
    given and the block did not raise.
    """

    def __init__(
        self, timings: dict[str, float] | None = None, key: str = "", label: str = ""
    ) -> None:
        if timings is not None and not key:
            raise ValueError("key must be given with timings")
        self.timings, self.key, self.label = timings, key, label
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.seconds = time.perf_counter() - self._start
        if self.timings is not None:
            self.timings[self.key] = self.seconds
        if self.label and exc_type is None:
            print(f"{self.label}: {self.seconds:.1f} s", flush=True)


@dataclass
class Setup:
    """A model split at ``layer`` with reference (fit) and unseen (held-out) images.

    ``cascade`` lists the blocks to randomise in order, head first, as
    ``(name, module)`` pairs. ``other_layers`` lists further splits ``(name, layer, head)``
    on which the reuse protocol is run again (every method at the same layer);
    ``heatmap_layers`` lists earlier layers ``(name, module)`` at which the RI map is also
    drawn (``interpret(..., heatmap_layer=module)``, the row ``ri[map@name]``) with the
    region still at ``layer``. ``family`` names the model family (the selection rule
    weighs every family the same; empty: the setup is its own family).
    """

    name: str
    model: nn.Module
    layer: nn.Module
    references: Tensor
    unseen: Tensor
    head: Any = None
    cascade: Sequence[tuple[str, nn.Module]] = ()
    class_names: Sequence[str] | None = None
    notes: str = ""
    other_layers: Sequence[tuple[str, nn.Module, Any]] = ()
    heatmap_layers: Sequence[tuple[str, nn.Module]] = ()
    family: str = ""


@dataclass
class EvalConfig:
    """Parameters of the evaluation (recorded with the results).

    ``fractions`` are the keep shares: each map keeps that share of its pixels (the rest
    set to ``baseline``, the value masked pixels get in the model's input space); every
    masking metric is reported per keep share, on the same maps. ``ri_variants`` maps a
    variant name to RI ``interpret`` keyword arguments that differ from ``ri_kwargs``
    (whose ``heatmap_rule`` is the package's default); variants that only change
    ``heatmap_rule``/``combine`` reuse the regions. Confidence intervals are stratified t
    intervals over seeds (:func:`~captum_repinterp.evaluation.metrics.stratified_t_ci`,
    strata the seeds' classes), reported only with at least ``MIN_SEEDS_FOR_INTERVAL``
    seeds in classes that have two or more;
    ``layer_sweep`` reruns the reuse protocol on the setup's ``other_layers`` for the RI
    configs in ``layer_sweep_variants`` and every baseline; ``no_reuse``, ``sanity`` and
    ``fidelity`` switch those parts off. ``heatmap_layer_rules`` names
    rules (besides the elementwise ``ri[map@L]``) also drawn at each of the setup's
    ``heatmap_layers``, as the rows ``ri[<rule>@L]``.
    """

    seeds_per_class: int = 3
    k: int = 10
    fractions: tuple[float, ...] = (0.2, 0.5)
    baseline: float = 0.0
    n_explain_per_class: int = 3
    n_sanity: int = 6
    n_fidelity: int = 5
    n_perturb: int = 5
    perturb_std: float = 0.1
    sensitivity_radius: float = 0.02
    ig_steps: int = 32
    seed: int = 0
    ri_kwargs: dict[str, Any] = field(
        default_factory=lambda: {
            "n_boundaries": 50,
            "delta": None,
            "refine": "tighten",
            "heatmap_rule": DEFAULT_HEATMAP_RULE,
            "heatmap_layer": DEFAULT_HEATMAP_LAYER,
            "combine": "sum",
        }
    )
    ri_variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    include_package: bool = True
    no_reuse: bool = True
    sanity: bool = True
    fidelity: bool = True
    layer_sweep: bool = True
    layer_sweep_variants: tuple[str, ...] = ("ri", "ri[region-score]")
    heatmap_layer_rules: tuple[str, ...] = ()


def _mean(values: Sequence[float] | Tensor) -> float:
    arr = np.asarray(values, dtype=float).ravel()
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _pick_seeds(preds: Tensor, per_class: int, gen: torch.Generator) -> list[int]:
    """``per_class`` random indices per predicted class (sorted within the class)."""
    out = []
    for c in preds.unique().tolist():
        idx = torch.nonzero(preds == c).flatten()
        take = idx[torch.randperm(idx.numel(), generator=gen)[:per_class]]
        out += sorted(take.tolist())
    return out


def _computes_weights(kw: dict[str, Any]) -> bool:
    """Whether the config's heat-map rule computes per-region weights while interpreting."""
    rule = HEATMAP_RULES[kw.get("heatmap_rule", "elementwise")]
    return rule.region_weights is not HeatmapRule.region_weights


def _ri_variant(region: Interpretation, kw: dict[str, Any]) -> Interpretation:
    layer = kw.get("heatmap_layer")
    if _computes_weights(kw):
        return dataclasses.replace(
            region,
            combine=kw["combine"],
            reader=region.reader if layer is not None else None,
            heatmap_layer=layer,
        )
    return dataclasses.replace(
        region,
        heatmap_rule=kw["heatmap_rule"],
        combine=kw["combine"],
        reader=region.reader if layer is not None else None,
        channel_weights=None,
        heatmap_layer=layer,
    )


def _resolve_auto(ri: RepresentativeInterpretation, kw: dict[str, Any]) -> dict[str, Any]:
    """``heatmap_layer="auto"`` replaced by what it resolves to for this explainer (as
    ``interpret`` does), so that regions shared between configs draw where they should."""
    if kw.get("heatmap_layer") != AUTO:
        return kw
    rule = kw.get("heatmap_rule", DEFAULT_HEATMAP_RULE)
    layer = resolve_heatmap_layer(rule, AUTO, ri.heatmap_resolution_.heatmap_layer)
    return {**kw, "heatmap_layer": layer}


def _ri_maps_on(region: Interpretation, images: Tensor, acts: Tensor) -> Tensor:
    """The region's reused layer maps on images whose split-layer activations are given."""
    if region.heatmap_layer is not None:
        out = region.heatmap(images)
        return out[0] if isinstance(out, tuple) else out
    return region.heatmap_from_activations((acts,))[0]


def _region_key(kw: dict[str, Any]) -> tuple:
    # rules with per-region weights compute them while interpreting: their own regions
    shared = ("combine",) if _computes_weights(kw) else ("heatmap_rule", "combine", "heatmap_layer")
    return tuple(sorted((k, repr(v)) for k, v in kw.items() if k not in shared))


class _Runner:
    def __init__(self, setup: Setup, cfg: EvalConfig) -> None:
        self.s, self.cfg = setup, cfg
        self.model = setup.model.eval()
        self.size = tuple(setup.references.shape[-2:])
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.ri_configs = {"ri": dict(cfg.ri_kwargs)}
        for name, kw in cfg.ri_variants.items():
            self.ri_configs[name] = {**cfg.ri_kwargs, **kw}
        for name, module in setup.heatmap_layers:
            self.ri_configs[f"ri[map@{name}]"] = {
                **cfg.ri_kwargs,
                "heatmap_rule": "elementwise",
                "heatmap_layer": module,
            }
            for rule in cfg.heatmap_layer_rules:
                self.ri_configs[f"ri[{rule}@{name}]"] = {
                    **cfg.ri_kwargs,
                    "heatmap_rule": rule,
                    "heatmap_layer": module,
                }
        self.timings: dict[str, float] = {}
        # the random seed of every RI interpret / attribute call, by keyword
        self.ri_random_state = {"random_state": cfg.seed}

    def fit(self, model: nn.Module, layer: nn.Module, head: Any) -> RepresentativeInterpretation:
        ri = RepresentativeInterpretation(model, layer, head=head)
        return ri.fit(self.s.references, batch_size=512, progress=False)

    def regions(
        self,
        ri: RepresentativeInterpretation,
        seeds: Tensor,
        targets: Tensor | None = None,
        configs: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, list[Interpretation]]:
        """Interpretations of the seeds for every RI config (shared regions reused)."""
        cache: dict[tuple, list[Interpretation]] = {}
        out = {}
        for name, kw in (configs if configs is not None else self.ri_configs).items():
            kw = _resolve_auto(ri, kw)
            key = _region_key(kw)
            if key not in cache:
                res = ri.interpret(
                    seeds,
                    target=None if targets is None else targets.tolist(),
                    **self.ri_random_state,
                    **kw,
                )
                cache[key] = res if isinstance(res, list) else [res]
            out[name] = [_ri_variant(r, kw) for r in cache[key]]
        return out

    # -------------------------------------------------------------- 1 + 3: reuse
    def reuse(
        self,
        ri: RepresentativeInterpretation,
        methods: list[ChannelWeightMethod],
        configs: dict[str, dict[str, Any]] | None = None,
    ) -> dict:
        """The reuse protocol; every RI config is also measured on the baselines' images.

        RI's images are the unseen images inside the seed's region ranked by semantic
        distance (the protocol); the baselines' are the ``k`` nearest unseen images in
        feature space with the seed's prediction. The rows ``"<ri config> @nn"`` reuse the
        RI map on the baselines' images, so that maps are also compared on the same images.
        """
        cfg, s = self.cfg, self.s
        configs = configs if configs is not None else self.ri_configs
        feats_u, preds_u = ri.transform(s.unseen, batch_size=512)
        acts_u = ri.layout_.unflatten(feats_u)[0]
        seed_idx = _pick_seeds(
            ri.predictions_, cfg.seeds_per_class, torch.Generator().manual_seed(cfg.seed)
        )
        seeds = s.references[seed_idx]
        targets = ri.predictions_[seed_idx]
        feats_r = ri.features_[seed_idx]
        nearest = []  # the baselines' images of each seed
        for j in range(len(seed_idx)):
            cand = torch.nonzero(preds_u == targets[j]).flatten()
            d = (feats_u[cand] - feats_r[j]).norm(dim=1)
            nearest.append(cand[torch.argsort(d, stable=True)[: cfg.k]])
        with Timer() as interpret_time:
            regions = self.regions(ri, seeds, configs=configs)
        images, maps, tgts, owner = [], [], [], []  # owner = (method, seed number)

        def add(name: str, j: int, pick: Tensor, layer_maps: Tensor) -> None:
            if pick.numel():
                images.append(s.unseen[pick])
                maps.append(layer_maps)
                tgts.append(torch.full((pick.numel(),), int(targets[j])))
                owner.extend([(name, j)] * pick.numel())

        rules = []
        for name, regs in regions.items():
            for j, reg in enumerate(regs):
                inside = torch.nonzero(reg.contains_features(feats_u)).flatten()
                order = torch.argsort(reg.distance_features(feats_u[inside]), stable=True)
                pick = inside[order[: cfg.k]]
                if name == "ri" or _region_key(configs[name]) != _region_key(configs["ri"]):
                    rules.append(
                        {
                            "method": name,
                            "seed": seed_idx[j],
                            "target": int(targets[j]),
                            "boundaries": reg.n_boundaries,
                            "members": len(reg),
                            "purity": reg.purity,
                            "ref_coverage": reg.coverage,
                            **reg.evaluate_features(feats_u, preds_u),
                        }
                    )
                for label, idx in ((name, pick), (f"{name} @nn", nearest[j])):
                    if idx.numel():
                        lm = _ri_maps_on(reg, s.unseen[idx], acts_u[idx])
                        add(label, j, idx, upsample(lm.float(), self.size))
        for m in methods:
            w = m.weights(seeds, targets)
            for j in range(len(seed_idx)):
                pick = nearest[j]
                if pick.numel():
                    add(
                        m.name,
                        j,
                        pick,
                        m.reuse(
                            w[j : j + 1].expand(pick.numel(), *w.shape[1:]), acts_u[pick], self.size
                        ),
                    )
        strata = targets.tolist()
        keep = _masking_tables(
            self.model,
            torch.cat(images),
            torch.cat(maps),
            torch.cat(tgts),
            owner,
            len(seed_idx),
            strata,
            cfg,
            [m.name for m in methods],
        )
        return {
            "seeds": seed_idx,
            "seed_targets": strata,
            "keep": keep,
            "interpret_seconds": round(interpret_time.seconds, 2),
            "rules": rules,
            "rule_summary": _rule_summary(rules),
        }

    def layer_sweep(self) -> list[dict]:
        """The reuse protocol again at each of the setup's ``other_layers``."""
        configs = {
            n: self.ri_configs[n] for n in self.cfg.layer_sweep_variants if n in self.ri_configs
        }
        out = []
        for name, layer, head in self.s.other_layers:
            with Timer() as layer_time:
                ri = self.fit(self.model, layer, head)
                methods = channel_weight_methods(self.model, layer, self.cfg.include_package)
                res = self.reuse(ri, methods, configs)
            out.append(
                {
                    "layer": name,
                    "shape": list(ri.layout_.shapes[0]),
                    "keep": res["keep"],
                    "seed_targets": res["seed_targets"],
                    "seconds": round(layer_time.seconds, 2),
                }
            )
        return out

    # -------------------------------------------------------------- 2: no reuse
    def explain_all(
        self,
        ri: RepresentativeInterpretation | None,
        methods: list[ChannelWeightMethod],
        images: Tensor,
        targets: Tensor,
        ri_names: Sequence[str] = ("ri",),
        with_ig: bool = True,
        model: nn.Module | None = None,
    ) -> dict[str, Tensor]:
        maps = {}
        if ri is not None:
            configs = {name: self.ri_configs[name] for name in ri_names}
            regions = self.regions(ri, images, targets, configs=configs)
            acts, _ = acts_and_grads(ri.forward_func, ri.layer, images, targets)
            for name in ri_names:
                lm = torch.cat(
                    [
                        _ri_maps_on(r, images[i : i + 1], acts[i : i + 1])
                        for i, r in enumerate(regions[name])
                    ]
                )
                maps[name] = upsample(lm.float(), self.size)
        for m in methods:
            maps[m.name] = m.explain(images, targets)
        if with_ig:
            ig_model = model if model is not None else self.model
            maps["ig"] = integrated_gradients_maps(ig_model, images, targets, self.cfg.ig_steps)
        return maps

    def no_reuse(
        self, ri: RepresentativeInterpretation, methods: list[ChannelWeightMethod]
    ) -> dict:
        cfg = self.cfg
        _, preds_u = ri.transform(self.s.unseen, batch_size=512)
        idx = _pick_seeds(preds_u, cfg.n_explain_per_class, self.gen)
        images, targets = self.s.unseen[idx], preds_u[idx]
        with Timer(self.timings, "explain_no_reuse"):
            maps = self.explain_all(ri, methods, images, targets, tuple(self.ri_configs))
        n, names = len(idx), list(maps)
        keep = _masking_tables(
            self.model,
            images.repeat(len(names), 1, 1, 1),
            torch.cat([maps[k] for k in names]),
            targets.repeat(len(names)),
            [(k, i) for k in names for i in range(n)],
            n,
            targets.tolist(),
            cfg,
        )
        return {"images": idx, "image_targets": targets.tolist(), "keep": keep}

    # -------------------------------------------------------------- 4: sanity check
    def sanity(self) -> dict:
        cfg, s = self.cfg, self.s
        ri0 = self.fit(self.model, s.layer, s.head)
        feats_u, preds_u = ri0.transform(s.unseen, batch_size=512)
        idx = _pick_seeds(
            preds_u, max(1, cfg.n_sanity // max(1, preds_u.unique().numel())), self.gen
        )[: cfg.n_sanity]
        images, targets = s.unseen[idx], preds_u[idx]
        # every RI config that the randomised copy can draw (not those at a named layer of
        # the original model), so that each candidate rule's sanity is measured
        ri_names = tuple(
            name
            for name, kw in self.ri_configs.items()
            if not isinstance(kw.get("heatmap_layer"), nn.Module)
        )
        base = self.explain_all(
            ri0,
            channel_weight_methods(self.model, s.layer, cfg.include_package),
            images,
            targets,
            ri_names,
        )
        stages = []
        names = [name for name, _ in s.cascade]
        for depth in range(1, len(s.cascade) + 1):
            model, layer, head = randomise(self.model, s, names[:depth], seed=cfg.seed + depth)
            row: dict[str, Any] = {"randomised": "+".join(names[:depth])}
            note = ""
            try:
                ri = self.fit(model, layer, head)
            except ValueError as exc:  # one predicted class left: RI is undefined
                ri, note = None, str(exc).split(";")[0]
            methods = channel_weight_methods(model, layer, cfg.include_package)
            maps = {}
            if ri is not None:
                try:
                    maps.update(self.explain_all(ri, [], images, targets, ri_names, False))
                except (ValueError, RuntimeError) as exc:
                    note = str(exc)[:120]
            maps.update(self.explain_all(None, methods, images, targets, (), True, model=model))
            for name in base:
                if name in maps:
                    rho = rank_correlation(base[name], maps[name])
                    row[name] = _mean(rho)
                else:
                    row[name] = float("nan")
            if note:
                row["note"] = note
            stages.append(row)
        return {"images": idx, "stages": stages}

    # -------------------------------------------------------------- 5: fidelity
    def fidelity(
        self, ri: RepresentativeInterpretation, methods: list[ChannelWeightMethod]
    ) -> dict:
        cfg, s = self.cfg, self.s
        _, preds_u = ri.transform(s.unseen, batch_size=512)
        idx = _pick_seeds(preds_u, max(1, cfg.n_fidelity // preds_u.unique().numel()), self.gen)[
            : cfg.n_fidelity
        ]
        images, targets = s.unseen[idx], preds_u[idx]
        explainers = {"ri": lambda x, t: self._ri_maps(ri, x, t)}
        for m in methods:
            explainers[m.name] = m.explain
        explainers["ig"] = lambda x, t: integrated_gradients_maps(self.model, x, t, cfg.ig_steps)
        return {
            "images": idx,
            "n_images": len(idx),
            "n_perturb": cfg.n_perturb,
            "perturb_std": cfg.perturb_std,
            "sensitivity_radius": cfg.sensitivity_radius,
            "metrics": _fidelity_metrics(self.model, explainers, images, targets, cfg),
        }

    def _ri_maps(self, ri: RepresentativeInterpretation, x: Tensor, t: Tensor) -> Tensor:
        kw = self.ri_configs["ri"]
        maps = ri.attribute(x, target=t.tolist(), **self.ri_random_state, **kw)
        return upsample(maps.detach().float(), self.size)


def _masking_tables(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    owner: list[tuple[str, int]],
    n_seeds: int,
    strata: Sequence[int],
    cfg: EvalConfig,
    baselines: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """mAD/mAI tables (and, with ``baselines``, paired comparisons) per keep share."""
    keep = {}
    for fraction in cfg.fractions:
        ad, ai = average_drop_increase(model, images, maps, targets, fraction, cfg.baseline)
        table = _aggregate(owner, ad, ai, n_seeds, strata)
        keep[keep_key(fraction)] = {"metrics": table}
        if baselines is not None:
            ri_names = [n for n in table if n.startswith("ri")]
            keep[keep_key(fraction)]["comparisons"] = _compare(table, ri_names, baselines, strata)
    return keep


def _fidelity_metrics(
    model: nn.Module,
    explainers: dict[str, Any],
    images: Tensor,
    targets: Tensor,
    cfg: EvalConfig,
) -> dict[str, dict[str, float]]:
    """Captum's ``infidelity`` and ``sensitivity_max`` of each explainer ``fn(x, target)``."""
    channels = images.shape[1]
    out: dict[str, dict[str, float]] = {}

    def perturb(x: Tensor) -> tuple[Tensor, Tensor]:
        noise = torch.randn(x.shape, generator=pgen) * cfg.perturb_std
        return noise, x - noise

    def sens_perturb(x: Tensor, radius: float) -> Tensor:
        return x + (torch.rand(x.shape, generator=pgen) * 2 - 1) * radius

    for name, fn in explainers.items():
        pgen = torch.Generator().manual_seed(cfg.seed)
        attr = fn(images, targets).expand(-1, channels, -1, -1).contiguous()
        infid = infidelity(
            model,
            perturb,
            images,
            attr,
            target=targets,
            n_perturb_samples=cfg.n_perturb,
            normalize=True,
        )

        def expl(x: Tensor | tuple, target: Tensor, _fn: Any = fn) -> Tensor | tuple:
            # Captum passes the unperturbed inputs as a tuple and expects a tuple back
            was_tuple = isinstance(x, tuple)
            with torch.enable_grad():
                res = _fn(x[0] if was_tuple else x, target)
            res = res.expand(-1, channels, -1, -1).contiguous()
            return (res,) if was_tuple else res

        sens = sensitivity_max(
            expl,
            images,
            perturb_func=sens_perturb,
            perturb_radius=cfg.sensitivity_radius,
            n_perturb_samples=cfg.n_perturb,
            target=targets,
        )
        out[name] = {"infidelity": _mean(infid.detach()), "sensitivity_max": _mean(sens.detach())}
    return out


def interval_estimable(values: Sequence[float], strata: Sequence[int]) -> bool:
    """Whether a class-stratified interval of ``values`` means anything.

    Only classes with two or more values (NaN dropped) give a within-class variance: with
    one seed per class there is none. Estimable when at least
    :data:`MIN_SEEDS_FOR_INTERVAL` values lie in such classes.
    """
    x = np.asarray(values, dtype=float).ravel()
    s = np.asarray(strata).ravel()[~np.isnan(x)]
    _, counts = np.unique(s, return_counts=True)
    return int(counts[counts >= 2].sum()) >= MIN_SEEDS_FOR_INTERVAL


def _interval(values: Sequence[float], strata: Sequence[int]) -> tuple[float, float, float]:
    """``stratified_t_ci`` with NaN bounds when the interval is not estimable."""
    mean, lo, hi = stratified_t_ci(values, strata)
    if not interval_estimable(values, strata):
        lo = hi = float("nan")
    return mean, lo, hi


def _aggregate(
    owner: list[tuple[str, int]],
    ad: Tensor,
    ai: Tensor,
    n_seeds: int,
    strata: Sequence[int],
) -> dict:
    """mAD/mAI per method: mean over images of each seed, then over seeds with images.

    Each metric also gets a 95% interval over seeds (stratified t, by the seed's
    class; NaN bounds when :func:`interval_estimable` says too few seeds) and the
    per-seed values (``None`` for a seed without images).
    """
    table: dict[str, dict[str, Any]] = {}
    names = list(dict.fromkeys(o[0] for o in owner))
    for name in names:
        per_seed_ad = [float("nan")] * n_seeds
        per_seed_ai = [float("nan")] * n_seeds
        n_img = 0
        for j in range(n_seeds):
            sel = [i for i, o in enumerate(owner) if o == (name, j)]
            if sel:
                per_seed_ad[j] = float(ad[sel].mean())
                per_seed_ai[j] = float(ai[sel].mean())
                n_img += len(sel)
        m_ad, lo_ad, hi_ad = _interval(per_seed_ad, strata)
        m_ai, lo_ai, hi_ai = _interval(per_seed_ai, strata)
        table[name] = {
            "mAD": m_ad,
            "mAD_ci": [lo_ad, hi_ad],
            "mAI": m_ai,
            "mAI_ci": [lo_ai, hi_ai],
            "n_seeds": int(sum(not math.isnan(v) for v in per_seed_ad)),
            "n_images": n_img,
            "per_seed_AD": per_seed_ad,
            "per_seed_AI": per_seed_ai,
        }
    return table


#: Differences of per-seed means below this are float32 round-off, not a difference.
_TIE = 1e-6


def _compare(
    table: dict,
    ri_names: Sequence[str],
    base_names: Sequence[str],
    strata: Sequence[int],
) -> list[dict]:
    """Paired per-seed differences (RI config minus baseline) with stratified t intervals.

    ``win_AD`` / ``win_AI`` is True when the interval shows RI better (lower AD, higher
    AI), False when it shows it worse, None when it contains 0 or cannot be estimated.
    ``n_paired`` counts the seeds both have; ``estimable`` is False (and the interval NaN)
    when :func:`interval_estimable` says they are too few.
    """
    out = []
    for r in ri_names:
        for b in base_names:
            row: dict[str, Any] = {"ri": r, "baseline": b}
            for metric, better in (("AD", -1.0), ("AI", 1.0)):
                diff = np.asarray(table[r][f"per_seed_{metric}"]) - np.asarray(
                    table[b][f"per_seed_{metric}"]
                )
                mean, lo, hi = _interval(diff, strata)
                row[f"d{metric}"] = mean
                row[f"d{metric}_ci"] = [lo, hi]
                # float32 round-off is not a difference; NaN bounds compare False
                sure = lo > _TIE or hi < -_TIE
                row[f"win_{metric}"] = None if not sure else bool(mean * better > 0)
            row["n_paired"] = int((~np.isnan(diff)).sum())
            row["estimable"] = interval_estimable(diff, strata)
            out.append(row)
    return out


def _block_strata(seed_targets: Sequence[int], n: int, where: str) -> list[int]:
    """The classes of ``n`` values picked as :func:`_pick_seeds` picks them (the same
    number per class, classes in order), for results written before the classes were
    kept; refused unless the setup's own seeds were picked that way."""
    classes = sorted(set(seed_targets))
    per = len(seed_targets) // len(classes)
    if [c for c in classes for _ in range(per)] != list(seed_targets) or n % len(classes):
        raise ValueError(
            f"report: {where} does not keep its classes and they cannot be rebuilt "
            "(the seeds are not the same number per class); run the evaluation again"
        )
    return [c for c in classes for _ in range(n // len(classes))]


def _recompute_keep(keep: dict[str, Any], strata: Sequence[int]) -> None:
    for part in keep.values():
        table = part["metrics"]
        for row in table.values():
            for metric in ("AD", "AI"):
                _, lo, hi = _interval(row[f"per_seed_{metric}"], strata)
                row[f"m{metric}_ci"] = [lo, hi]
        for row in part.get("comparisons", []):
            fresh = _compare(table, [row["ri"]], [row["baseline"]], strata)[0]
            row.update(fresh)


def recompute_intervals(report: dict[str, Any]) -> dict[str, Any]:
    """Recompute every interval and win/loss of a report (``results.json`` of
    :func:`~captum_repinterp.evaluation.run_evaluation`) from its per-seed values, in
    place: for results written with another interval (the percentile bootstrap of
    earlier versions). Nothing is run again: the per-seed values stay as they are.

    Returns
    -------
    dict
        ``report`` itself, with ``"intervals_recomputed"`` set to today's date (the
        markdown report says so).

    Raises
    ------
    ValueError
        Naming ``report``, when a part's classes are neither kept nor rebuildable.
    """
    report["intervals_recomputed"] = time.strftime("%Y-%m-%d")
    for name, res in report["setups"].items():
        reuse = res["reuse"]
        strata = reuse["seed_targets"]
        _recompute_keep(reuse["keep"], strata)
        for layer in res.get("layers") or []:
            n = len(next(iter(layer["keep"].values()))["metrics"]["ri"]["per_seed_AD"])
            where = f"setup {name!r}, layer {layer['layer']!r}"
            layer_strata = layer.get("seed_targets") or _block_strata(strata, n, where)
            _recompute_keep(layer["keep"], layer_strata)
        plain = res.get("no_reuse")
        if plain:
            n = len(plain["images"])
            where = f"setup {name!r}, the maps without reuse"
            _recompute_keep(
                plain["keep"], plain.get("image_targets") or _block_strata(strata, n, where)
            )
    return report


def _rule_summary(rules: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["method"] for r in rules):
        rows = [r for r in rules if r["method"] == name]
        out[name] = {
            "precision": _mean([r["precision"] for r in rows]),
            "coverage": _mean([r["coverage"] for r in rows]),
            "n_inside": _mean([r["n_inside"] for r in rows]),
            "seeds_with_images_inside": sum(r["n_inside"] > 0 for r in rows),
            "boundaries": _mean([r["boundaries"] for r in rows]),
            "ref_purity": _mean([r["purity"] for r in rows]),
            "ref_coverage": _mean([r["ref_coverage"] for r in rows]),
            "n_seeds": len(rows),
        }
    return out


def randomise(
    model: nn.Module, setup: Setup, names: Sequence[str], seed: int = 0
) -> tuple[nn.Module, nn.Module, Any]:
    """A deep copy of ``model`` with the named ``setup.cascade`` blocks re-initialised.

    Every submodule with ``reset_parameters`` in those blocks is reset under
    ``torch.manual_seed(seed)``. Returns the copy, its ``layer`` and its ``head`` (the
    copies of ``setup.layer`` / ``setup.head`` when they are submodules, else ``None``).
    """
    by_name = dict(setup.cascade)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"names: {unknown} are not in the setup's cascade {list(by_name)}")
    memo: dict[int, Any] = {}
    clone = copy.deepcopy(model, memo)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        for n in names:
            block = memo[id(by_name[n])]
            for mod in block.modules():
                if hasattr(mod, "reset_parameters"):
                    mod.reset_parameters()
    layer = memo[id(setup.layer)]
    head = memo.get(id(setup.head)) if isinstance(setup.head, nn.Module) else None
    return clone.eval(), layer, head


def evaluate_setup(setup: Setup, config: EvalConfig | None = None) -> dict[str, Any]:
    """Run the whole protocol on one setup; return a JSON-serialisable dict of results."""
    if not isinstance(setup, Setup):
        raise TypeError(f"setup must be a Setup, got {type(setup).__name__}")
    cfg = config or EvalConfig()
    if not isinstance(cfg, EvalConfig):
        raise TypeError(f"config must be an EvalConfig, got {type(cfg).__name__}")
    if isinstance(cfg.k, bool) or not isinstance(cfg.k, int) or cfg.k <= 0:
        raise ValueError(f"config.k must be a positive int, got {cfg.k!r}")
    _check_fractions(cfg.fractions)
    run = _Runner(setup, cfg)
    tag = f"[{setup.name}]"
    with Timer(run.timings, "total"), torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        with Timer(run.timings, "ri_fit"):
            ri = run.fit(run.model, setup.layer, setup.head)
        methods = channel_weight_methods(run.model, setup.layer, cfg.include_package)
        result: dict[str, Any] = {
            "setup": setup.name,
            "family": setup.family or setup.name,
            "notes": setup.notes,
            "n_references": int(setup.references.shape[0]),
            "n_unseen": int(setup.unseen.shape[0]),
            "config": dataclasses.asdict(cfg),
            "methods": ["ri", *[m.name for m in methods]],
            "heatmap_layers": [name for name, _ in setup.heatmap_layers],
            "ri_configs": _describe_configs(run.ri_configs, setup.heatmap_layers),
        }
        with Timer(run.timings, "reuse_total", f"{tag} reuse"):
            result["reuse"] = run.reuse(ri, methods)
        # the main run's time only (the layer sweep calls reuse again and times itself)
        run.timings["ri_interpret_seeds"] = result["reuse"]["interpret_seconds"]
        result["heatmap_resolution"] = dataclasses.asdict(ri.heatmap_resolution_)
        if cfg.no_reuse:
            with Timer(run.timings, "no_reuse_total", f"{tag} no_reuse"):
                result["no_reuse"] = run.no_reuse(ri, methods)
        if cfg.sanity and setup.cascade:
            with Timer(run.timings, "sanity_total", f"{tag} sanity"):
                result["sanity"] = run.sanity()
        if cfg.layer_sweep and setup.other_layers:
            with Timer(run.timings, "layer_sweep_total", f"{tag} layer sweep"):
                result["layers"] = run.layer_sweep()
        if cfg.fidelity:
            with Timer(run.timings, "fidelity_total", f"{tag} fidelity"):
                result["fidelity"] = run.fidelity(ri, methods)
    result["timings_s"] = {k: round(v, 2) for k, v in run.timings.items()}
    return _clean(result)


def _describe_configs(
    configs: dict[str, dict[str, Any]], heatmap_layers: Sequence[tuple[str, nn.Module]]
) -> dict[str, dict[str, Any]]:
    """Each RI config's heat-map rule, its layer's name (None: the split layer) and its
    cost, for the report and :func:`~captum_repinterp.evaluation.selection.choose_default`."""
    names = {id(m): n for n, m in heatmap_layers}
    out = {}
    for name, kw in configs.items():
        rule = kw.get("heatmap_rule", "elementwise")
        layer = kw.get("heatmap_layer")
        passes = HEATMAP_RULES[rule].forward_passes
        if isinstance(layer, str):
            passes += "; at the input: one forward and backward pass per image drawn"
        out[name] = {
            "heatmap_rule": rule,
            "heatmap_layer": names.get(id(layer), "?") if isinstance(layer, nn.Module) else layer,
            "named_layer": isinstance(layer, nn.Module),
            "forward_passes": passes,
            "cost_per_channel": HEATMAP_RULES[rule].cost_per_channel,
        }
    return out


def _check_fractions(fractions: Any) -> None:
    if (
        isinstance(fractions, (str, bytes))
        or not isinstance(fractions, Sequence)
        or not (fractions)
    ):
        raise TypeError(f"config.fractions must be a non-empty sequence, got {fractions!r}")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)):
            raise TypeError(f"config.fractions: each keep share must be a number, got {f!r}")
        if not 0 < f <= 1:
            raise ValueError(f"config.fractions: each keep share must be in (0, 1], got {f!r}")
    if len({keep_key(f) for f in fractions}) != len(fractions):
        raise ValueError(f"config.fractions must not repeat a keep share, got {fractions!r}")


def _clean(obj: Any) -> Any:
    """Make results JSON-friendly (NaN -> None, tensors -> lists)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, (np.floating, np.integer)):
        return _clean(obj.item())
    return obj
