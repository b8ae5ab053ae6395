"""Shards from a local fit: :func:`shard_references`, and the steps it shares with
:func:`~captum_repinterp.distributed.fit_sharded` (argument checks, the split into
contiguous blocks, starting the actors, attaching the shards to the explainer)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..attribution import RepresentativeInterpretation
from ..features import LayerLayout
from ..layers import warn_nonlinear_head
from ..model_watch import ModelWatch
from ..projection import AffineHead, LeadingMap, Projection
from ..reader import LayerReader
from .actor import Shard, import_ray
from .references import ShardedReferences


def split_points(n: int, n_shards: int) -> list[int]:
    """Starts of ``n_shards`` contiguous shards whose sizes differ by at most one."""
    if n_shards < 1:
        raise ValueError(f"n_actors must be >= 1, got {n_shards}")
    if n_shards > n:
        raise ValueError(f"n_actors ({n_shards}) is larger than the number of references ({n})")
    return [i * n // n_shards for i in range(n_shards)]


def check_actor_args(
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


def start_actors(
    sources: list[tuple[str, Any]],
    offsets: list[int],
    basis32: np.ndarray | None,
    spill_dir: str | os.PathLike | None,
    max_restarts: int,
    actor_options: dict[str, Any] | None,
) -> list:
    ray = import_ray()
    opts = {"num_cpus": 0, "max_restarts": max_restarts, "max_task_retries": max_restarts}
    opts.update(actor_options or {})
    cls = ray.remote(Shard).options(**opts)
    actors = []
    for i, (source, off) in enumerate(zip(sources, offsets)):
        spill = None if spill_dir is None else str(Path(spill_dir) / f"shard-{i:04d}")
        actors.append(cls.remote(source, off, basis32, spill))
    return actors


def attach_shards(
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
    ri._watch = ModelWatch.of(ri.forward_func)  # a model changed after this is refused
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
        A progress bar over the class tasks of ``audit`` (a batch of seeds shows one
        when ``interpret`` or ``attribute`` is called with ``progress=True``).

    Returns
    -------
    ri
        The same explainer; ``interpret``, ``attribute`` and ``audit`` now use the
        shards (``ri.references_`` is a :class:`ShardedReferences`).
    """
    ray = import_ray()
    check_actor_args(ri, n_actors, max_restarts, actor_options)
    fitted = ri.references_
    if isinstance(fitted, ShardedReferences):
        raise ValueError("ri: its references are sharded already")
    offsets = split_points(fitted.n, n_actors)
    stops = offsets[1:] + [fitted.n]
    sources = []
    for a, b in zip(offsets, stops):
        feats = np.ascontiguousarray(fitted.features[a:b].numpy(), dtype=np.float32)
        preds = fitted.predictions[a:b].numpy().astype(np.int64)
        sources.append(("arrays", [ray.put(feats), ray.put(preds)]))
    proj = fitted.projection
    basis32 = None if proj is None else proj.basis32.numpy()
    actors = start_actors(sources, offsets, basis32, spill_dir, max_restarts, actor_options)
    return attach_shards(
        ri, actors, offsets, fitted.example, fitted.layout, fitted.head_nonlinear, proj,
        sources, progress, fitted.attribute_to_layer_input, fitted.n, reader=ri.reader_,
        leading=fitted.leading, affine=fitted.affine, logits=fitted.logits,
        inputs=fitted.inputs, source=fitted.source,
    )  # fmt: skip
