"""Saving and loading an :class:`~captum_repinterp.auditing.AuditResult`.

One ``.npz`` file (``allow_pickle=False`` on loading, so no code is ever executed): the
audit's tensors as arrays under per-class and per-region prefixes, its numbers as one
JSON array, and each region's interpretation as :mod:`captum_repinterp.saving` writes
one, its array names preceded by the region's prefix (see :func:`save_audit`).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import _atomic_savez
from .saving import (
    _check_path,
    _check_same_model,
    _check_save_path,
    _open_npz,
    _reader_of,
    array_tensor,
    build_interpretation,
    interpretation_arrays,
    read_interpretation,
)
from .store import model_fingerprint

__all__ = ["AUDIT_FORMAT_VERSION", "load_audit", "save_audit"]

#: Version of the audit file format (the ``format_version`` of its ``audit`` JSON).
AUDIT_FORMAT_VERSION = 1
#: The name of an audit file's JSON array, and its ``kind``.
_AUDIT_KEY, _AUDIT_KIND = "audit", "AuditResult"


def _map_arrays(maps: Any, prefix: str) -> tuple[dict[str, np.ndarray], int | None]:
    """A mean heat map (a tensor, or a tuple for a layer with several outputs) as arrays,
    and the number of parts to read back (None: one tensor, not a tuple)."""
    if isinstance(maps, torch.Tensor):
        return {prefix: maps.detach().cpu().numpy()}, None
    parts = tuple(maps)
    arrays = {f"{prefix}/{k}": m.detach().cpu().numpy() for k, m in enumerate(parts)}
    return arrays, len(parts)


def _group_arrays(group: Any, prefix: str) -> tuple[dict[str, np.ndarray], int | None]:
    arrays = {
        prefix + "members": group.members.detach().cpu().numpy(),
        prefix + "exemplars": group.exemplars.detach().cpu().numpy(),
    }
    maps, parts = _map_arrays(group.mean_heatmap, prefix + "mean_heatmap")
    return {**arrays, **maps}, parts


def _plain(value: Any) -> Any:
    """A NumPy scalar or one-element tensor in a JSON field as a Python number."""
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_audit(result: Any, path: str | os.PathLike) -> None:
    """Write an :class:`~captum_repinterp.auditing.AuditResult` to ``path`` as one
    ``.npz`` file, through a temporary file renamed at the end.

    The archive holds ``features`` and ``predictions``; under ``class{i}/`` (the ``i``-th
    class, in the result's order) ``indices`` and ``uncovered``; under
    ``class{i}/region{j}/`` each region's ``members``, ``exemplars`` and
    ``mean_heatmap`` (``mean_heatmap/{k}`` for a layer with several outputs), its
    sub-groups' arrays under ``subgroup{k}/`` and its interpretation under
    ``interpretation/``, written as :func:`save_interpretation` writes one; the
    numbers, the held-out scores and the times are the JSON array ``audit``. The model's
    fingerprint is computed once for all the regions.

    Raises
    ------
    TypeError
        For a ``path`` that is not a str or os.PathLike.
    ValueError
        For an empty ``path`` or a directory, or an interpretation drawing its map at a
        layer it cannot name (as :func:`save_interpretation`).
    """
    _check_save_path(path)
    arrays: dict[str, np.ndarray] = {
        "features": result.features.detach().cpu().numpy(),
        "predictions": result.predictions.detach().cpu().numpy(),
    }
    fingerprints: dict[int, str | None] = {}  # by model: hashed once, not per region
    classes = []
    for i, (key, ca) in enumerate(result.classes.items()):
        prefix = f"class{i}/"
        arrays[prefix + "indices"] = ca.indices.detach().cpu().numpy()
        arrays[prefix + "uncovered"] = ca.uncovered.detach().cpu().numpy()
        regions = []
        for j, region in enumerate(ca.regions):
            rp = f"{prefix}region{j}/"
            group, parts = _group_arrays(region, rp)
            arrays.update(group)
            subgroups = []
            for k, sub in enumerate(region.subgroups):
                group, sub_parts = _group_arrays(sub, f"{rp}subgroup{k}/")
                arrays.update(group)
                subgroups.append({"mean_heatmap": sub_parts})
            interp = region.interpretation
            if interp is not None:
                model = getattr(interp.reader, "forward_func", None)
                if id(model) not in fingerprints:
                    fingerprints[id(model)] = model_fingerprint(model)
                arrays.update(
                    interpretation_arrays(interp, rp + "interpretation/", fingerprints[id(model)])
                )
            regions.append(
                {
                    "seed_index": region.seed_index,
                    "n_inside": region.n_inside,
                    "purity": region.purity,
                    "heldout": region.heldout,
                    "uncovered_share": region.uncovered_share,
                    "split_score": region.split_score,
                    "mean_heatmap": parts,
                    "subgroups": subgroups,
                    "interpretation": interp is not None,
                }
            )
        classes.append({"key": key, "target": ca.target, "seconds": ca.seconds, "regions": regions})
    meta = {
        "kind": _AUDIT_KIND,
        "format_version": AUDIT_FORMAT_VERSION,
        "seconds": result.seconds,
        "classes": classes,
    }
    arrays[_AUDIT_KEY] = np.array(json.dumps(meta, default=_plain))
    _atomic_savez(Path(path), **arrays)


def _read_maps(data: Any, prefix: str, parts: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
    if parts is None:
        return array_tensor(data, prefix)
    return tuple(array_tensor(data, f"{prefix}/{k}") for k in range(int(parts)))


def _read_group(data: Any, prefix: str, parts: Any) -> dict[str, Any]:
    """The tensors of an :class:`~captum_repinterp.auditing.AuditGroup` under ``prefix``."""
    return {
        "members": array_tensor(data, prefix + "members"),
        "mean_heatmap": _read_maps(data, prefix + "mean_heatmap", parts),
        "exemplars": array_tensor(data, prefix + "exemplars"),
    }


def _read_audit(data: Any, path: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON of an audit file and its arrays (interpretations as their metadata and
    tensors, not yet checked against an explainer)."""
    if _AUDIT_KEY not in data.files and "metadata" in data.files:
        raise ValueError(
            f"path: {os.fspath(path)!r} is an interpretation (Interpretation.save), not an "
            "audit; load it with Interpretation.load"
        )
    meta = json.loads(str(data[_AUDIT_KEY]))
    if not isinstance(meta, dict) or meta.get("kind") != _AUDIT_KIND:
        raise ValueError("its 'audit' array is not an AuditResult's description")
    version = meta.get("format_version")
    if version != AUDIT_FORMAT_VERSION:
        raise ValueError(
            f"path: {os.fspath(path)!r} has audit format version {version!r}; this version "
            f"of captum_repinterp reads version {AUDIT_FORMAT_VERSION}"
        )
    arrays: dict[str, Any] = {
        "features": array_tensor(data, "features"),
        "predictions": array_tensor(data, "predictions"),
        "classes": [],
    }
    for i, ca in enumerate(meta["classes"]):
        prefix = f"class{i}/"
        regions = []
        for j, region in enumerate(ca["regions"]):
            rp = f"{prefix}region{j}/"
            regions.append(
                {
                    **_read_group(data, rp, region["mean_heatmap"]),
                    "subgroups": [
                        _read_group(data, f"{rp}subgroup{k}/", sub["mean_heatmap"])
                        for k, sub in enumerate(region["subgroups"])
                    ],
                    "interpretation": (
                        read_interpretation(data, rp + "interpretation/")
                        if region["interpretation"]
                        else None
                    ),
                }
            )
        arrays["classes"].append(
            {
                "indices": array_tensor(data, prefix + "indices"),
                "uncovered": array_tensor(data, prefix + "uncovered"),
                "regions": regions,
            }
        )
    return meta, arrays


#: What reading an audit file that is not what it should be raises (turned into a ValueError
#: naming ``path``).
_NOT_OURS = (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


def _not_an_audit(path: Any, exc: BaseException) -> ValueError:
    return ValueError(
        f"path: {os.fspath(path)!r} is not an audit written by AuditResult.save "
        f"({type(exc).__name__}: {exc})"
    )


def load_audit(cls: type, path: str | os.PathLike, explainer: Any = None) -> Any:
    """Read an audit written by :func:`save_audit` (``allow_pickle=False``).

    ``cls``: the class to build (:class:`~captum_repinterp.auditing.AuditResult`);
    ``explainer``: the fitted explainer (or its reader) the regions' interpretations are
    used with, checked as :func:`load_interpretation` checks it, and its model compared
    once (one warning for all the regions).

    Raises
    ------
    ValueError
        Naming ``path`` for a file that is not an audit written by :func:`save_audit`
        (an interpretation, another archive, not an archive) or of another format
        version; naming ``explainer`` as :func:`load_interpretation`.
    TypeError, NotFittedError
        As :func:`load_interpretation`.
    """
    from .auditing import AuditGroup, AuditRegion, ClassAudit
    from .interpretation import Interpretation

    _check_path(path)
    reader = _reader_of(explainer)  # a wrong or unfitted explainer, before the file is read
    try:
        with _open_npz(path) as data:
            meta, arrays = _read_audit(data, path)
    except _NOT_OURS as exc:
        if str(exc).startswith("path: "):
            raise
        raise _not_an_audit(path, exc) from exc
    checked = False  # the model is compared once, with the first interpretation's record
    classes = {}
    try:
        for ca, ca_arrays in zip(meta["classes"], arrays["classes"]):
            regions = []
            for region, r_arrays in zip(ca["regions"], ca_arrays["regions"]):
                interp = None
                if r_arrays["interpretation"] is not None:
                    i_meta, tensors = r_arrays["interpretation"]
                    interp = build_interpretation(
                        Interpretation, i_meta, tensors, explainer, check_model=False
                    )
                    if not checked:
                        _check_same_model(i_meta, reader)
                        checked = True
                regions.append(
                    AuditRegion(
                        members=r_arrays["members"],
                        mean_heatmap=r_arrays["mean_heatmap"],
                        exemplars=r_arrays["exemplars"],
                        seed_index=int(region["seed_index"]),
                        interpretation=interp,
                        n_inside=int(region["n_inside"]),
                        purity=float(region["purity"]),
                        heldout=region["heldout"],
                        uncovered_share=float(region["uncovered_share"]),
                        subgroups=[AuditGroup(**g) for g in r_arrays["subgroups"]],
                        split_score=float(region["split_score"]),
                    )
                )
            classes[int(ca["key"])] = ClassAudit(
                int(ca["target"]),
                ca_arrays["indices"],
                regions,
                ca_arrays["uncovered"],
                float(ca["seconds"]),
            )
        seconds = float(meta["seconds"])
    except (KeyError, TypeError) as exc:  # a field of the JSON missing or mistyped
        raise _not_an_audit(path, exc) from exc
    return cls(classes, arrays["features"], arrays["predictions"], seconds)
