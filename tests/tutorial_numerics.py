"""A fingerprint of this machine's floating-point arithmetic for the tutorials' work.

The tutorials train a small CNN (seeded) and print numbers that follow from its weights.
Seeded training is reproducible on one machine, but not across CPUs: torch picks its
convolution and matrix kernels by instruction set (AVX2, AVX-512, ...) and thread count,
and their rounding differs, so a few hundred optimiser steps end at slightly different
weights, and the printed regions differ. The fingerprint is a hash of a few Adam steps of
the tutorials' CNN (two threads, as the tutorials set) and of its outputs: two machines
with the same fingerprint run the same kernels with the same rounding.

``scripts/execute_tutorials.py`` records it in each notebook's metadata; the tutorial
test compares the printed numbers exactly only where the fingerprint matches.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from captum_repinterp.models import SmallCNN

#: The notebook metadata key under which the fingerprint is recorded.
METADATA_KEY = "captum_repinterp"


def fingerprint(steps: int = 5) -> str:
    """Hex digest (16 characters) of a few training steps of ``SmallCNN`` on fixed data."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(64, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (64,), generator=gen)
        model = SmallCNN()
        with torch.no_grad():  # initial weights from the generator, not the global seed
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        digest = hashlib.sha256()
        for t in model.state_dict().values():
            digest.update(t.detach().contiguous().numpy().tobytes())
        with torch.no_grad():
            digest.update(model.eval()(x).numpy().tobytes())
        return digest.hexdigest()[:16]
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    print(fingerprint())
