"""The reuse protocol on small CNNs that are not the bundled ones.

The default heat map was chosen on the three bundled setups; this script measures it on
models it was not chosen on, in the shape of a held-out check (small CNNs on 28 x 28 grey
digits, 10 classes, 20 seeds, k = 10): the bundled ``SmallCNN`` trained with other seeds
(1, 2, 3; each with its own train/test split) on MNIST-5k and on scikit-learn's digits,
and a CNN whose head is global average pooling and one linear layer (``pooled``, seeds 0
and 1), a head of another kind. For each it prints what ``heatmap_layer="auto"`` chose
(references scored, p-value) and mAD / mAI at keep 20% and 50% of the default (``ri``),
of the same rule at the split layer (``ri@layer``), of two other rules
(``elementwise-positive`` at the input, ``region-members`` at the split layer) and of
the four baselines, on the protocol of ``benchmarks/evaluate.py``. With 2 seeds per
class the intervals are not computed (see ``docs/evaluation_notes.md``), so
these are point values.

Run (about 10 minutes on one thread)::

    OMP_NUM_THREADS=1 python benchmarks/other_models.py
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from captum_repinterp import datasets
from captum_repinterp.evaluation import evaluate_setup
from captum_repinterp.evaluation.setups import Setup, default_config, load_setup

BASELINES = ("gradcam", "gradcam++", "scorecam", "hirescam")


class PooledCNN(nn.Module):
    """Three conv blocks (16, 32, 64 channels), then global average pooling and a linear
    layer: ``head(features(x))``, split at ``features[-1]`` (64 x 7 x 7)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def pooled_setup(seed: int) -> Setup:
    """:class:`PooledCNN` trained on MNIST-5k (6 epochs of Adam, seeded)."""
    x, y = datasets.load_mnist5k()
    train, test = datasets.split_indices(len(y), 0.2, seed=seed, stratify=y)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PooledCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    xs, ys = x[train], y[train]
    for _ in range(6):
        order = torch.randperm(len(ys), generator=gen)
        for start in range(0, len(ys), 64):
            idx = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    f = model.features
    return Setup(f"pooled-{seed}", model, f[-1], xs, x[test], head=model.head, notes="")


def run(name: str, setup: Setup) -> None:
    cfg = default_config("mnist")
    cfg.seeds_per_class = 2
    cfg.no_reuse = cfg.sanity = cfg.fidelity = cfg.layer_sweep = False
    cfg.heatmap_layer_rules = ()
    rule = cfg.ri_kwargs["heatmap_rule"]
    cfg.ri_variants = {
        "ri@layer": {"heatmap_rule": rule, "heatmap_layer": None},
        "positive@input": {"heatmap_rule": "elementwise-positive", "heatmap_layer": "input"},
        "region-members": {"heatmap_rule": "region-members", "heatmap_layer": None},
    }
    setup.heatmap_layers = []
    start = time.perf_counter()
    result = evaluate_setup(setup, cfg)
    choice = result["heatmap_resolution"]
    where = choice["heatmap_layer"] or "split layer"
    print(
        f"\n{name}: auto chose the {where} on {choice['n_images']} references "
        f"(p = {choice['p_value']:.2g}); {time.perf_counter() - start:.0f} s"
    )
    keeps = result["reuse"]["keep"]
    print("| method | " + " | ".join(f"keep {float(k):.0%}" for k in keeps) + " |")
    print("|---|" + "---|" * len(keeps))
    for m in ("ri", "ri@layer", "positive@input", "region-members", *BASELINES):
        cells = [keeps[k]["metrics"][m] for k in keeps]
        print(f"| {m} | " + " | ".join(f"{c['mAD']:.3f} / {c['mAI']:.3f}" for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    torch.set_num_threads(1)
    for data in ("mnist", "digits"):
        for seed in (1, 2, 3):
            run(f"SmallCNN on {data}, seed {seed}", load_setup(data, seed))
    for seed in (0, 1):
        run(f"pooled CNN on mnist, seed {seed}", pooled_setup(seed))


if __name__ == "__main__":
    main()
