"""Fitting with Ray: :func:`fit_sharded` computes the features with Ray Data on the
workers and leaves them in sharded actors."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..features import eval_mode, extract_features, model_device, module_name
from ..references import study_head
from ..tracing import warn_probability_output
from .actor import import_ray
from .sharding import attach_shards, check_actor_args, split_points, start_actors


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
    name = module_name(model, layer)
    if name is not None:
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
    spill_dir, max_restarts, actor_options
        As in :func:`shard_references`.
    progress : bool
        Ray Data's progress bars during the fit, then as in :func:`shard_references`.
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
    ray = import_ray()
    check_actor_args(ri, n_actors, max_restarts, actor_options)
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
        split_points(int(references.shape[0]), n_actors)  # before any work
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
    offsets = split_points(n, n_actors)
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
    actors = start_actors(sources, offsets, basis32, spill_dir, max_restarts, actor_options)
    return attach_shards(
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
        return import_ray().get(self.ref[0])
