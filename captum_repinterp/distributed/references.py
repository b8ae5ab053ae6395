"""The driver's view of a sharded reference set: :class:`ShardedReferences`.

It answers what the per-seed code asks of a local reference set, runs one seed against
the actors (boundaries sampled on the driver, counts summed over the shards) and sends a
batch of seeds or audit classes out as Ray tasks.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._captum_compat import TargetType
from ..boundaries import sample_candidates
from ..features import LayerLayout
from ..inputs import InputSpec
from ..interpretation import Interpretation
from ..options import InterpretOptions
from ..projection import AffineHead, LeadingMap, Projection
from ..reader import LayerReader
from ..region import (
    Seed,
    _warn_no_boundary,
    assemble_interpretation,
    interpret_seed,
    read_seeds,
)
from ..sampler import choose_candidates
from ..solver import greedy_cover_oracle
from .actor import ShardLostError, import_ray


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
        ray = import_ray()
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
        ray = import_ray()
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
        ray = import_ray()
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
        ray = import_ray()
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
        ray = import_ray()
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
