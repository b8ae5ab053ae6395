"""Per-seed time and memory of the sharded reference set against the local one.

Synthetic references: ``N`` random feature vectors of ``D`` numbers, used as the output of
an identity "layer" followed by a small MLP head (ReLU first, so the per-seed work is the
full ``N x D x m`` product, not the projection shortcut). For N = 10k and 100k it times
``interpret`` on single seeds with the references in RAM, in an on-disk store, and split
over 1, 2 and 4 Ray actors, and reads each actor's resident memory.

Run (a local two-CPU cluster is started and stopped here)::

    OMP_NUM_THREADS=1 python benchmarks/ray_speed.py [--dim 512] [--seeds 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from captum_repinterp import RepresentativeInterpretation  # noqa: E402


def model_for(dim: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Identity(), nn.ReLU(), nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 10)
    ).eval()


def per_seed(ri: RepresentativeInterpretation, seeds: torch.Tensor) -> tuple[float, list]:
    ri.interpret(seeds[:1], n_boundaries=50)  # warm-up
    times, out = [], []
    for i in range(seeds.shape[0]):
        t = time.perf_counter()
        out.append(ri.interpret(seeds[i : i + 1], n_boundaries=50))
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    import ray

    from captum_repinterp.distributed import shard_references

    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}},
    )
    print(f"D = {args.dim}, m = 50 candidate boundaries, median of {args.seeds} seeds, "
          f"1 thread per process, {os.cpu_count()} cores")  # fmt: skip
    print()
    print("| N | references | per seed (s) | memory | same selection |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(n, args.dim, generator=gen).abs()
        seeds = torch.randn(args.seeds, args.dim, generator=gen).abs()
        model = model_for(args.dim)
        mb = n * args.dim * 4 / 2**20
        local = RepresentativeInterpretation(model, model[0]).fit(
            x, batch_size=4096, progress=False
        )
        t_local, ref = per_seed(local, seeds)
        print(f"| {n:,} | in RAM (driver) | {t_local:.3f} | features {mb:.0f} MB in the "
              f"driver (RSS {rss_mb():.0f} MB) | - |")  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            stored = RepresentativeInterpretation(model, model[0]).fit(
                x, batch_size=4096, progress=False, store=Path(tmp) / "store"
            )
            t_store, got = per_seed(stored, seeds)
            same = all(torch.equal(a.weight, b.weight) and torch.equal(a.members, b.members)
                       for a, b in zip(ref, got))  # fmt: skip
            print(f"| {n:,} | on-disk store | {t_store:.3f} | memory-mapped | {same} |")
            del stored
        for k in args.actors:
            ri = RepresentativeInterpretation(model, model[0]).fit(
                x, batch_size=4096, progress=False
            )
            shard_references(ri, n_actors=k, progress=False)
            refs = ri.references_
            t_shard, got = per_seed(ri, seeds)
            same = all(torch.equal(a.weight, b.weight) and torch.equal(a.members, b.members)
                       for a, b in zip(ref, got))  # fmt: skip
            mem = refs.memory()
            rss = max(m["rss"] for m in mem) / 2**20
            shard_mb = mb / k
            print(f"| {n:,} | {k} actor{'s' if k > 1 else ''} | {t_shard:.3f} | shard "
                  f"{shard_mb:.0f} MB per actor (object store), actor RSS max {rss:.0f} MB "
                  f"| {same} |")  # fmt: skip
            refs.shutdown()
            del ri, refs
        del local
    print()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"driver peak RSS {peak:.0f} MB")
    ray.shutdown()


if __name__ == "__main__":
    main()
