"""The rule that chooses the default heat-map rule from an evaluation run.

Written down in ``docs/choices.md`` before the run that applies it: every candidate (a
rule selected by ``heatmap_rule=``, drawn at the split layer or, with
``heatmap_layer="input"`` / ``"auto"``, at a resolution every model has; not at a named
layer of one model) is compared, in every cell (setup, metric, keep share) of the reuse
protocol, with the best baseline of that cell, paired per seed; it wins the cell when the
95% interval shows it better, loses it when the interval shows it worse. Only candidates
within the cost bound are eligible (by default: no extra forward pass per channel of the
layer); the others are still tabulated. The candidates for ``"auto"`` include pairs: one
rule where ``"auto"`` keeps the split layer, another where it draws at the input
(:func:`candidate_name`). Candidates whose maps stay correlated above a bound with their
maps after the top block is randomised (the sanity check) are not eligible either.
Ranking (the fifth version of the rule): eligible first, then the score (wins minus
losses, each cell weighted by one over its model family's number of setups, so that every
family weighs the same), then the weighted wins, then lowest cost (passes per channel,
then the split layer before the input), then the nearest to the current default (its
layer rule, its input rule, then its layer). The package's default is the first-ranked
candidate unless ``docs/choices.md`` records it as overridden (the fourth version's answer
was).
"""

from __future__ import annotations

import math
from typing import Any

from ..options import AUTO, DEFAULT_HEATMAP_LAYER, DEFAULT_HEATMAP_RULE, INPUT

__all__ = ["CURRENT_DEFAULT", "best_baseline", "choose_default", "candidate_name"]

#: The default before the rule is applied (the last tie-breaker): the package's default
#: ``(heatmap_rule, heatmap_layer)``.
CURRENT_DEFAULT: tuple[str, str | None] = (DEFAULT_HEATMAP_RULE, DEFAULT_HEATMAP_LAYER)


def candidate_name(rule: str, layer: str | None, input_rule: str | None = None) -> str:
    """``rule`` at the split layer, ``rule@input`` / ``rule@auto`` elsewhere; a pair for
    ``"auto"`` (``rule`` where it keeps the split layer, ``input_rule`` where it draws at
    the input) is ``rule/input_rule@auto``."""
    if layer is None:
        return rule
    if input_rule is not None and input_rule != rule:
        return f"{rule}/{input_rule}@{layer}"
    return f"{rule}@{layer}"


_BETTER = {"mAD": -1.0, "mAI": 1.0}


def best_baseline(metrics: dict[str, Any], baselines: list[str], metric: str) -> str | None:
    """The baseline with the best mean ``metric`` (``"mAD"``: lowest, ``"mAI"``: highest)."""
    sign = _BETTER[metric]
    scored = [
        (sign * metrics[b][metric], b)
        for b in baselines
        if b in metrics and metrics[b][metric] is not None and not math.isnan(metrics[b][metric])
    ]
    return max(scored)[1] if scored else None


def choose_default(
    report: dict[str, Any],
    max_cost_per_channel: int | None = 0,
    max_sanity: float | None = 0.5,
) -> dict[str, Any]:
    """Apply the selection rule to a report of
    :func:`~captum_repinterp.evaluation.run_evaluation` (or its ``results.json``).

    Parameters
    ----------
    report : dict
        The evaluation report.
    max_cost_per_channel : int or None
        The cost bound: candidates whose extra forward passes per seed per channel of
        the layer exceed it are not eligible (``0``: rules without extra forward
        passes; ``None``: no bound).
    max_sanity : float or None
        The sanity bound: candidates whose maps keep a mean Spearman correlation above it
        with their maps after the top block is re-initialised (the first stage of a
        setup's sanity check), on any setup where it was measured, are not eligible
        (``None``: no bound). Adebayo et al. 2018, arXiv:1810.03292.

    Returns
    -------
    dict
        ``"ranking"``: one row per candidate (its RI config name, ``rule`` as
        :func:`candidate_name` writes it, ``heatmap_rule``, ``heatmap_layer``, wins,
        losses, ties, ``score`` (wins minus losses with each cell weighted by one over
        its family's number of setups: every model family weighs the same), cost,
        ``sanity`` (the largest correlation over the setups), ``eligible``), eligible
        candidates first, best first;
        ``"cells"``: per candidate and cell the opponent, the paired difference, its
        interval and the outcome (``"win"``, ``"loss"``, ``"tie"``); ``"default"``: the
        first-ranked eligible rule (the current default when none is eligible).

    Raises
    ------
    TypeError, ValueError
        Naming ``max_sanity`` when it is not a number (or None), or NaN.
    """
    if max_sanity is not None:
        if isinstance(max_sanity, bool) or not isinstance(max_sanity, (int, float)):
            raise TypeError(f"max_sanity must be a number or None, got {max_sanity!r}")
        if math.isnan(max_sanity):
            raise ValueError("max_sanity must not be NaN (None: no sanity bound)")
    setups = report["setups"]
    candidates: dict[str, dict[str, Any]] = {}
    for res in setups.values():
        for name, desc in res.get("ri_configs", {}).items():
            if desc.get("named_layer", desc["heatmap_layer"] is not None):
                continue
            rule, layer = desc["heatmap_rule"], desc["heatmap_layer"]
            key = (rule, layer, None if layer is None else rule)
            if key not in {c["key"] for c in candidates.values()}:
                candidates[name] = {
                    "key": key,
                    "rule": candidate_name(*key),
                    "cost_per_channel": desc["cost_per_channel"],
                    "forward_passes": desc["forward_passes"],
                }
    cells = _cells(setups, candidates)
    cells += _pair_cells(setups, candidates, cells)
    family = {setup: res.get("family") or setup for setup, res in setups.items()}
    n_setups = {f: list(family.values()).count(f) for f in family.values()}
    sign = {"win": 1.0, "loss": -1.0, "tie": 0.0}
    ranking = []
    for name, c in candidates.items():
        own = [x for x in cells if x["candidate"] == name]
        mine = [x["outcome"] for x in own]
        weight = [1.0 / n_setups[family[x["setup"]]] for x in own]
        sanity = _sanity(setups, name, c.get("sources", {}))
        worst = max(sanity.values(), default=float("nan"))
        within_cost = max_cost_per_channel is None or c["cost_per_channel"] <= max_cost_per_channel
        within_sanity = max_sanity is None or not worst > max_sanity
        ranking.append(
            {
                "config": name,
                "rule": c["rule"],
                "heatmap_rule": c["key"][0],
                "heatmap_layer": c["key"][1],
                "input_rule": c["key"][2],
                "wins": mine.count("win"),
                "losses": mine.count("loss"),
                "ties": mine.count("tie"),
                "cells": len(mine),
                "score": round(sum(w * sign[o] for w, o in zip(weight, mine)), 6),
                "weighted_wins": round(sum(w for w, o in zip(weight, mine) if o == "win"), 6),
                "cost_per_channel": c["cost_per_channel"],
                "forward_passes": c["forward_passes"],
                "sanity": worst,
                "sanity_by_setup": sanity,
                "within_cost": within_cost,
                "within_sanity": within_sanity,
                "eligible": within_cost and within_sanity,
            }
        )
    current_input = None if CURRENT_DEFAULT[1] is None else CURRENT_DEFAULT[0]
    ranking.sort(
        key=lambda r: (
            not r["eligible"],
            -r["score"],
            -r["weighted_wins"],
            r["cost_per_channel"],
            r["heatmap_layer"] is not None,
            # then the nearest to the current default: its layer rule, its input rule,
            # then its layer
            r["heatmap_rule"] != CURRENT_DEFAULT[0],
            r["input_rule"] != current_input,
            r["heatmap_layer"] != CURRENT_DEFAULT[1],
        )
    )
    first = ranking[0] if ranking and ranking[0]["eligible"] else None
    return {
        "ranking": ranking,
        "cells": cells,
        "default": first["rule"] if first else candidate_name(*CURRENT_DEFAULT),
        "default_rule": first["heatmap_rule"] if first else CURRENT_DEFAULT[0],
        "default_layer": first["heatmap_layer"] if first else CURRENT_DEFAULT[1],
        "default_input_rule": first["input_rule"] if first else current_input,
    }


def _sanity(setups: dict[str, Any], name: str, sources: dict[str, str]) -> dict[str, float]:
    """The candidate's mean correlation with its maps after the top block is randomised
    (the first stage of the sanity check), per setup where it was measured; a pair's is
    its source rule's on that setup."""
    out = {}
    for setup, res in setups.items():
        stages = res.get("sanity", {}).get("stages", [])
        value = stages[0].get(sources.get(setup, name)) if stages else None
        if isinstance(value, (int, float)) and not math.isnan(value):
            out[setup] = float(value)
    return out


def _cells(setups: dict[str, Any], candidates: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every candidate's cells (setup, keep share, metric) against the cell's best baseline."""
    cells = []
    for setup, res in setups.items():
        baselines = [m for m in res["methods"] if not m.startswith("ri")]
        for key, part in res["reuse"]["keep"].items():
            comps = {(r["ri"], r["baseline"]): r for r in part["comparisons"]}
            for metric in ("mAD", "mAI"):
                opp = best_baseline(part["metrics"], baselines, metric)
                for name in candidates:
                    row = comps.get((name, opp))
                    if row is None:
                        continue
                    m = metric[1:]
                    win = row[f"win_{m}"] if row.get("estimable", True) else None
                    outcome = "tie" if win is None else ("win" if win else "loss")
                    cells.append(
                        {
                            "candidate": name,
                            "setup": setup,
                            "keep": key,
                            "metric": metric,
                            "opponent": opp,
                            "diff": row[f"d{m}"],
                            "ci": row[f"d{m}_ci"],
                            "value": part["metrics"][name][metric],
                            "opponent_value": part["metrics"][opp][metric],
                            "outcome": outcome,
                        }
                    )
    return cells


def _pair_cells(
    setups: dict[str, Any], candidates: dict[str, dict[str, Any]], cells: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Add the pairs for ``"auto"`` to ``candidates`` and return their cells, taken from
    the candidates' ``cells``.

    A pair is a rule at the split layer that needs no extra forward pass and a rule at the
    input, both run as candidates; on each setup its cells are the layer rule's (at the
    split layer) or the input rule's (at the input), whichever ``"auto"`` chose on that
    setup's references. The regions, seeds and images do not depend on the rule, so these
    are the cells the pair would have had. A pair of one rule is that rule's ``@auto``.
    """
    by_key = {c["key"]: name for name, c in candidates.items()}
    at_layer = {k[0]: n for k, n in by_key.items() if k[1] is None}
    at_input = {k[0]: n for k, n in by_key.items() if k[1] == INPUT}
    pairs: list[dict[str, Any]] = []
    for layer_rule, layer_name in at_layer.items():
        if candidates[layer_name]["cost_per_channel"] > 0:
            continue
        for input_rule, input_name in at_input.items():
            if layer_rule == input_rule:
                continue
            key = (layer_rule, AUTO, input_rule)
            name = f"ri[{candidate_name(*key)}]"
            sources = {}
            for setup, res in setups.items():
                choice = res.get("heatmap_resolution")
                if choice is not None:
                    sources[setup] = input_name if choice["heatmap_layer"] == INPUT else layer_name
            if not sources:
                continue
            at_l, at_i = candidates[layer_name], candidates[input_name]
            candidates[name] = {
                "key": key,
                "sources": sources,
                "rule": candidate_name(*key),
                "cost_per_channel": max(at_l["cost_per_channel"], at_i["cost_per_channel"]),
                "forward_passes": f"{at_i['forward_passes']}; at the split layer: "
                f"{at_l['forward_passes']}",
            }
            pairs += [
                {**c, "candidate": name, "source": c["candidate"]}
                for c in cells
                if sources.get(c["setup"]) == c["candidate"]
            ]
    return pairs
