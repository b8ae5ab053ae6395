"""Beyond one machine: a reference set split over Ray actors, seeds run as Ray tasks.

The per-seed work of a representative interpretation has one heavy part that grows with
the reference set, the ``N x D`` by ``D x m`` product that tells which references lie on
the seed's side of each sampled boundary, and one light part that grows with nothing but
``m``: sampling the boundaries with the head. This module puts each part where it is
cheap:

- :func:`fit_sharded` runs the model over the references with Ray Data (``map_batches``
  on the workers, the model built there by a factory you give) and leaves the features in
  shards, each held by a Ray actor (in memory, or memory-mapped from the node's disk);
  :func:`shard_references` does the same with an explainer fitted locally.
- Per seed, the boundaries are sampled where the head is (only the candidates' rows are
  fetched), each actor computes the failing bits of its shard once, the greedy cover runs
  on counts summed over the shards (:func:`~captum_repinterp.solver.greedy_cover_oracle`,
  the same pick rule as the local solver), and the members and their margins are gathered
  at the end. The selection is that of the local path on the same references.
- A batch of seeds (``interpret``, ``attribute``) and the classes of an ``audit`` run as
  Ray tasks, in parallel, with the results in the same order as the local path.

The switch is one call: after ``fit_sharded(ri, ...)`` or ``shard_references(ri)`` the
explainer's ``interpret``, ``attribute`` and ``audit`` use the shards. Ray is optional:
``pip install captum_repinterp[ray]``.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ._captum_compat import TargetType
from .attribution import RepresentativeInterpretation
from .bits import pack_rows
from .boundaries import sample_candidates
from .features import LayerLayout, eval_mode, extract_features, model_device
from .inputs import InputSpec
from .interpretation import Interpretation
from .layers import warn_nonlinear_head
from .match import failing_bits, margins
from .options import InterpretOptions
from .projection import (
    AffineHead,
    LeadingMap,
    Projection,
)
from .reader import LayerReader
from .references import study_head
from .region import (
    Seed,
    _l1_to_rows,
    _warn_no_boundary,
    assemble_interpretation,
    interpret_seed,
    read_seeds,
)
from .sampler import choose_candidates
from .solver import greedy_cover_oracle
from .tracing import warn_probability_output

__all__ = ["ShardLostError", "ShardedReferences", "fit_sharded", "shard_references"]

_INSTALL_HINT = "pip install captum_repinterp[ray]"


def _ray() -> Any:
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


# ---------------------------------------------------------------------- the shard actor
class _Shard:
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
        ray = _ray()
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
        return table[torch.from_numpy(np.asarray(local, np.int64))].numpy()

    # ---------------------------------------------------------------- per-seed session
    def _session(self, token: str, boxed: list, target: int) -> dict[str, Any]:
        ses = self.sessions.get(token)
        if ses is not None:
            self.sessions.move_to_end(token)
            return ses
        weight, bias, u = _ray().get(boxed[0])
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


# ---------------------------------------------------------------------- driver side
class _Rows:
    """Rows of a sharded table, fetched from the actors that hold them (``table[index]``)."""

    def __init__(self, refs: ShardedReferences, which: str, dim: int) -> None:
        self.refs = refs
        self.which = which
        self.dim = dim
        self.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.refs.n, self.dim))

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, slice):
            idx = np.arange(self.shape[0])[index]
        else:
            idx = torch.as_tensor(index).reshape(-1).cpu().numpy().astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for {self.shape[0]} references")
        return self.refs._fetch_rows(idx, self.which, int(self.shape[1]))


class ShardedReferences:
    """A fitted reference set split into contiguous shards held by Ray actors.

    It answers what the per-seed code asks of a local
    :class:`~captum_repinterp.references.FittedReferences` (``predictions``, ``layout``,
    ``example``, ``projection``, ``features[rows]``, ...), keeps the ``N x D`` features in
    the actors, and runs seeds and audit classes itself (``find_regions``,
    ``map_classes``). Build it with :func:`fit_sharded` or :func:`shard_references`.

    Attributes
    ----------
    features : row fetcher
        ``features[index]`` fetches those rows (``len(index) x D`` float32) from the
        actors; ``features.shape`` is ``(N, D)``. The whole matrix is never gathered.
    predictions : Tensor
        ``N`` int64, on the driver (8 bytes per reference).
    offsets : list of int
        First reference of each shard; shard ``i`` holds ``offsets[i]:offsets[i + 1]``.
    actors : list
        The Ray actor handles, one per shard.
    """

    store = None
    #: the references' logits kept by a local fit (``shard_references``), else None
    logits: Tensor | None = None
    #: the reference images when they were given as one tensor (a handle, no copy),
    #: else None
    inputs: Tensor | None = None
    #: what the references were read from (tensor, Dataset, DataLoader; a handle), else
    #: None: ``heatmap_layer="auto"`` scores a sample of its images
    source: Any = None

    def __init__(
        self,
        actors: list,
        offsets: list[int],
        predictions: Tensor,
        layout: LayerLayout,
        attribute_to_layer_input: bool,
        example: Any,
        head_nonlinear: tuple[str, ...],
        projection: Projection | None,
        sources: list,
        n_total: int,
        progress: bool = True,
        leading: LeadingMap | None = None,
        affine: AffineHead | None = None,
    ) -> None:
        self.leading = leading  # nothing per reference in either (see projection.py)
        self.affine = affine
        self.actors = list(actors)
        self.offsets = list(offsets)
        self._n_total = int(n_total)
        self.predictions = predictions
        self.layout = layout
        self.attribute_to_layer_input = attribute_to_layer_input
        self.example = example
        self.head_nonlinear = head_nonlinear
        self.progress = progress
        self._sources = sources  # keeps the shards' object-store copies alive for restarts
        self.features = _Rows(self, "features", layout.dim)
        self.projection = None
        if projection is not None:
            self.projection = Projection(
                projection.basis,
                projection.gram,
                _Rows(self, "projected", int(projection.basis.shape[0])),  # type: ignore[arg-type]
                module=projection.module,
                offset=projection.offset,
                tol=projection.tol,
            )

    @property
    def n(self) -> int:
        """Number of references ``N``."""
        return int(self.predictions.shape[0])

    @property
    def input_spec(self) -> InputSpec:
        """Per-example shapes and dtypes of the reference inputs."""
        return self.example.spec

    @property
    def n_shards(self) -> int:
        """Number of shards (actors)."""
        return len(self.actors)

    def __repr__(self) -> str:
        return (
            f"ShardedReferences(n={self.n}, dim={self.layout.dim}, shards={self.n_shards}, "
            f"projection={self.projection is not None})"
        )

    # ---------------------------------------------------------------- actor calls
    def _gather(self, calls: list, what: str) -> list:
        """``ray.get`` of one call per shard; a dead shard is an error, never a gap."""
        ray = _ray()
        try:
            return ray.get(calls)
        except ray.exceptions.RayActorError as exc:
            bad = [i for i, c in enumerate(calls) if _failed(ray, c)]
            where = ", ".join(
                f"shard {i} (references {self.offsets[i]}..{self._stop(i) - 1})" for i in bad
            )
            raise ShardLostError(
                f"{what}: the actor holding {where or 'a shard'} died and could not be "
                "restarted; nothing partial is returned. Give fit_sharded a larger "
                f"max_restarts, or shard the references again. ({exc})"
            ) from exc

    def _stop(self, i: int) -> int:
        return self.offsets[i + 1] if i + 1 < len(self.offsets) else self._n_total

    def _fetch_rows(self, idx: np.ndarray, which: str, dim: int) -> Tensor:
        shard = np.searchsorted(np.asarray(self.offsets), idx, side="right") - 1
        calls, where = [], []
        for i in np.unique(shard).tolist():
            pos = np.flatnonzero(shard == i)
            calls.append(self.actors[i].rows.remote(idx[pos] - self.offsets[i], which))
            where.append(pos)
        out = torch.empty(len(idx), dim, dtype=torch.float32)
        for pos, rows in zip(where, self._gather(calls, "fetching rows")):
            out[torch.from_numpy(pos)] = torch.from_numpy(np.array(rows))
        return out

    def memory(self) -> list[dict[str, int]]:
        """Resident and peak memory (bytes) of each actor's process."""
        return self._gather([a.memory.remote() for a in self.actors], "memory")

    # ---------------------------------------------------------------- one seed
    def find_region(
        self,
        reader: LayerReader,
        head: Callable[..., Tensor],
        seed_features: Tensor,
        seed_logits: Tensor,
        target: int,
        options: InterpretOptions,
    ) -> Interpretation:
        """The representative interpretation of one seed, as
        :func:`~captum_repinterp.region.find_region` on the same references."""
        ray = _ray()
        n_classes = seed_logits.shape[1]
        if not 0 <= target < n_classes:
            raise ValueError(f"target {target} is out of range for {n_classes} classes")
        seed_in_class = int(seed_logits.argmax(dim=1)[0]) == target
        preds = self.predictions
        candidates = choose_candidates(
            preds, target, seed_in_class, options.n_boundaries, options.random_state
        )
        bounds, u = sample_candidates(
            head, seed_features, self, candidates, target, options.bisection_steps,
            seed_logits=seed_logits,
        )  # fmt: skip
        positive = preds == target
        negative = ~positive
        token = uuid.uuid4().hex
        boxed = [ray.put((bounds.weight, bounds.bias, u))]
        key = (token, boxed, int(target))
        try:
            unseparated = sum(self._gather([a.start.remote(*key) for a in self.actors], "matching"))

            def counts(picks: list[int]) -> tuple[np.ndarray, np.ndarray]:
                parts = self._gather(
                    [a.counts.remote(*key, picks) for a in self.actors], "greedy cover"
                )
                return (
                    np.sum([p[0] for p in parts], axis=0, dtype=np.int64),
                    np.sum([p[1] for p in parts], axis=0, dtype=np.int64),
                )

            def necessary(j: int, others: list[int]) -> bool:
                calls = [a.necessary.remote(*key, j, others) for a in self.actors]
                return any(self._gather(calls, "pruning"))

            picks, d, need = greedy_cover_oracle(
                len(bounds),
                int(negative.sum()),
                counts,
                lambda: unseparated,
                necessary,
                delta=options.delta,
                refine=options.refine,
            )
            psi_x = seed_features.detach().cpu()
            parts = self._gather(
                [a.region.remote(*key, picks, psi_x.numpy()) for a in self.actors], "members"
            )
        finally:
            for a in self.actors:
                a.end.remote(token)
        sel = torch.tensor(picks, dtype=torch.long)
        if sel.numel() == 0:
            _warn_no_boundary(len(bounds), candidates.numel(), target)
        members = torch.from_numpy(
            np.concatenate([p[0] + off for p, off in zip(parts, self.offsets)]).astype(np.int64)
        )
        vals = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        inside = torch.zeros(self.n, dtype=torch.bool)
        inside[members] = True
        reached = int((negative & ~inside).sum()) >= need
        return assemble_interpretation(
            self, reader, bounds, sel, members, vals, psi_x, target, seed_in_class, d, reached,
            options,
        )  # fmt: skip

    # ---------------------------------------------------------------- many seeds
    def find_regions(
        self,
        reader: LayerReader,
        inputs: Any,
        target: TargetType,
        additional_forward_args: Any,
        options: InterpretOptions,
    ) -> tuple[list[Interpretation], tuple[Tensor, ...]]:
        """As :func:`~captum_repinterp.region.find_regions`; a batch of seeds runs as Ray
        tasks (one per seed), the results in the order of ``inputs``."""
        ray = _ray()
        seeds, activations = read_seeds(
            self, reader, inputs, target, additional_forward_args, options
        )
        n = len(seeds)
        if n <= 1:
            return [interpret_seed(self, reader, seed, options) for seed in seeds], activations
        payload = ray.put((self, reader, options))
        task = ray.remote(_seed_task).options(max_retries=3)
        pending = {task.remote(payload, seed): i for i, seed in enumerate(seeds)}
        results: list[Interpretation | None] = [None] * n
        for i, interp in _as_completed(ray, pending, "interpret", options.progress):
            interp.reader, interp.heatmap_layer = reader, options.heatmap_layer
            results[i] = interp
        return results, activations  # type: ignore[return-value]

    def map_classes(
        self,
        fn: Callable,
        ri: Any,
        images: Tensor,
        feats: Tensor,
        preds: Tensor,
        held: Any,
        classes: list[int],
        args: tuple,
    ) -> list:
        """``[fn(ri, images, feats, preds, held, c, *args) for c in classes]`` with one Ray
        task per class (the audit of one class; its seeds depend on each other)."""
        ray = _ray()
        payload = ray.put((ri, images, feats, preds, held, args))
        task = ray.remote(_class_task).options(max_retries=3)
        pending = {task.remote(payload, fn, c): k for k, c in enumerate(classes)}
        out: list = [None] * len(classes)
        heatmap_layer = args[-1].get("heatmap_layer")
        for k, result in _as_completed(ray, pending, "audit classes", self.progress):
            for region in result.regions:
                if region.interpretation is not None:
                    region.interpretation.reader = ri.reader_
                    region.interpretation.heatmap_layer = heatmap_layer
            out[k] = result
        return out

    def shutdown(self) -> None:
        """Stop the actors (the shards are gone afterwards)."""
        ray = _ray()
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        self._sources = []


def _failed(ray: Any, ref: Any) -> bool:
    try:
        ray.get(ref, timeout=0)
        return False
    except ray.exceptions.RayActorError:
        return True
    except Exception:  # noqa: BLE001 - not ready or another error: not this shard's death
        return False


def _as_completed(ray: Any, pending: dict, desc: str, progress: bool):
    """``(position, result)`` of Ray tasks as they finish, with a progress bar."""
    left = list(pending)
    with tqdm(total=len(left), desc=desc, disable=not progress) as bar:
        while left:
            done, left = ray.wait(left, num_returns=1)
            for ref in done:
                yield pending[ref], ray.get(ref)
                bar.update(1)


def _seed_task(payload: tuple, seed: Seed) -> Interpretation:
    refs, reader, options = payload
    interp = interpret_seed(refs, reader, seed, options)
    interp.reader = interp.heatmap_layer = None  # the driver puts its own back
    return interp


def _class_task(payload: tuple, fn: Callable, c: int) -> Any:
    ri, images, feats, preds, held, args = payload
    result = fn(ri, images, feats, preds, held, c, *args)
    for region in result.regions:
        if region.interpretation is not None:
            region.interpretation.reader = region.interpretation.heatmap_layer = None
    return result


# ---------------------------------------------------------------------- building shards
def _split_points(n: int, n_shards: int) -> list[int]:
    """Starts of ``n_shards`` contiguous shards whose sizes differ by at most one."""
    if n_shards < 1:
        raise ValueError(f"n_actors must be >= 1, got {n_shards}")
    if n_shards > n:
        raise ValueError(f"n_actors ({n_shards}) is larger than the number of references ({n})")
    return [i * n // n_shards for i in range(n_shards)]


def _check_actor_args(
    ri: object, n_actors: object, max_restarts: object, actor_options: object
) -> None:
    """Argument checks shared by :func:`shard_references` and :func:`fit_sharded`, run
    before Ray is started."""
    if not isinstance(ri, RepresentativeInterpretation):
        raise TypeError(f"ri must be a RepresentativeInterpretation, got {type(ri).__name__}")
    for name, value, low in (("n_actors", n_actors, 1), ("max_restarts", max_restarts, -1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if actor_options is not None and not isinstance(actor_options, dict):
        raise TypeError(f"actor_options must be a dict or None, got {type(actor_options).__name__}")


def _start_actors(
    sources: list[tuple[str, Any]],
    offsets: list[int],
    basis32: np.ndarray | None,
    spill_dir: str | os.PathLike | None,
    max_restarts: int,
    actor_options: dict[str, Any] | None,
) -> list:
    ray = _ray()
    opts = {"num_cpus": 0, "max_restarts": max_restarts, "max_task_retries": max_restarts}
    opts.update(actor_options or {})
    cls = ray.remote(_Shard).options(**opts)
    actors = []
    for i, (source, off) in enumerate(zip(sources, offsets)):
        spill = None if spill_dir is None else str(Path(spill_dir) / f"shard-{i:04d}")
        actors.append(cls.remote(source, off, basis32, spill))
    return actors


def _finish(
    ri: Any,
    actors: list,
    offsets: list[int],
    example: Any,
    layout: LayerLayout,
    head_nonlinear: tuple[str, ...],
    projection: Projection | None,
    sources: list,
    progress: bool,
    attribute_to_layer_input: bool,
    n_total: int,
    reader: LayerReader | None = None,
    leading: LeadingMap | None = None,
    affine: AffineHead | None = None,
    logits: Tensor | None = None,
    inputs: Tensor | None = None,
    source: Any = None,
) -> Any:
    refs = ShardedReferences(
        actors, offsets, torch.zeros(0, dtype=torch.long), layout, attribute_to_layer_input,
        example, head_nonlinear, projection, sources, n_total, progress, leading, affine,
    )  # fmt: skip
    refs.logits = logits  # already held by the local fit's process (RAM or its store)
    refs.inputs = inputs
    refs.source = source
    infos = refs._gather([a.info.remote() for a in actors], "loading shards")
    sizes = [info["n"] for info in infos]
    expected = [b - a for a, b in zip(offsets, offsets[1:] + [n_total])]
    if sizes != expected or any(info["dim"] != layout.dim for info in infos if info["n"]):
        raise RuntimeError(f"shards hold {sizes} rows, expected {expected}: the split went wrong")
    preds = refs._gather([a.get_predictions.remote() for a in actors], "predictions")
    refs.predictions = torch.from_numpy(np.concatenate(preds).astype(np.int64))
    if not all(info["finite"] for info in infos):
        warnings.warn(
            "fit: some reference features are NaN or inf; they are kept but can never "
            "be members of a region",
            RuntimeWarning,
            stacklevel=3,
        )
    if not bool((refs.predictions != refs.predictions[0]).any()):
        refs.shutdown()
        raise ValueError(
            "references: the model predicts a single class "
            f"({int(refs.predictions[0])}) for every reference; representative "
            "interpretations need references of at least two predicted classes"
        )
    ri._references = refs
    ri._reader = reader or LayerReader(
        ri.forward_func, ri.layer, layout, example.spec, refs.attribute_to_layer_input, ri.head
    )
    warn_nonlinear_head(head_nonlinear)
    return ri


def shard_references(
    ri: Any,
    n_actors: int = 2,
    spill_dir: str | os.PathLike | None = None,
    max_restarts: int = 3,
    actor_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Any:
    """Move a locally fitted explainer's references into Ray actors.

    Parameters
    ----------
    ri : RepresentativeInterpretation
        Fitted with :meth:`~captum_repinterp.attribution.RepresentativeInterpretation.fit`
        (in RAM or with an on-disk store).
    n_actors : int
        Number of shards, one actor each (contiguous, balanced blocks of references).
    spill_dir : str or os.PathLike, optional
        Each actor writes its shard to ``spill_dir/shard-XXXX/*.npy`` on its node and
        reads it memory-mapped (a node-local path on a real cluster). Default: in memory
        (the actor reads its shard from Ray's object store without copying).
    max_restarts : int
        Restarts of a dead actor (and retries of the call that found it dead); ``-1``
        restarts without limit.
    actor_options : dict, optional
        More ``ray.remote`` options of the actors (``num_cpus`` defaults to 0,
        ``resources``, ``scheduling_strategy``...).
    progress : bool
        Progress bars over seed and class tasks.

    Returns
    -------
    ri
        The same explainer; ``interpret``, ``attribute`` and ``audit`` now use the
        shards (``ri.references_`` is a :class:`ShardedReferences`).
    """
    ray = _ray()
    _check_actor_args(ri, n_actors, max_restarts, actor_options)
    fitted = ri.references_
    if isinstance(fitted, ShardedReferences):
        raise ValueError("ri: its references are sharded already")
    offsets = _split_points(fitted.n, n_actors)
    stops = offsets[1:] + [fitted.n]
    sources = []
    for a, b in zip(offsets, stops):
        feats = np.ascontiguousarray(fitted.features[a:b].numpy(), dtype=np.float32)
        preds = fitted.predictions[a:b].numpy().astype(np.int64)
        sources.append(("arrays", [ray.put(feats), ray.put(preds)]))
    proj = fitted.projection
    basis32 = None if proj is None else proj.basis32.numpy()
    actors = _start_actors(sources, offsets, basis32, spill_dir, max_restarts, actor_options)
    return _finish(
        ri, actors, offsets, fitted.example, fitted.layout, fitted.head_nonlinear, proj,
        sources, progress, fitted.attribute_to_layer_input, fitted.n, reader=ri.reader_,
        leading=fitted.leading, affine=fitted.affine, logits=fitted.logits,
        inputs=fitted.inputs, source=fitted.source,
    )  # fmt: skip


# ---------------------------------------------------------------------- distributed fit
class _Featurize:
    """The Ray Data map: a model built on the worker, run over batches of references."""

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        layer_name: str,
        attribute_to_layer_input: bool,
        column: str,
        batch_size: int,
    ) -> None:
        self.model = model_factory()
        if not isinstance(self.model, nn.Module):
            raise TypeError(
                f"model_factory must return an nn.Module, got {type(self.model).__name__}"
            )
        self.model.eval()
        modules = dict(self.model.named_modules())
        if layer_name not in modules:
            raise ValueError(
                f"model_factory: the model it builds has no layer named {layer_name!r}"
            )
        self.layer = modules[layer_name]
        self.attribute_to_layer_input = attribute_to_layer_input
        self.column = column
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = _batch_tensor(batch[self.column])
        feats, preds, _, _ = extract_features(
            self.model,
            self.layer,
            x,
            batch_size=self.batch_size,
            attribute_to_layer_input=self.attribute_to_layer_input,
            device=model_device(self.model, self.layer),
            progress=False,
        )
        return {"features": feats.numpy(), "prediction": preds.numpy().astype(np.int64)}


def _batch_tensor(values: Any) -> Tensor:
    """A column of a numpy batch as one tensor: a tensor column, or objects (torch
    Dataset items, ``(image, label, ...)`` tuples keep the image)."""
    arr = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if arr.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(arr))
    items = [v[0] if isinstance(v, (tuple, list)) else v for v in arr]
    return torch.stack([torch.as_tensor(np.asarray(v)) for v in items])


def _as_dataset(ray: Any, references: Any, batch_size: int, column: str | None) -> tuple:
    """A Ray Dataset of the references and the column that holds the inputs."""
    if isinstance(references, ray.data.Dataset):
        names = references.columns() or []
        if column is None:
            if len(names) != 1:
                raise ValueError(
                    f"references: the dataset has columns {names}; name the one that holds "
                    "the inputs with column="
                )
            column = names[0]
        elif column not in names:
            raise ValueError(f"column: {column!r} is not a column of references ({names})")
        return references, column
    if isinstance(references, Tensor):
        if references.dim() < 1 or references.shape[0] == 0:
            raise ValueError("references: the reference set is empty (no examples)")
        arr = references.detach().cpu().numpy()
        # one block per batch, so that the workers' batches are those of a local fit
        blocks = [arr[s : s + batch_size] for s in range(0, arr.shape[0], batch_size)]
        return ray.data.from_numpy(blocks), "data"
    if isinstance(references, torch.utils.data.Dataset):
        return ray.data.from_torch(references), "item"
    raise TypeError(
        "references must be a ray.data.Dataset, a torch.Tensor or a torch Dataset, got "
        f"{type(references).__name__}"
    )


def _layer_name(model: Any, layer: nn.Module) -> str:
    if isinstance(model, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name
    raise TypeError(
        "fit_sharded needs forward_func to be an nn.Module that contains the layer, so "
        "that the layer can be found by name in the model built on the workers"
    )


def fit_sharded(
    ri: Any,
    references: Any,
    model_factory: Callable[[], nn.Module] | None = None,
    n_actors: int = 2,
    batch_size: int = 128,
    column: str | None = None,
    attribute_to_layer_input: bool = False,
    spill_dir: str | os.PathLike | None = None,
    concurrency: int | None = None,
    num_cpus: float = 1,
    max_restarts: int = 3,
    actor_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Any:
    """Fit an explainer with Ray: features computed by Ray Data, kept in sharded actors.

    The references go through ``map_batches`` on the Ray workers, each running a model
    built by ``model_factory``; the features and predictions (the same as a local
    :meth:`~captum_repinterp.attribution.RepresentativeInterpretation.fit` with the same
    ``batch_size``) stay in the cluster, split into ``n_actors`` contiguous shards. The
    driver's model runs on the first reference only (the layout, the head's checks and
    the projection shortcut need it), and its features are compared with the workers'.

    Parameters
    ----------
    ri : RepresentativeInterpretation
        The explainer (its ``forward_func`` must be an ``nn.Module`` containing
        ``layer``: the workers find the layer by name).
    references : ray.data.Dataset, Tensor or torch Dataset
        The references, in order. A Ray Dataset gives the inputs in one column
        (``column``; any file reader of Ray Data works, e.g. ``ray.data.read_images``
        followed by a ``map_batches`` that scales the images); a tensor is split into
        blocks of ``batch_size``; a torch Dataset goes through ``ray.data.from_torch``
        (items ``(image, label, ...)`` keep the image).
    model_factory : callable, optional
        ``model_factory() -> nn.Module``, called once on each worker (load weights there).
        Default: a copy of ``ri.forward_func`` sent to the workers.
    n_actors : int
        Number of shards, one actor each.
    batch_size : int
        Batch size of the workers' forward passes.
    column : str, optional
        The column of a Ray Dataset with the inputs (default: its only column).
    attribute_to_layer_input : bool
        Split at the layer's input instead of its output.
    spill_dir, max_restarts, actor_options, progress
        As in :func:`shard_references`.
    concurrency : int, optional
        Most model workers of ``map_batches`` (default ``n_actors``; fewer start when
        the cluster has fewer free CPUs).
    num_cpus : float
        CPUs reserved by each model worker.

    Returns
    -------
    ri
        The same explainer, fitted: ``ri.references_`` is a :class:`ShardedReferences`.

    Raises
    ------
    ImportError
        Without Ray (``pip install captum_repinterp[ray]``).
    TypeError, ValueError
        Naming the argument, as :meth:`fit`; ``model_factory`` also when its model gives
        other features than ``ri.forward_func`` on the first reference.
    """
    ray = _ray()
    _check_actor_args(ri, n_actors, max_restarts, actor_options)
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise ValueError(f"concurrency must be a positive int or None, got {concurrency!r}")
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or not num_cpus > 0:
        raise ValueError(f"num_cpus must be a positive number, got {num_cpus!r}")
    if not isinstance(attribute_to_layer_input, bool):
        raise TypeError("attribute_to_layer_input must be a bool")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if model_factory is not None and not callable(model_factory):
        raise TypeError(f"model_factory must be callable, got {type(model_factory).__name__}")
    forward_func, layer, head = ri.forward_func, ri.layer, ri.head
    layer_name = _layer_name(forward_func, layer)
    if model_factory is None:
        model_ref = ray.put(forward_func)
        model_factory = _ModelFromStore(model_ref)
    if isinstance(references, Tensor) and references.dim() >= 1:
        _split_points(int(references.shape[0]), n_actors)  # before any work
    ds, column = _as_dataset(ray, references, batch_size, column)
    mapped = ds.map_batches(
        _Featurize,
        fn_constructor_args=(model_factory, layer_name, attribute_to_layer_input, column,
                             batch_size),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=(1, concurrency or n_actors),  # a pool that fits the free CPUs
        num_cpus=num_cpus,
    )  # fmt: skip
    mapped.context.execution_options.preserve_order = True
    mapped.context.enable_progress_bars = progress
    mat = mapped.materialize()
    n = mat.count()
    if n == 0:
        raise ValueError("references: the reference set is empty (no examples)")
    offsets = _split_points(n, n_actors)
    parts = mat.split_at_indices(offsets[1:]) if n_actors > 1 else [mat]
    first_in = _batch_tensor(ds.take_batch(2, batch_format="numpy")[column])
    first_feats = torch.from_numpy(np.asarray(mat.take_batch(2, batch_format="numpy")["features"]))

    device = model_device(forward_func, layer)
    with eval_mode(forward_func, layer):
        local, _, layout, example = extract_features(
            forward_func, layer, first_in[:1], batch_size=1,
            attribute_to_layer_input=attribute_to_layer_input, device=device, progress=False,
        )  # fmt: skip
        scale = max(1.0, float(local.abs().max()))
        if local.shape[1] != first_feats.shape[1] or not torch.allclose(
            local[0], first_feats[0], rtol=1e-4, atol=1e-5 * scale
        ):
            raise ValueError(
                "model_factory: the model built on the workers gives other layer features "
                "than ri.forward_func on the first reference; load the same weights"
            )
        study = study_head(
            forward_func, layer, head, layout, example, first_feats, attribute_to_layer_input,
            device, stacklevel=4,
        )  # fmt: skip
        warn_probability_output(study.output_op)
    projection = study.projection
    basis32 = None if projection is None else projection.basis32.numpy()
    sources = [("dataset", part) for part in parts]
    actors = _start_actors(sources, offsets, basis32, spill_dir, max_restarts, actor_options)
    return _finish(
        ri, actors, offsets, example, layout, study.nonlinear, projection, sources,
        progress, attribute_to_layer_input, n, leading=study.leading, affine=study.affine,
        inputs=references if isinstance(references, Tensor) else None,
        source=references if isinstance(references, (Tensor, Dataset, DataLoader)) else None,
    )  # fmt: skip


class _ModelFromStore:
    """A model factory that returns the driver's model from Ray's object store."""

    def __init__(self, ref: Any) -> None:
        self.ref = [ref]  # boxed: resolved on the worker, not when the factory is sent

    def __call__(self) -> nn.Module:
        return _ray().get(self.ref[0])
