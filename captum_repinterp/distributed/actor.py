"""The Ray actor that holds one shard of the references and answers per-seed calls.

Each actor keeps a contiguous block of the features and predictions (in memory, or
memory-mapped from its node's disk) and, per seed, the failing bits of its rows for the
seed's boundaries: the greedy cover's counts, the pruning test and the region's members
are computed where the rows are.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..bits import pack_rows
from ..match import failing_bits, margins
from ..region import _l1_to_rows

_INSTALL_HINT = "pip install captum_repinterp[ray]"


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError that names the extra to install."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - exercised without Ray installed
        raise ImportError(
            f"captum_repinterp.distributed needs Ray; install it with `{_INSTALL_HINT}`"
        ) from exc
    return ray


class ShardLostError(RuntimeError):
    """A shard's actor died and could not be restarted: no partial result is returned."""


class Shard:
    """One contiguous block of the reference set, held by a Ray actor.

    The rows come from ``source`` (object-store arrays or a materialized Ray Dataset) and,
    with ``spill_dir``, are written once to ``.npy`` files on the actor's node and read
    back memory-mapped. A restarted actor loads them again the same way (from the files
    when they are complete), so a shard survives its actor.

    Per seed the actor keeps a *session*: the failing bits of its rows for that seed's
    boundaries. Every method takes what is needed to rebuild it (the boundaries stay in the
    object store, boxed in a list so that Ray does not resolve them eagerly): a call that
    lands on a restarted actor, or after the session was evicted, recomputes the same bits.
    """

    def __init__(
        self,
        source: tuple[str, Any],
        offset: int,
        basis32: np.ndarray | None,
        spill_dir: str | None,
        max_sessions: int = 16,
    ) -> None:
        ray = import_ray()
        self.offset = int(offset)
        self.features, self.predictions = self._load(ray, source, spill_dir)
        self.mmap = spill_dir is not None
        self.projected = None
        if basis32 is not None:
            # as build_projection: features @ A^T in float32, in row chunks
            a32 = torch.from_numpy(np.array(basis32, dtype=np.float32))
            out = torch.empty(self.features.shape[0], a32.shape[0], dtype=torch.float32)
            for s in range(0, out.shape[0], 8192):
                out[s : s + 8192] = self.features[s : s + 8192].to(torch.float32) @ a32.T
            self.projected = out
        self.sessions: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.max_sessions = int(max_sessions)

    @staticmethod
    def _load(ray: Any, source: tuple[str, Any], spill_dir: str | None) -> tuple[Tensor, Tensor]:
        done = None if spill_dir is None else Path(spill_dir) / "complete"
        if done is not None and done.exists():
            feats = np.load(Path(spill_dir) / "features.npy", mmap_mode="r")
            preds = np.load(Path(spill_dir) / "predictions.npy")
        else:
            kind, data = source
            if kind == "arrays":
                feats, preds = ray.get(data[0]), ray.get(data[1])
            else:  # a materialized Ray Dataset with "features" and "prediction" columns
                parts_f, parts_p = [], []
                for batch in data.iter_batches(batch_size=None, batch_format="numpy"):
                    parts_f.append(np.asarray(batch["features"], dtype=np.float32))
                    parts_p.append(np.asarray(batch["prediction"], dtype=np.int64))
                feats = np.concatenate(parts_f) if parts_f else np.zeros((0, 0), np.float32)
                preds = np.concatenate(parts_p) if parts_p else np.zeros(0, np.int64)
            if done is not None:
                path = Path(spill_dir)
                path.mkdir(parents=True, exist_ok=True)
                np.save(path / "features.npy", feats)
                np.save(path / "predictions.npy", preds)
                done.touch()
                feats = np.load(path / "features.npy", mmap_mode="r")
        with warnings.catch_warnings():  # read-only arrays (object store, mmap): never written
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(feats), torch.from_numpy(np.asarray(preds, np.int64))

    # ---------------------------------------------------------------- plain reads
    def info(self) -> dict[str, Any]:
        import resource

        f = self.features
        finite = bool(torch.isfinite(f).all()) if f.numel() else True
        return {
            "n": int(f.shape[0]),
            "dim": int(f.shape[1]) if f.dim() == 2 else 0,
            "finite": finite,
            "feature_bytes": int(f.numel()) * 4,
            "mmap": self.mmap,
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }

    def memory(self) -> dict[str, int]:
        import resource

        with open("/proc/self/statm") as fh:
            rss_pages = int(fh.read().split()[1])
        return {
            "rss": rss_pages * os.sysconf("SC_PAGE_SIZE"),
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "sessions": len(self.sessions),
        }

    def configure(self, max_sessions: int) -> None:
        """How many per-seed sessions the actor keeps (the oldest are dropped first)."""
        self.max_sessions = int(max_sessions)

    def get_predictions(self) -> np.ndarray:
        return self.predictions.numpy()

    def rows(self, local: np.ndarray, which: str) -> np.ndarray:
        table = self.features if which == "features" else self.projected
        # a copy: arrays from the object store are read-only, which torch warns about
        return table[torch.from_numpy(np.array(local, np.int64))].numpy()

    # ---------------------------------------------------------------- per-seed session
    def _session(self, token: str, boxed: list, target: int) -> dict[str, Any]:
        ses = self.sessions.get(token)
        if ses is not None:
            self.sessions.move_to_end(token)
            return ses
        weight, bias, u = import_ray().get(boxed[0])
        if u is None:  # the same calls as boundaries.sample_and_match
            fail = failing_bits(self.features, weight, bias)
        else:
            fail = failing_bits(self.projected, u.to("cpu", torch.float32), bias.to("cpu"))
        pos = (self.predictions == target).numpy()
        pos_bits, neg_bits = pack_rows(pos[None])[0], pack_rows(~pos[None])[0]
        ses = {
            "fail": fail,
            "pn": np.stack([pos_bits, neg_bits]),
            "weight": weight,
            "bias": bias,
            "u": u,
            "last": ((), None),
        }
        self.sessions[token] = ses
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        return ses

    def start(self, token: str, boxed: list, target: int) -> int:
        """Compute the session's bits; the negatives no candidate pushes out."""
        ses = self._session(token, boxed, target)
        fail = ses["fail"]
        if fail.shape[0]:
            separated = np.bitwise_or.reduce(fail, axis=0)
        else:
            separated = np.zeros_like(ses["pn"][1])
        return int(np.bitwise_count(ses["pn"][1] & ~separated).sum(dtype=np.int64))

    def _inside_pn(self, ses: dict[str, Any], picks: Sequence[int]) -> np.ndarray:
        picks = tuple(int(j) for j in picks)
        last_picks, last = ses["last"]
        fail = ses["fail"]
        if last is not None and picks[: len(last_picks)] == last_picks:
            inside, todo = last, picks[len(last_picks) :]
        else:
            inside, todo = ses["pn"], picks
        for j in todo:
            inside = inside & ~fail[j]
        ses["last"] = (picks, inside)
        return inside

    def counts(
        self, token: str, boxed: list, target: int, picks: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        ses = self._session(token, boxed, target)
        inside = self._inside_pn(ses, picks)
        both = np.bitwise_count(ses["fail"][:, None, :] & inside).sum(axis=2, dtype=np.int64)
        return both[:, 0], both[:, 1]

    def necessary(self, token: str, boxed: list, target: int, j: int, others: list[int]) -> bool:
        fail = self._session(token, boxed, target)["fail"]
        alone = fail[j].copy()
        for k in others:
            alone &= ~fail[k]
        return bool(alone.any())

    def region(
        self, token: str, boxed: list, target: int, selected: list[int], seed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows inside the region (local indices) and their margins (or L1 distances to
        the seed when nothing was selected); the session ends."""
        ses = self._session(token, boxed, target)
        n = int(self.features.shape[0])
        fail = ses["fail"]
        out = np.zeros(fail.shape[1], dtype=np.uint64)
        for j in selected:
            out |= fail[j]
        inside = ~np.unpackbits(out.view(np.uint8), bitorder="little")[:n].astype(bool)
        members = torch.from_numpy(np.flatnonzero(inside))
        sel = torch.as_tensor(list(selected), dtype=torch.long)
        if sel.numel():
            bias = ses["bias"][sel]
            if ses["u"] is None:  # as SampledBoundaries.margins
                vals = margins(self.features[members], ses["weight"][sel], bias)
            else:  # as Projection.margins_rows
                vals = torch.addmm(
                    bias.to("cpu", torch.float32),
                    self.projected[members].to(torch.float32),
                    ses["u"][sel].to("cpu", torch.float32).T,
                )
        else:
            vals = _l1_to_rows(self.features, members, torch.from_numpy(seed))
        self.sessions.pop(token, None)
        return members.numpy(), vals.numpy()

    def end(self, token: str) -> None:
        self.sessions.pop(token, None)
