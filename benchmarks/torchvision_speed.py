"""Per-seed cost on torchvision-sized CNNs: ``python benchmarks/torchvision_speed.py``.

For each configuration ``model:layer:pixels:N`` (torchvision ``weights=None``, never
downloaded; ``num_classes=10`` with the final Linear re-drawn so that the references'
predictions spread over the 10 classes; N random RGB references, seed 0) one run prints

- ``fit`` time against plain inference of the model over the same references (batch 64);
- per seed: ``ri.interpret(x)`` (median over the seeds), Captum's ``LayerGradCam`` (best
  of 3) and pytorch-grad-cam's ``ScoreCAM`` (one call) on the same images and layer, and
  their ratios;
- peak memory (peak anonymous resident memory above the level before the step, sampled
  every 2 ms) of the fit and of the per-seed calls;
- the heat maps: the one-off choice of ``heatmap_layer="auto"`` (seconds, references
  scored, and what it chose), and one map of a seed's region on the seed drawn at the
  split layer and at the input (best of 3; ``interpret`` itself draws no map), against
  ``LayerGradCam``;
- where a seed's time goes: candidate boundaries (crossings, normals and, for affine
  heads, the exact class boundaries), the match of all references (packed signs), the
  greedy cover, and the rest (reading the seed, ranking members, the heat-map weights);
  and the rows the head evaluated per seed.

``--quick`` runs a small subset (resnet18 at 112 px, N = 500, 2 seeds, no ScoreCAM) in
about a minute; ``--only resnet18:layer3,resnet18:layer4:112`` keeps the rows of the
table whose configuration contains one of the given strings. One BLAS/OpenMP thread
throughout.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import dataclasses
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speed import PeakAnon  # noqa: E402

import captum_repinterp.boundaries as boundaries_mod  # noqa: E402
import captum_repinterp.region as region_mod  # noqa: E402
from captum_repinterp import RepresentativeInterpretation  # noqa: E402

FULL = (
    "resnet18:layer4:112:2000,resnet18:layer3:112:2000,resnet50:layer3:112:2000,"
    "vgg11:features[-1]:112:2000,vgg16:features[-1]:112:2000,"
    "resnet18:layer4:224:2000,resnet18:layer3:224:2000,"
    "densenet121:features:112:2000,efficientnet_b0:features:112:2000,"
    "efficientnet_b0:features:224:2000"
)
QUICK = "resnet18:layer4:112:500,resnet18:layer3:112:500"


def build(name: str, layer_path: str, n: int, px: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Model (eval, last Linear re-drawn), its layer and ``n`` random references."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    layer = eval("model." + layer_path, {"model": model})  # noqa: S307 (a fixed table)
    refs = torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(0))
    return model, layer, refs


def last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def plain_inference_and_redraw(model: nn.Module, refs: torch.Tensor, batch: int = 64) -> float:
    """Time plain inference over the references; re-draw the last Linear from the inputs
    it saw so that the predictions spread over the classes."""
    fc = last_linear(model)
    seen: list[torch.Tensor] = []
    handle = fc.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(refs), batch):
            model(refs[s : s + batch])
    elapsed = time.perf_counter() - t
    handle.remove()
    h = torch.cat(seen)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        h_std = float((h - h.mean(0)).std())  # one scale: some inputs are always 0
        w = torch.randn(10, h.shape[1], generator=gen) / h_std / h.shape[1] ** 0.5
        logits = h @ w.T
        fc.weight.copy_(w)
        fc.bias.copy_(-logits.mean(0))
    return elapsed


class Stages:
    """Time spent in the per-seed stages, by wrapping the functions that run them."""

    def __init__(self) -> None:
        self.times: dict[str, float] = defaultdict(float)
        self.rows = 0
        self.patches: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, stage: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.times[stage] += time.perf_counter() - t

        self.patches.append((owner, name, original))
        setattr(owner, name, timed)

    def install(self, model: nn.Module) -> None:
        self.wrap(region_mod, "sample_and_match", "boundaries+match")
        self.wrap(boundaries_mod, "failing_bits", "match")
        proj = sys.modules["captum_repinterp.projection"]
        self.wrap(proj.Projection, "failing_bits_of", "match")
        self.wrap(region_mod, "greedy_cover_bits", "cover")

        def count(m: nn.Module, args: tuple) -> None:
            self.rows += int(args[0].shape[0])

        self.hook = last_linear(model).register_forward_pre_hook(count)

    def remove(self) -> None:
        for owner, name, original in reversed(self.patches):
            setattr(owner, name, original)
        self.hook.remove()


def run_config(spec: str, n_seeds: int, scorecam: bool) -> dict[str, object]:
    from captum.attr import LayerGradCam

    name, layer_path, px, n = spec.split(":")
    px, n = int(px), int(n)
    model, layer, refs = build(name, layer_path, n + n_seeds, px)
    refs, seeds = refs[:n], refs[n:]
    t_inf = plain_inference_and_redraw(model, refs)
    ri = RepresentativeInterpretation(model, layer)
    with PeakAnon() as fit_mem:
        t = time.perf_counter()
        ri.fit(refs, batch_size=64, progress=False)
        t_fit = time.perf_counter() - t
    fitted = ri.references_
    spread = int((ri.predictions_.bincount(minlength=10) > 0).sum())
    shortcut = (
        "exact (affine)"
        if getattr(fitted, "affine", None) is not None
        else "projection"
        if fitted.projection is not None
        else "leading map"
        if getattr(fitted, "leading", None) is not None
        else "none"
    )
    t = time.perf_counter()
    choice = ri.heatmap_resolution_  # what heatmap_layer="auto" draws at, chosen once
    t_choice = time.perf_counter() - t
    ri.interpret(seeds[:1], random_state=0)  # warm-up (one-off costs)
    stages = Stages()
    stages.install(model)
    times, purity = [], []
    with PeakAnon() as seed_mem:
        for i in range(n_seeds):
            t = time.perf_counter()
            reg = ri.interpret(seeds[i : i + 1], random_state=0)
            times.append(time.perf_counter() - t)
            purity.append(reg.purity)
    stages.remove()
    rows = stages.rows / n_seeds
    per_stage = {k: v / n_seeds for k, v in stages.times.items()}
    gc = LayerGradCam(model, layer)
    target = int(ri.predictions_[0])
    gc.attribute(seeds[:1], target=target)
    gc_t = []
    for _ in range(3):
        t = time.perf_counter()
        gc.attribute(seeds[:1], target=target)
        gc_t.append(time.perf_counter() - t)
    map_t = {}
    for where in (None, "input"):
        drawn = dataclasses.replace(reg, heatmap_layer=where)
        drawn.heatmap(seeds[:1])
        best = []
        for _ in range(3):
            t = time.perf_counter()
            drawn.heatmap(seeds[:1])
            best.append(time.perf_counter() - t)
        map_t[where or "layer"] = min(best)
    sc_t = float("nan")
    if scorecam:
        from pytorch_grad_cam import ScoreCAM

        with ScoreCAM(model=model, target_layers=[layer]) as cam:
            cam.batch_size = 64
            t = time.perf_counter()
            cam(input_tensor=seeds[:1], targets=None)
            sc_t = time.perf_counter() - t
    return {
        "spec": f"{name} {layer_path} {px}px N={n}",
        "d": fitted.layout.dim,
        "shortcut": shortcut,
        "classes": spread,
        "fit": t_fit,
        "inference": t_inf,
        "fit_mb": fit_mem.mb,
        "seed": statistics.median(times),
        "seed_mean": statistics.fmean(times),
        "seed_mb": seed_mem.mb,
        "gc": min(gc_t),
        "scorecam": sc_t,
        "stages": per_stage,
        "rows": rows,
        "purity": statistics.fmean(purity),
        "choice": t_choice,
        "chose": choice.heatmap_layer or "layer",
        "scored": choice.n_images,
        "map_layer": map_t["layer"],
        "map_input": map_t["input"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=FULL, help="comma-separated model:layer:px:N")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-scorecam", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a small subset, about a minute")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated strings: run only the configurations containing one of them "
        "(e.g. resnet18:layer3:112)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = QUICK if args.quick else args.configs
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        kept = [c for c in configs.split(",") if any(w in c for w in wanted)]
        if not kept:
            parser.error(f"--only {args.only!r} matches none of {configs!r}")
        configs = ",".join(kept)
    n_seeds = 2 if args.quick else args.seeds
    scorecam = not (args.quick or args.no_scorecam)
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; seeds per config {n_seeds}"
    )
    print(
        f"{'configuration':<34} {'D':>6} {'shortcut':>14} {'cls':>3} {'fit/inf':>7} "
        f"{'interpret':>9} {'GradCam':>8} {'ScoreCAM':>8} {'x GC':>6} {'x SC':>5} "
        f"{'fit MB':>7} {'seed MB':>7} {'purity':>6}"
    )
    results = []
    t0 = time.perf_counter()
    for spec in configs.split(","):
        r = run_config(spec.strip(), n_seeds, scorecam)
        results.append(r)
        print(
            f"{r['spec']:<34} {r['d']:>6} {r['shortcut']:>14} {r['classes']:>3} "
            f"{r['fit'] / r['inference']:>6.2f}x {r['seed']:>8.3f}s {r['gc']:>7.4f}s "
            f"{r['scorecam']:>7.2f}s {r['seed'] / r['gc']:>5.1f}x "
            f"{r['seed'] / r['scorecam']:>5.2f} {r['fit_mb']:>7.0f} {r['seed_mb']:>7.0f} "
            f"{r['purity']:>6.3f}",
            flush=True,
        )
    print("\nper-seed split (mean seconds per seed; rows = head rows evaluated per seed)")
    print(
        f"{'configuration':<34} {'boundaries':>10} {'match':>7} {'cover':>7} {'rest':>7} "
        f"{'rows':>6}"
    )
    for r in results:
        st = r["stages"]
        both = st.get("boundaries+match", 0.0)
        match = st.get("match", 0.0)
        cover = st.get("cover", 0.0)
        rest = r["seed_mean"] - both - cover  # the split is of the mean
        print(
            f"{r['spec']:<34} {both - match:>10.3f} {match:>7.3f} {cover:>7.3f} "
            f"{rest:>7.3f} {r['rows']:>6.0f}"
        )
    print("\nheat maps (seconds; one map of a seed's region on the seed, best of 3)")
    print(
        f"{'configuration':<34} {'auto choice':>11} {'refs':>4} {'chose':>6} {'at layer':>9} "
        f"{'at input':>9} {'x GC':>6}"
    )
    for r in results:
        print(
            f"{r['spec']:<34} {r['choice']:>10.2f}s {r['scored']:>4} {r['chose']:>6} "
            f"{r['map_layer']:>8.4f}s "
            f"{r['map_input']:>8.4f}s {r['map_input'] / r['gc']:>5.1f}x"
        )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
