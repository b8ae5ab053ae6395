"""Saving and loading an :class:`~captum_repinterp.interpretation.Interpretation`.

One ``.npz`` file: the tensors as arrays and the metadata as JSON (``allow_pickle=False``
on loading, so no code is ever executed). The heat-map layer, a module, is saved by its
name in the model and found again in the model of the explainer given to ``load``. The
helpers that write and read one interpretation under a prefix of a larger file serve
:mod:`captum_repinterp.audit_saving` too.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .datasets import _atomic_savez
from .features import LayerLayout, caller_stacklevel, module_name
from .heatmap import INPUT
from .store import model_fingerprint

if TYPE_CHECKING:
    from .interpretation import Interpretation

__all__ = [
    "FORMAT_VERSION",
    "TENSORS",
    "array_tensor",
    "build_interpretation",
    "interpretation_arrays",
    "load_interpretation",
    "metadata",
    "read_interpretation",
    "save_interpretation",
]

FORMAT_VERSION = 1
TENSORS = ("weight", "bias", "runner_up", "members", "member_distances", "seed_margins")


#: ``metadata``'s default: compute the model's fingerprint from ``region``'s reader.
_COMPUTE: Any = object()


def metadata(region: Interpretation, fingerprint: Any = _COMPUTE) -> dict[str, Any]:
    """JSON-serialisable description of ``region`` (everything but the tensors).

    ``fingerprint``: the model's fingerprint when already computed (an audit's regions
    share one model: it is hashed once, not once per region).
    """
    model = getattr(region.reader, "forward_func", None)
    return {
        "format_version": FORMAT_VERSION,
        "target": region.target,
        "seed_in_class": region.seed_in_class,
        "purity": region.purity,
        "coverage": region.coverage,
        "delta": region.delta,
        "reached": region.reached,
        "n_sampled": region.n_sampled,
        "n_boundaries": region.n_boundaries,
        "n_members": len(region),
        "layout": region.layout.to_json(),
        # which side of the layer (None: not known, an interpretation loaded without model)
        "attribute_to_layer_input": getattr(region.reader, "attribute_to_layer_input", None),
        # the model's weights and the split layer's name, compared at load (None: unknown)
        "model": model_fingerprint(model) if fingerprint is _COMPUTE else fingerprint,
        "layer": module_name(model, getattr(region.reader, "layer", None)),
        "heatmap_rule": region.heatmap_rule,
        "combine": region.combine,
        "heatmap_layer": _heatmap_layer_name(region),
        "heatmap_at_input": region.heatmap_layer == INPUT,
    }


def _check_same_model(meta: dict[str, Any], reader: Any) -> None:
    """Warn when ``reader``'s model has other weights, or its layer another name, than
    the model the interpretation was saved with (files without them pass)."""
    if reader is None:
        return
    saved, layer = meta.get("model"), meta.get("layer")
    ours = model_fingerprint(reader.forward_func) if saved is not None else None
    name = module_name(reader.forward_func, reader.layer)
    if ours is not None and ours != saved:
        what = "a model with other weights (or other parameter names)"
    elif layer is not None and name not in (None, layer):
        what = f"another layer ({name!r}, saved at {layer!r})"
    else:
        return
    warnings.warn(
        f"explainer: the interpretation was saved with its model split at {layer!r}, and "
        f"this explainer has {what}: its boundaries are that model's, so the rule and the "
        "maps may not hold here; pass the explainer the interpretation was made with",
        UserWarning,
        stacklevel=caller_stacklevel(),
    )


def _heatmap_layer_name(region: Interpretation) -> str | None:
    if region.heatmap_layer is None or region.heatmap_layer == INPUT:
        return None
    model = getattr(region.reader, "forward_func", None)
    if region.reader is not None and not isinstance(model, nn.Module):
        raise ValueError(
            "heatmap_layer: cannot name it for saving: forward_func is not an nn.Module "
            "(wrap the model in one, or draw the map at heatmap_layer=None or 'input')"
        )
    name = module_name(model, region.heatmap_layer)
    if name is not None:
        return name
    raise ValueError(
        "heatmap_layer: cannot name it for saving (it is not a submodule of the model)"
    )


def _check_path(path: Any) -> None:
    """Refuse a ``path`` that is not a str or os.PathLike: ``open`` takes an int as a file
    descriptor, so ``save(1)`` wrote the file into stdout and closed it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")


def _check_save_path(path: Any) -> None:
    """Refuse a ``path`` to save to that is not a str or os.PathLike (TypeError), empty
    or a directory (ValueError naming ``path``)."""
    _check_path(path)
    if not os.fspath(path):
        raise ValueError("path: an empty path; give the file to write")
    if Path(path).is_dir():
        raise ValueError(f"path: {os.fspath(path)!r} is a directory; give a file in it")


def interpretation_arrays(
    region: Interpretation, prefix: str = "", fingerprint: Any = _COMPUTE
) -> dict[str, np.ndarray]:
    """The arrays of ``region`` as :func:`save_interpretation` writes them, each name
    preceded by ``prefix`` (an interpretation kept inside a larger archive, such as an
    audit's: ``"class0/region1/interpretation/"``).

    ``fingerprint``: as for :func:`metadata`.
    """
    arrays = {prefix + name: getattr(region, name).detach().cpu().numpy() for name in TENSORS}
    if region.channel_weights is not None:
        arrays[prefix + "channel_weights"] = region.channel_weights.detach().cpu().numpy()
    arrays[prefix + "metadata"] = np.array(json.dumps(metadata(region, fingerprint)))
    return arrays


def save_interpretation(region: Interpretation, path: str | os.PathLike) -> None:
    """Write ``region`` to ``path`` (see the module docstring), through a temporary file
    in the same folder renamed at the end (an interrupted save leaves ``path`` as it was).

    Raises
    ------
    TypeError
        For a ``path`` that is not a str or os.PathLike.
    ValueError
        For an empty ``path`` or a directory.
    """
    _check_save_path(path)
    arrays = interpretation_arrays(region)
    # through a temporary file: an interrupted save leaves any earlier file as it was
    _atomic_savez(Path(path), **arrays)


def _open_npz(path: str | os.PathLike) -> Any:
    """``np.load(path, allow_pickle=False)``, refusing a ``.npy`` file (one array)."""
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):  # np.save's one array (.npy)
        raise ValueError(f"one {type(data).__name__}, not an .npz archive")
    return data


def array_tensor(data: Any, name: str) -> torch.Tensor:
    """The array ``name`` of an open ``.npz`` archive as a tensor of its own memory."""
    return torch.from_numpy(data[name].copy())


def read_interpretation(data: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """The metadata and tensors of the interpretation under ``prefix`` in ``data`` (an
    open ``.npz`` archive), unchecked: :func:`build_interpretation` checks and builds it.

    Raises
    ------
    KeyError, ValueError
        When an array is missing or the metadata is not JSON.
    """
    meta = json.loads(str(data[prefix + "metadata"]))
    tensors = {name: array_tensor(data, prefix + name) for name in TENSORS}
    if prefix + "channel_weights" in data.files:
        tensors["channel_weights"] = array_tensor(data, prefix + "channel_weights")
    return meta, tensors


def _reader_of(explainer: Any) -> Any:
    """The :class:`~captum_repinterp.reader.LayerReader` of ``explainer`` (None: none).

    Raises
    ------
    NotFittedError
        For an explainer that is not fitted.
    TypeError
        Naming ``explainer`` when it is neither an explainer nor a reader.
    """
    from .reader import LayerReader

    if explainer is None or isinstance(explainer, LayerReader):
        return explainer
    if hasattr(type(explainer), "reader_"):
        return explainer.reader_  # NotFittedError before fit
    raise TypeError(
        "explainer must be a fitted RepresentativeInterpretation, its reader_, or None, "
        f"got {type(explainer).__name__}"
    )


def _check_members(members: torch.Tensor, explainer: Any) -> None:
    """Refuse a fitted explainer with fewer references than the members point to."""
    if explainer is None or not hasattr(type(explainer), "references_") or not members.numel():
        return
    n = int(explainer.references_.predictions.shape[0])
    last = int(members.max())
    if last >= n:
        raise ValueError(
            f"explainer: the interpretation's members are reference indices up to {last}, "
            f"but the explainer was fitted on {n} references; pass the explainer fitted "
            "on the references the interpretation was found with"
        )


def load_interpretation(
    cls: type[Interpretation], path: str | os.PathLike, explainer: Any = None
) -> Interpretation:
    """Read an interpretation written by :func:`save_interpretation`.

    ``cls``: the class to build (:class:`~captum_repinterp.interpretation.Interpretation`);
    ``explainer``: the fitted explainer (or its reader) whose model the interpretation is
    used with.

    Raises
    ------
    ValueError
        For a file not written by :func:`save_interpretation` or of another format
        version, an explainer whose layer is shaped unlike the interpretation's, that
        reads the other side of it (``attribute_to_layer_input``) or that was fitted on
        fewer references than the members' indices need, or a map drawn at a layer the
        given model does not have.
    TypeError
        For an ``explainer`` that is neither an explainer nor a reader, or a ``path``
        that is not a str or os.PathLike.
    NotFittedError
        For an explainer that is not fitted.
    """
    _check_path(path)
    _reader_of(explainer)  # a wrong or unfitted explainer, before the file is read
    try:
        with _open_npz(path) as data:
            meta, tensors = read_interpretation(data)
    except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"path: {os.fspath(path)!r} is not an interpretation written by "
            f"Interpretation.save ({type(exc).__name__}: {exc})"
        ) from exc
    return build_interpretation(cls, meta, tensors, explainer)


def build_interpretation(
    cls: type[Interpretation],
    meta: Any,
    tensors: dict[str, torch.Tensor],
    explainer: Any = None,
    check_model: bool = True,
) -> Interpretation:
    """The interpretation of ``meta`` and ``tensors`` (from :func:`read_interpretation`),
    checked against ``explainer`` (a fitted explainer, its reader, or None).

    ``check_model``: warn when the explainer's model has other weights or its layer
    another name (:func:`_check_same_model`); an audit checks its model once for all its
    regions instead.

    Raises
    ------
    ValueError, TypeError, NotFittedError
        As :func:`load_interpretation`.
    """
    reader = _reader_of(explainer)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"path: unsupported format version {version}")
    layout = LayerLayout.from_json(meta["layout"])
    if reader is not None and reader.layout != layout:
        raise ValueError(
            f"explainer: its layer gives tensors shaped {reader.layout.shapes}, but the "
            f"interpretation was found at a layer giving {layout.shapes}; pass the explainer "
            "(model and layer) the interpretation was made with"
        )
    side = meta.get("attribute_to_layer_input")  # None in files written before it was kept
    if reader is not None and side is not None and reader.attribute_to_layer_input != side:
        raise ValueError(
            f"explainer: it reads its layer's {'output' if side else 'input'}, but the "
            f"interpretation was found with attribute_to_layer_input={side} (shaped alike, "
            "other features); pass the explainer the interpretation was made with"
        )
    _check_members(tensors["members"], explainer)
    if check_model:
        _check_same_model(meta, reader)
    heatmap_layer = INPUT if meta.get("heatmap_at_input") else None
    if meta.get("heatmap_layer") is not None:
        model = getattr(reader, "forward_func", None)
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"explainer: the interpretation draws its map at layer "
                f"{meta['heatmap_layer']!r}; load it with explainer=ri (the fitted model)"
            )
        heatmap_layer = dict(model.named_modules()).get(meta["heatmap_layer"])
        if heatmap_layer is None:
            raise ValueError(f"explainer: the model has no layer named {meta['heatmap_layer']!r}")
    return cls(
        target=int(meta["target"]),
        seed_in_class=bool(meta["seed_in_class"]),
        purity=float(meta["purity"]),
        coverage=float(meta["coverage"]),
        delta=int(meta["delta"]),
        reached=bool(meta["reached"]),
        n_sampled=int(meta["n_sampled"]),
        layout=layout,
        heatmap_layer=heatmap_layer,
        heatmap_rule=meta["heatmap_rule"],
        combine=meta["combine"],
        reader=reader,
        **tensors,
    )
