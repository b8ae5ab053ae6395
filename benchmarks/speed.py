"""Speed and scale benchmark: ``python benchmarks/speed.py`` (about 5-10 minutes, CPU).

One run on one model and one data set (SmallCNN trained on MNIST-5k, split at
``features[-1]``, D = 32 x 7 x 7 = 1568) prints

1. per-seed time of the package (batched sampler + chunked match matrix + greedy cover)
   against a straightforward port of the reference implementation
   (``benchmarks/port.py``), on the same candidates, and asserts that both solvers select
   the same boundaries when given the same ``W, b`` (the port's);
2. per-seed time against Captum's ``LayerGradCam`` on the same images;
3. fit throughput against plain inference of the model over the same references;
4. time and peak memory as the reference set grows (synthetic features beyond 10k), with
   the in-RAM features and with the on-disk store (``fit(..., store=path)``).

N = 10k real references: the 5000 MNIST-5k images plus a copy of each shifted by one
pixel (right for even indices, down for odd ones; ``torch.roll``). Synthetic features
for the scaling table: real features of those 10k references, resampled with replacement
and perturbed by Gaussian noise (std 0.05 of their std, seed 0), predictions by the
model's head.

Peak memory is the peak of the process's anonymous resident memory (``RssAnon`` from
``/proc/self/status``, sampled every 2 ms) above its level before the step, measured in a
fresh subprocess per configuration; memory-mapped file pages are not anonymous memory
(the OS can drop them), which is the point of the store.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

# one BLAS / OpenMP thread for every library, so the port (numpy) and the package (torch)
# run under the same conditions and spinning worker threads do not distort a loaded machine
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from port import port_greedy, port_sample  # noqa: E402

from captum_repinterp import RepresentativeInterpretation  # noqa: E402
from captum_repinterp.match import margins  # noqa: E402
from captum_repinterp.sampler import choose_candidates  # noqa: E402
from captum_repinterp.solver import greedy_cover  # noqa: E402

torch.manual_seed(0)


# ---------------------------------------------------------------------- helpers
def rss_anon_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


class PeakAnon:
    """Peak ``RssAnon`` (MB) above the level at entry, sampled in a thread."""

    def __enter__(self) -> PeakAnon:
        self.base = rss_anon_kb()
        self.peak = self.base
        self._stop = False

        def run() -> None:
            while not self._stop:
                self.peak = max(self.peak, rss_anon_kb())
                time.sleep(0.002)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_anon_kb())
        self.mb = (self.peak - self.base) / 1024


def load_setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from captum_repinterp.datasets import load_mnist5k
    from captum_repinterp.models import train_small_cnn

    images, labels = load_mnist5k()
    model = train_small_cnn(images, labels, seed=0).eval()
    return model, images, labels


def augmented_10k(images: torch.Tensor) -> torch.Tensor:
    shifted = images.clone()
    shifted[0::2] = torch.roll(images[0::2], shifts=1, dims=3)
    shifted[1::2] = torch.roll(images[1::2], shifts=1, dims=2)
    return torch.cat([images, shifted])


def timed(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


# ---------------------------------------------------------------------- parts 1-3
def per_seed_and_fit(n_seeds: int, m: int) -> dict[str, float]:
    from captum.attr import LayerGradCam

    model, images, _ = load_setup()
    refs = augmented_10k(images)
    layer = model.features[-1]
    head = model.head
    ri = RepresentativeInterpretation(model, layer, head=head)

    print("== fit throughput (N = 10000 references, batch 128) ==")
    t_fit, _ = timed(ri.fit, refs, batch_size=128, progress=False)
    with torch.no_grad():
        t_inf, _ = timed(lambda: [model(refs[s : s + 128]) for s in range(0, len(refs), 128)])
    print(
        f"fit {t_fit:.2f} s ({len(refs) / t_fit:,.0f} refs/s) | plain inference "
        f"{t_inf:.2f} s ({len(refs) / t_inf:,.0f} refs/s) | fit / inference = "
        f"{t_fit / t_inf:.2f}x"
    )

    feats, preds = ri.features_, ri.predictions_
    feats_np = feats.numpy()
    gen = torch.Generator().manual_seed(1)
    seeds_idx = torch.randperm(len(images), generator=gen)[:n_seeds]
    gc = LayerGradCam(model, layer)
    rows = []
    print(f"\n== per seed, N = {len(refs)}, m = {m} (seconds) ==")
    print(
        f"{'seed':>5} {'ours':>8} {'port':>8} {'port/ours':>9} {'gradcam':>8} "
        f"{'ours/gc':>8} {'|Q|':>4} {'|S|':>4} same"
    )
    for i in seeds_idx.tolist():
        x = images[i : i + 1]
        # ours, the whole public call (features, sampler, match, cover, members)
        t_ours, interp = timed(ri.interpret, x, n_boundaries=m, seed=0)
        # the port on the same candidates
        psi_x, _ = ri.transform(x)
        psi_x = psi_x[0]
        target = interp.target
        cand = choose_candidates(preds, target, True, m, 0)
        t0 = time.perf_counter()
        wp, bp = port_sample(head, psi_x, feats[cand], target)
        positive = (preds == target).numpy()
        sel_port = port_greedy(feats_np, wp.numpy(), bp.numpy(), positive)
        t_port = time.perf_counter() - t0
        # exactness: both solvers on the port's W, b
        match = margins(feats, wp, bp) > 0
        sel_ours = greedy_cover(match, preds == target).selected.tolist()
        same = sel_ours == sel_port
        assert same, f"solvers disagree on seed {i}: {sel_ours} vs {sel_port}"
        t_gc, _ = timed(gc.attribute, x, target=target)
        rows.append((t_ours, t_port, t_gc))
        print(
            f"{i:>5} {t_ours:8.3f} {t_port:8.3f} {t_port / t_ours:8.1f}x {t_gc:8.4f} "
            f"{t_ours / t_gc:7.1f}x {len(wp):>4} {len(sel_port):>4} {same}"
        )
    med = [statistics.median(c) for c in zip(*rows)]
    print(
        f"median: ours {med[0]:.3f} s, port {med[1]:.3f} s -> port / ours = "
        f"{med[1] / med[0]:.1f}x; LayerGradCam {med[2]:.4f} s -> ours / LayerGradCam = "
        f"{med[0] / med[2]:.1f}x"
    )
    return {"port_over_ours": med[1] / med[0], "ours_over_gc": med[0] / med[2]}


# ---------------------------------------------------------------------- part 4
def scale_child(n: int, mode: str, m: int, workdir: str) -> dict[str, float]:
    """One configuration of the scaling table (runs in its own process)."""
    model, images, _ = load_setup()
    refs = augmented_10k(images)
    layer = model.features[-1]
    ri0 = RepresentativeInterpretation(model, layer, head=model.head).fit(refs, progress=False)
    base = ri0.features_
    std = float(base.std())
    seed_x = images[7:8]
    del ri0

    # a model on feature vectors: identity "layer" then the CNN head
    fmodel = nn.Sequential(nn.Identity(), model.head).eval()
    ri = RepresentativeInterpretation(fmodel, fmodel[0], head=model.head)
    gen = torch.Generator().manual_seed(0)
    chunk = 25_000

    def synth(count: int) -> torch.Tensor:
        idx = torch.randint(0, base.shape[0], (count,), generator=gen)
        return (base[idx] + 0.05 * std * torch.randn(count, base.shape[1], generator=gen)).relu()

    with PeakAnon() as fit_mem:
        t = time.perf_counter()
        if mode == "ram":
            parts = [synth(min(chunk, n - s)) for s in range(0, n, chunk)]
            ri.fit(torch.cat(parts), batch_size=1024, progress=False)
            del parts
        else:
            path = os.path.join(workdir, f"store_{n}")
            for s in range(0, n, chunk):
                ri.fit(
                    synth(min(chunk, n - s)),
                    batch_size=1024,
                    progress=False,
                    store=path,
                    append=True,
                )
        t_fit = time.perf_counter() - t
    with torch.no_grad():
        psi = model.features(seed_x).reshape(1, -1)
    times = []
    with PeakAnon() as seed_mem:
        for _ in range(2):
            t = time.perf_counter()
            ri.interpret(psi, n_boundaries=m, seed=0)
            times.append(time.perf_counter() - t)
    return {
        "n": n,
        "mode": mode,
        "fit_s": t_fit,
        "fit_peak_mb": fit_mem.mb,
        "seed_s": min(times),
        "seed_peak_mb": seed_mem.mb,
        "features_mb": n * base.shape[1] * 4 / 2**20,
    }


def scaling(sizes: list[int], m: int) -> None:
    print(f"\n== scaling with N (D = 1568, m = {m}; synthetic features) ==")
    print(
        f"{'N':>9} {'store':>5} {'features MB':>11} {'fit s':>7} {'fit peak MB':>11} "
        f"{'seed s':>7} {'s per 1M refs':>13} {'seed peak MB':>12}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for mode in ("ram", "disk"):
                if mode == "ram" and n > 300_000:
                    continue
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(n), mode, str(m), tmp],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"{r['n']:>9,} {r['mode']:>5} {r['features_mb']:>11.0f} {r['fit_s']:>7.2f} "
                    f"{r['fit_peak_mb']:>11.0f} {r['seed_s']:>7.3f} "
                    f"{r['seed_s'] / r['n'] * 1e6:>13.1f} {r['seed_peak_mb']:>12.0f}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--m", type=int, default=50)
    parser.add_argument("--sizes", type=str, default="1000,10000,100000,300000")
    parser.add_argument("--skip-per-seed", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        n, mode, m, workdir = args.child
        print(json.dumps(scale_child(int(n), mode, int(m), workdir)))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, numpy {np.__version__}")
    if not args.skip_per_seed:
        per_seed_and_fit(args.seeds, args.m)
    scaling([int(s) for s in args.sizes.split(",")], args.m)


if __name__ == "__main__":
    main()
