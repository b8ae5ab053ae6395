"""Packed bit rows: one bit per reference, 64 to a machine word.

The match of every reference against every boundary is kept as packed bits (the match
stage writes them, the greedy cover counts them), so a seed's memory is ``N x m / 8``
bytes instead of ``N x m`` floats. Bit ``r % 64`` of word ``r // 64`` is reference ``r``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_rows", "unpack_rows"]


def pack_rows(rows: np.ndarray) -> np.ndarray:
    """bool ``k x n`` -> uint64 ``k x ceil(n / 64)``, the bits past ``n`` zero."""
    k, n = rows.shape
    words = max(1, -(-n // 64))
    packed = np.packbits(rows, axis=1, bitorder="little")  # k x ceil(n / 8), zero-padded
    if packed.shape[1] != 8 * words:
        full = np.zeros((k, 8 * words), dtype=np.uint8)
        full[:, : packed.shape[1]] = packed
        packed = full
    return packed.view(np.uint64)


def unpack_rows(bits: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` bits of each packed row (``k x words``) as bool ``k x n``."""
    return np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :n].astype(bool)
