"""Trials of cheaper stand-ins for the region-scored heat-map rules (not in the package).

The rules ``region-score`` and ``region-members`` score every channel of the layer by
masking the seed (and members) with it: ``K`` or ``9 K`` forward passes per seed. This
script runs the reuse protocol of the evaluation (same seeds, images and baselines as
``benchmarks/evaluate.py``; no sanity, fidelity, layer sweep or explanations without
reuse) with rules that try to get the same channel weights for less:

- ``trial-linear`` / ``trial-linear-members``: no forward pass. A channel's mask ``M_k``
  (its activation map, min-max scaled) is applied in feature space, ``A * M_k``; its
  score is the smallest signed distance of that point to the region's boundaries,
  ``min_j (w_j . (A * M_k) + b_j) / ||w_j||``, computed as ``M_k . E_j + b_j`` with
  ``E_j`` boundary ``j``'s elementwise map; scores divided by their standard deviation,
  softmax; on the seed, or averaged over the seed and its 8 nearest members (stored
  features).
- ``trial-top{8,16,32}``: ``region-score`` (scale-free) on the real masked seed, for the
  ``T`` channels with the highest feature-space score only (``T`` forward passes); the
  other channels get weight 0.
- ``trial-top16-members``: the same on the seed and its 8 nearest members (``9 T``).

And variants of ``elementwise-members`` (the default when these trials ran; no forward
pass): ``trial-channel-members`` (one weight per channel, ``mean_p v[k, p] / s_k``),
``trial-positive-members`` (``max(v, 0) / s_k``) and ``trial-max-members`` (``s_k`` the
channel's largest level over the seed and members instead of its mean).

Run (about 2 minutes for the three setups on 2 cores)::

    OMP_NUM_THREADS=1 python benchmarks/heatmap_rule_trials.py

It prints one markdown table, mAD / mAI per setup and keep share; every row, the default
rule's (``ri``) included, is drawn at the split layer (``heatmap_layer=None``).

With ``--input-blur SIGMA [SIGMA ...]`` it runs instead the default rule drawn at the
input (``heatmap_layer="input"``) with its maps blurred by a Gaussian of ``SIGMA`` pixels
(torchvision's ``gaussian_blur``; 0: not blurred), which asks whether the input's maps
lose on the faces because they are too fine (about a minute per sigma)::

    OMP_NUM_THREADS=1 python benchmarks/heatmap_rule_trials.py --input-blur 0 1 2 4 8
"""

from __future__ import annotations

import argparse
import math
from typing import ClassVar

import torch
from torch import Tensor

from captum_repinterp import heatmap as hm
from captum_repinterp.evaluation import evaluate_setup
from captum_repinterp.evaluation.setups import SETUPS, default_config, load_setup


def feature_space_scores(acts: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``B x K`` scores: each channel's min-max scaled map applied to all channels in
    feature space, scored by the smallest signed distance to the boundaries
    (``acts``: ``B x K x h x w``, ``weight``: ``k x D``, ``bias``: ``k``)."""
    b, k = acts.shape[:2]
    a = acts.float().flatten(2)
    w = weight.float().reshape(weight.shape[0], k, -1)
    per_boundary = torch.einsum("bkp,jkp->bjp", a, w)  # each boundary's elementwise map
    lo = a.min(dim=2, keepdim=True).values
    hi = a.max(dim=2, keepdim=True).values
    masks = (a - lo) / (hi - lo).clamp_min(1e-12)
    h = torch.einsum("bkp,bjp->bkj", masks, per_boundary) + bias.float()[None, None]
    return (h / weight.float().norm(dim=1)[None, None]).min(dim=2).values


class TrialRule(hm.RegionScoreRule):
    """Base of the trial rules: feature-space channel scores, then (``top``) the real
    masked-image scores of the best channels."""

    n_members: ClassVar[int] = 0
    top: ClassVar[int] = 0  # 0: feature-space scores only; T: score T channels for real
    fallback = True
    supports_layer = False

    def region_weights(
        self, weight, bias, seed_inputs, seed_activations, features_of, context=None
    ):
        seed = seed_activations[0].detach().to("cpu", torch.float32)[None]
        if seed.dim() != 4 or len(seed_inputs) != 1 or seed_inputs[0].dim() != 4:
            return None
        k = seed.shape[1]
        if weight.shape[0] == 0:
            return torch.full((k,), 1.0 / k)
        images, acts = seed_inputs[0], seed
        if self.n_members and context is not None and context.additional_forward_args is None:
            rows = context.nearest_members(self.n_members, seed_features=seed.reshape(-1))
            if rows.numel():
                feats = context.references.features[rows].float()
                acts = torch.cat([acts, feats.reshape(rows.numel(), *seed.shape[1:])])
                if self.top:
                    more = context.references.inputs[rows].to(images.device, images.dtype)
                    images = torch.cat([images, more])
        s = feature_space_scores(acts, weight.to("cpu"), bias.to("cpu")).double()
        s = s / s.std(dim=1, correction=0, keepdim=True).clamp_min(1e-12)
        if not self.top:
            return torch.softmax(s, dim=1).mean(dim=0).float()
        top = torch.argsort(s.mean(dim=0), descending=True)[: self.top]
        out = torch.zeros(k)
        out[top] = hm.region_score_weights(
            images, acts[:, top], features_of, weight, bias, scale_free=True
        )
        return out


TRIALS = {
    "trial-linear": {"forward_passes": "0"},
    "trial-linear-members": {"forward_passes": "0", "n_members": 8},
    "trial-top8": {"forward_passes": "8", "top": 8},
    "trial-top16": {"forward_passes": "16", "top": 16},
    "trial-top32": {"forward_passes": "32", "top": 32},
    "trial-top16-members": {"forward_passes": "144", "top": 16, "n_members": 8},
}
for _name, _attrs in TRIALS.items():
    hm.register_heatmap_rule(type(_name, (TrialRule,), {"name": _name, **_attrs}))


class ChannelMembers(hm.ElementwiseMembersRule):
    """``mean_p v[k, p] / s_k``: one weight per channel."""

    name = "trial-channel-members"
    supports_layer = False
    supports_input = False

    def cam_weights(self, direction, activation, channel_weights):
        d = direction.mean(dim=tuple(range(2, direction.dim())), keepdim=True)
        return super().cam_weights(d, activation, channel_weights)


class PositiveMembers(hm.ElementwiseMembersRule):
    """``max(v, 0) / s_k``."""

    name = "trial-positive-members"
    supports_layer = False
    supports_input = False

    def cam_weights(self, direction, activation, channel_weights):
        return super().cam_weights(direction.clamp_min(0), activation, channel_weights)


class MaxMembers(hm.ElementwiseMembersRule):
    """``v / s_k`` with ``s_k`` the largest level of channel ``k`` over the images."""

    name = "trial-max-members"
    supports_layer = False
    supports_input = False

    def channel_levels(self, activations):
        return activations.flatten(2).amax(dim=2)


class BlurredAtInput(hm.ElementwiseMembersRule):
    """The default rule; at the input its maps are blurred by a Gaussian of ``sigma``
    pixels."""

    sigma: ClassVar[float] = 0.0

    def maps(self, reader, inputs, additional_forward_args, direction, *args, **kwargs):
        out = super().maps(reader, inputs, additional_forward_args, direction, *args, **kwargs)
        if self.layer != hm.INPUT or self.sigma <= 0:
            return out
        from torchvision.transforms.functional import gaussian_blur

        size = 2 * math.ceil(3 * self.sigma) + 1
        return tuple(gaussian_blur(m, [size, size], [self.sigma, self.sigma]) for m in out)


def blurred_rule(sigma: float) -> str:
    """Register (once) and name the default rule blurred by ``sigma`` at the input."""
    name = f"trial-members-blur{sigma:g}"
    if name not in hm.HEATMAP_RULES:
        hm.register_heatmap_rule(type(name, (BlurredAtInput,), {"name": name, "sigma": sigma}))
    return name


for _cls in (ChannelMembers, PositiveMembers, MaxMembers):
    hm.register_heatmap_rule(_cls)
    TRIALS[_cls.name] = {}

COMPARED = (
    "elementwise-members",
    "elementwise-positive",
    "elementwise",
    "region-score",
    "region-members",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--input-blur", nargs="+", type=float, metavar="SIGMA")
    args = parser.parse_args()
    if args.input_blur and min(args.input_blur) < 0:
        parser.error("--input-blur: sigmas must be >= 0")
    results = {}
    for name in args.setups:
        cfg = default_config(name)
        cfg.no_reuse = cfg.sanity = cfg.fidelity = cfg.layer_sweep = False
        cfg.heatmap_layer_rules = ()
        if args.input_blur:
            cfg.ri_variants = {
                f"ri[{blurred_rule(s)}]": {
                    "heatmap_rule": blurred_rule(s),
                    "heatmap_layer": "input",
                }
                for s in args.input_blur
            }
        else:  # every rule at the split layer, the default rule's row (ri) included
            cfg.ri_kwargs = {**cfg.ri_kwargs, "heatmap_layer": None}
            cfg.ri_variants = {
                f"ri[{r}]": {"heatmap_rule": r, "heatmap_layer": None}
                for r in (*TRIALS, *COMPARED)
                if r != cfg.ri_kwargs["heatmap_rule"]
            }
        setup = load_setup(name, cfg.seed)
        setup.heatmap_layers = []
        results[name] = evaluate_setup(setup, cfg)["reuse"]["keep"]
    keys = [(s, k) for s in results for k in results[s]]
    print(
        "| rule | extra passes per seed | "
        + " | ".join(f"{s}, keep {float(k):.0%}" for s, k in keys)
        + " |"
    )
    print("|---|---|" + "---|" * len(keys))
    first = results[keys[0][0]][keys[0][1]]["metrics"]
    for m in first:
        if m.endswith("@nn"):
            continue
        rule = m[3:-1] if m.startswith("ri[") else ("(default) " if m == "ri" else "") + m
        cost = hm.HEATMAP_RULES[m[3:-1]].forward_passes if m.startswith("ri[") else ""
        cells = [results[s][k]["metrics"][m] for s, k in keys]
        print(
            f"| {rule} | {cost} | "
            + " | ".join(f"{c['mAD']:.3f} / {c['mAI']:.3f}" for c in cells)
            + " |"
        )


if __name__ == "__main__":
    main()
