"""Speed and scale benchmark: ``python benchmarks/speed.py`` (about 2-4 minutes, one thread).

One run on one model and one data set (SmallCNN trained on MNIST-5k, split at
``features[-1]``, D = 32 x 7 x 7 = 1568) prints

1. fit throughput against plain inference of the model over the same references;
2. per-seed time of the package (``ri.interpret``: batched sampler + chunked match matrix +
   greedy cover + ranked members) against a straightforward port of the reference
   implementation (``benchmarks/port.py``) on the same candidates, and asserts that both
   pipelines (match matrix + greedy) select the same boundaries when given the same
   ``W, b``: once with the port's sampled boundaries, once with the package's;
3. per-seed time against Captum's ``LayerGradCam`` on the same images;
4. time and peak memory as the reference set grows (synthetic features), with the in-RAM
   features and with the on-disk store (``fit(..., store=path, append=True)``).

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
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from port import port_greedy, port_sample  # noqa: E402

from captum_repinterp import RepresentativeInterpretation  # noqa: E402
from captum_repinterp._memory import PeakAnon  # noqa: E402
from captum_repinterp.boundaries import sample_and_match  # noqa: E402
from captum_repinterp.heads import UserHead  # noqa: E402
from captum_repinterp.match import failing_bits  # noqa: E402
from captum_repinterp.sampler import choose_candidates, sample_boundaries  # noqa: E402
from captum_repinterp.solver import greedy_cover_bits  # noqa: E402

torch.manual_seed(0)


# ---------------------------------------------------------------------- helpers
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
def _selections_agree(
    feats: torch.Tensor, preds: torch.Tensor, target: int, w: torch.Tensor, b: torch.Tensor
) -> tuple[list[int], list[int], int]:
    """Both pipelines (match matrix + greedy) on the same ``W, b``.

    Ours: the package's path, ``failing_bits`` (chunked torch margins, packed signs)
    then ``greedy_cover_bits``; the port: its numpy match matrix and greedy. Returns both
    selections and the number of match entries whose sign differs between the two.
    """
    positive = preds == target
    fail_ours = failing_bits(feats, w, b)
    sel_ours = greedy_cover_bits(fail_ours, positive).selected.tolist()
    feats_np = feats.numpy()
    w_np, b_np = w.numpy(), b.numpy()
    sel_port = port_greedy(feats_np, w_np, b_np, positive.numpy())
    match_port = feats_np @ np.ascontiguousarray(w_np, dtype=np.float32).T + b_np > 0
    match_ours = (
        ~np.unpackbits(fail_ours.view(np.uint8), axis=1, bitorder="little")[:, : len(feats_np)]
        .astype(bool)
        .T
    )
    n_diff = int((match_ours != match_port).sum())
    return sel_ours, sel_port, n_diff


def per_seed_and_fit(n_seeds: int, n_port: int, m: int) -> dict[str, float]:
    from captum.attr import LayerGradCam

    model, images, _ = load_setup()
    refs = augmented_10k(images)
    layer = model.features[-1]
    head = model.head
    ri = RepresentativeInterpretation(model, layer, head=head)

    print(f"== fit throughput (N = {len(refs)} references, batch 128) ==")
    t_fit, _ = timed(ri.fit, refs, batch_size=128, progress=False)
    with torch.no_grad():
        t_inf, _ = timed(lambda: [model(refs[s : s + 128]) for s in range(0, len(refs), 128)])
    print(
        f"fit {t_fit:.2f} s ({len(refs) / t_fit:,.0f} refs/s) | plain inference "
        f"{t_inf:.2f} s ({len(refs) / t_inf:,.0f} refs/s) | fit / inference = "
        f"{t_fit / t_inf:.2f}x"
    )

    feats, preds = ri.features_, ri.predictions_
    gen = torch.Generator().manual_seed(1)
    seeds_idx = torch.randperm(len(images), generator=gen)[:n_seeds].tolist()
    gc = LayerGradCam(model, layer)
    gc.attribute(images[:1], target=0)  # warm-up (first call pays one-off costs)
    ri.interpret(images[:1], n_boundaries=m, random_state=0)
    rows, parts = [], []
    print(f"\n== per seed, N = {len(refs)}, m = {m} candidates (seconds) ==")
    print(
        "ours = ri.interpret(x) (seed features, batched sampler, chunked match, greedy, "
        "ranked members)\nport = port_sample + port_greedy on the same candidates; "
        "gc = LayerGradCam.attribute(x)\n"
        "same(port W,b) / same(our W,b): both pipelines (match matrix + greedy) given the "
        "same boundaries select the same ones (asserted); |dM| = match entries whose sign "
        "differs between torch and numpy"
    )
    print(
        f"{'seed':>5} {'cls':>3} {'ours':>7} {'port':>8} {'port/ours':>9} {'gc':>7} "
        f"{'ours/gc':>8} {'|Q|':>4} {'|S|':>4} {'|dM|':>4} same(port W,b) same(our W,b)"
    )
    # the timings first, all seeds, nothing else in between: the exactness checks below
    # (numpy's match matrix, the port) left this process running torch several times
    # slower for a while, ours and LayerGradCam alike (seen in this round's run)
    clean = {}
    for i in seeds_idx:
        x = images[i : i + 1]
        # ours, the whole public call (features, sampler, match, cover, members)
        t_ours, interp = timed(ri.interpret, x, n_boundaries=m, random_state=0)
        t_gc, _ = timed(gc.attribute, x, target=interp.target)
        clean[i] = (t_ours, interp, t_gc)
    for k, i in enumerate(seeds_idx):
        x = images[i : i + 1]
        t_ours, interp, t_gc = clean[i]
        target = interp.target
        psi_x, _ = ri.transform(x)
        psi_x = psi_x[0]
        cand = choose_candidates(preds, target, True, m, 0)
        # our sampler alone on the same candidates (for the second exactness check)
        ours_b = sample_boundaries(head, psi_x, feats[cand], target)
        # the package's own path in parts: sampler + packed match of all references
        # (through the leading linear layer's output when it applies), then the greedy
        with torch.no_grad():
            seed_logits = model(x)
        t_sample, sampled = timed(
            sample_and_match,
            UserHead(head, ri.layout_),
            psi_x,
            ri.references_,
            cand,
            target,
            20,
            seed_logits=seed_logits,
        )
        t_cover, _ = timed(greedy_cover_bits, sampled.failing, preds == target)
        parts.append((t_sample, t_cover))
        if k < n_port:
            t0 = time.perf_counter()
            wp, bp = port_sample(head, psi_x, feats[cand], target)
            sel_port_run = port_greedy(
                feats.numpy(), wp.numpy(), bp.numpy(), (preds == target).numpy()
            )
            t_port = time.perf_counter() - t0
            # exactness 1: both pipelines on the port's W, b
            sel_o, sel_p, n_diff = _selections_agree(feats, preds, target, wp, bp)
            assert sel_p == sel_port_run
            same_port = sel_o == sel_p
            assert same_port, f"seed {i}, port's W, b: ours {sel_o} vs port {sel_p}"
            q, s_len = len(wp), len(sel_p)
        else:
            t_port, same_port, n_diff, q, s_len = math.nan, None, -1, len(ours_b), -1
        # exactness 2: both pipelines on our sampler's W, b
        sel_o2, sel_p2, n_diff2 = _selections_agree(
            feats, preds, target, ours_b.weight, ours_b.bias
        )
        same_ours = sel_o2 == sel_p2
        assert same_ours, f"seed {i}, our W, b: ours {sel_o2} vs port {sel_p2}"
        rows.append((t_ours, t_port, t_gc))
        print(
            f"{i:>5} {target:>3} {t_ours:7.3f} {t_port:8.3f} {t_port / t_ours:8.1f}x "
            f"{t_gc:7.4f} {t_ours / t_gc:7.1f}x {q:>4} {s_len:>4} {max(n_diff, n_diff2):>4} "
            f"{'-' if same_port is None else str(same_port):>14} {str(same_ours):>13}"
        )
    ours_t = [r[0] for r in rows]
    port_t = [r[1] for r in rows if not math.isnan(r[1])]
    ours_p = ours_t[: len(port_t)]
    gc_t = [r[2] for r in rows]
    mean = statistics.fmean
    print(
        f"mean over {len(ours_t)} seeds: ours {mean(ours_t):.3f} s, LayerGradCam "
        f"{mean(gc_t):.4f} s -> ours / LayerGradCam = {mean(ours_t) / mean(gc_t):.1f}x"
    )
    print(
        f"mean over the {len(port_t)} seeds with the port: port {mean(port_t):.3f} s, ours "
        f"{mean(ours_p):.3f} s -> port / ours = {mean(port_t) / mean(ours_p):.1f}x"
    )
    ps = [mean(c) for c in zip(*parts)]
    print(
        f"ours in parts (mean, same candidates): sampler + packed match of all references "
        f"{ps[0]:.4f} s, greedy cover {ps[1]:.4f} s"
    )
    return {
        "port_over_ours": mean(port_t) / mean(ours_p),
        "ours_over_gc": mean(ours_t) / mean(gc_t),
    }


# ---------------------------------------------------------------------- part 4
def scale_child(n: int, mode: str, m: int, workdir: str) -> dict[str, float]:
    """One configuration of the scaling table (runs in its own process).

    The synthetic inputs are written first, chunk by chunk, to a raw ``.npy`` file and
    read back memory-mapped (copy-on-write), so generating them costs no anonymous memory
    inside the measured steps: the fit peak is the fit's own memory.
    """
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
    src_path = os.path.join(workdir, f"inputs_{n}_{mode}.npy")
    src = np.lib.format.open_memmap(src_path, "w+", np.float32, (n, base.shape[1]))
    for s in range(0, n, chunk):
        count = min(chunk, n - s)
        idx = torch.randint(0, base.shape[0], (count,), generator=gen)
        noise = 0.05 * std * torch.randn(count, base.shape[1], generator=gen)
        src[s : s + count] = (base[idx] + noise).relu().numpy()
    src.flush()
    del src
    inputs = torch.from_numpy(np.load(src_path, mmap_mode="c"))

    with PeakAnon(interval=0.002) as fit_mem:
        t = time.perf_counter()
        if mode == "ram":
            ri.fit(inputs, batch_size=1024, progress=False)
        else:
            path = os.path.join(workdir, f"store_{n}")
            for s in range(0, n, chunk):
                ri.fit(
                    inputs[s : s + chunk],
                    batch_size=1024,
                    progress=False,
                    store=path,
                    append=True,
                )
        t_fit = time.perf_counter() - t
    with torch.no_grad():
        psi = model.features(seed_x).reshape(1, -1)
    times = []
    with PeakAnon(interval=0.002) as seed_mem:
        for _ in range(2):
            t = time.perf_counter()
            ri.interpret(psi, n_boundaries=m, random_state=0)
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


def scaling(configs: list[tuple[int, str]], m: int) -> None:
    print(f"\n== scaling with N (D = 1568, m = {m}; synthetic features) ==")
    print(
        "peak MB = peak RssAnon (anonymous resident memory, /proc/self/status, sampled every "
        "2 ms) above its level before the step;\none fresh subprocess per row; seed s = best "
        "of 2 calls of ri.interpret on one seed"
    )
    print(
        f"{'N':>9} {'store':>5} {'features MB':>11} {'fit s':>7} {'fit peak MB':>11} "
        f"{'seed s':>7} {'s per 1M refs':>13} {'seed peak MB':>12} {'peak/features':>13}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for n, mode in configs:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), mode, str(m), tmp],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            peak = max(r["fit_peak_mb"], r["seed_peak_mb"])
            print(
                f"{r['n']:>9,} {r['mode']:>5} {r['features_mb']:>11.0f} {r['fit_s']:>7.2f} "
                f"{r['fit_peak_mb']:>11.0f} {r['seed_s']:>7.3f} "
                f"{r['seed_s'] / r['n'] * 1e6:>13.1f} {r['seed_peak_mb']:>12.0f} "
                f"{peak / r['features_mb']:>12.2f}x",
                flush=True,
            )


def _parse_configs(text: str) -> list[tuple[int, str]]:
    configs = []
    for item in text.split(","):
        n, _, mode = item.strip().partition(":")
        mode = mode or "ram"
        if mode not in ("ram", "disk"):
            raise ValueError(f"--sizes: store must be ram or disk, got {mode!r} in {item!r}")
        configs.append((int(n), mode))
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds for ours and LayerGradCam")
    parser.add_argument(
        "--port-seeds", type=int, default=3, help="of those, seeds also run with the port"
    )
    parser.add_argument("--m", type=int, default=50)
    parser.add_argument(
        "--sizes",
        type=str,
        default="1000:ram,10000:ram,100000:ram,100000:disk,300000:disk",
        help="comma-separated N:store, store = ram (in RAM) or disk (fit(..., store=path))",
    )
    parser.add_argument("--skip-per-seed", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        n, mode, m, workdir = args.child
        print(json.dumps(scale_child(int(n), mode, int(m), workdir)))
        return
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, numpy {np.__version__}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    t0 = time.perf_counter()
    if not args.skip_per_seed:
        per_seed_and_fit(args.seeds, min(args.port_seeds, args.seeds), args.m)
    scaling(_parse_configs(args.sizes), args.m)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
