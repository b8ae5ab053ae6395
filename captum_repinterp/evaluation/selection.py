"""The rule that chooses the default heat-map rule from an evaluation run.

Written down in ``docs/choices.md`` before the run that applies it: every candidate (a
rule selected by ``heatmap_rule=`` alone, at the split layer) is compared, in every cell
(setup, metric, keep share) of the reuse protocol, with the best baseline of that cell,
paired per seed; it wins the cell when the 95% interval shows it better, loses it when
the interval shows it worse. Only candidates within the cost bound are eligible (by
default: no extra model forward pass per seed, so that the default keeps the per-seed
cost of the benchmarks); the others are still tabulated. Ranking: eligible first, then
most wins, then fewest losses, then lowest cost, then the current default.
"""

from __future__ import annotations

import math
from typing import Any

from ..options import DEFAULT_HEATMAP_RULE

__all__ = ["CURRENT_DEFAULT", "best_baseline", "choose_default"]

#: The default before the rule is applied (the last tie-breaker): the package's default.
CURRENT_DEFAULT: str = DEFAULT_HEATMAP_RULE

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


def choose_default(report: dict[str, Any], max_cost_per_channel: int | None = 0) -> dict[str, Any]:
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

    Returns
    -------
    dict
        ``"ranking"``: one row per candidate (its RI config name, rule, wins, losses,
        ties, cost, ``eligible``), eligible candidates first, best first;
        ``"cells"``: per candidate and cell the opponent, the paired difference, its
        interval and the outcome (``"win"``, ``"loss"``, ``"tie"``); ``"default"``: the
        first-ranked eligible rule (the current default when none is eligible).
    """
    setups = report["setups"]
    candidates: dict[str, dict[str, Any]] = {}
    for res in setups.values():
        for name, desc in res.get("ri_configs", {}).items():
            if desc["heatmap_layer"] is None and desc["heatmap_rule"] not in {
                c["rule"] for c in candidates.values()
            }:
                candidates[name] = {
                    "rule": desc["heatmap_rule"],
                    "cost_per_channel": desc["cost_per_channel"],
                    "forward_passes": desc["forward_passes"],
                }
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
    ranking = []
    for name, c in candidates.items():
        mine = [x["outcome"] for x in cells if x["candidate"] == name]
        ranking.append(
            {
                "config": name,
                "rule": c["rule"],
                "wins": mine.count("win"),
                "losses": mine.count("loss"),
                "ties": mine.count("tie"),
                "cells": len(mine),
                "cost_per_channel": c["cost_per_channel"],
                "forward_passes": c["forward_passes"],
                "eligible": max_cost_per_channel is None
                or c["cost_per_channel"] <= max_cost_per_channel,
            }
        )
    ranking.sort(
        key=lambda r: (
            not r["eligible"],
            -r["wins"],
            r["losses"],
            r["cost_per_channel"],
            r["rule"] != CURRENT_DEFAULT,
        )
    )
    return {
        "ranking": ranking,
        "cells": cells,
        "default": ranking[0]["rule"] if ranking and ranking[0]["eligible"] else CURRENT_DEFAULT,
    }
