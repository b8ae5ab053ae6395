"""Stage 3: which references lie on the seed's side of each boundary.

``margins`` is one ``N x D`` by ``D x k`` product computed in chunks of references, so
memory stays bounded for large ``N``; the match matrix is its sign. ``failing_bits``
keeps only that sign, packed 64 references to a word chunk by chunk, so the ``N x k``
floats are never held at once (one bit per entry instead of 32). The semantic distance
of the paper, ``sum_j |w_j . psi(x) - w_j . psi(r)|``, is a sum of margin differences.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["failing_bits", "margins", "semantic_distance"]

DEFAULT_CHUNK = 8192


def margins(
    features: Tensor, weight: Tensor, bias: Tensor, chunk_size: int = DEFAULT_CHUNK
) -> Tensor:
    """``features @ weight.T + bias`` (``N x k``, float32), computed in row chunks.

    ``features`` may live on another device than ``weight`` (e.g. references on the CPU,
    boundaries on a GPU): the boundaries are moved to the features' device.
    """
    _check_shapes(features, weight)
    w = weight.to(features.device, torch.float32)
    b = bias.to(features.device, torch.float32)
    n = features.shape[0]
    out = torch.empty(n, w.shape[0], dtype=torch.float32, device=features.device)
    for s in range(0, n, chunk_size):
        chunk = features[s : s + chunk_size].to(torch.float32)
        torch.addmm(b, chunk, w.T, out=out[s : s + chunk_size])
    return out


def _check_shapes(features: Tensor, weight: Tensor) -> None:
    if features.dim() != 2 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"features ({tuple(features.shape)}) and weight ({tuple(weight.shape)}) must be "
            "N x D and k x D"
        )


def failing_bits(
    features: Tensor, weight: Tensor, bias: Tensor, chunk_size: int = DEFAULT_CHUNK
) -> np.ndarray:
    """Packed ``not (features @ weight.T + bias > 0)``, chunk by chunk.

    Returns
    -------
    numpy.ndarray
        uint64 ``k x ceil(N / 64)``: bit ``r % 64`` of word ``r // 64`` of row ``j`` is
        set when reference ``r`` is not on the positive side of boundary ``j`` (NaN
        features included), the bits past ``N`` zero: the input of
        :func:`~captum_repinterp.solver.greedy_cover_bits`. The margins are the same
        float32 products as :func:`margins`, computed ``k x chunk`` at a time.
    """
    _check_shapes(features, weight)
    n, k = features.shape[0], weight.shape[0]
    step = max(64, chunk_size // 64 * 64)  # whole words per chunk
    out = np.zeros((k, 8 * max(1, -(-n // 64))), dtype=np.uint8)
    w = weight.to(features.device, torch.float32)
    b = bias.to(features.device, torch.float32)[:, None]
    # one margin buffer and one sign buffer for all chunks (fresh per-chunk temporaries
    # can leave glibc's heap fragmented, see the fit in features.py)
    size = k * min(step, n)
    marg = torch.empty(size, dtype=torch.float32, device=features.device)
    fails = np.empty(size, dtype=bool)
    for s in range(0, n, step):
        chunk = features[s : s + step].to(torch.float32)
        c = chunk.shape[0]
        m = torch.addmm(b, w, chunk.T, out=marg[: k * c].view(k, c)).cpu().numpy()
        f = fails[: k * c].reshape(k, c)
        np.logical_not(np.greater(m, 0, out=f), out=f)  # NaN margins fail; numpy: cheaper
        packed = np.packbits(f, axis=1, bitorder="little")
        out[:, s // 8 : s // 8 + packed.shape[1]] = packed
    return out.view(np.uint64)


def semantic_distance(seed_margins: Tensor, other_margins: Tensor) -> Tensor:
    """``sum_j |h_j(x) - h_j(x')|`` for each row of ``other_margins`` (``n x k``).

    Equal to ``sum_j |w_j . psi(x) - w_j . psi(x')|`` since the biases cancel.
    """
    diff = other_margins.double() - seed_margins.double().to(other_margins.device)[None]
    return diff.abs().sum(dim=1)
