"""Target resolution: one class index per example, for every form Captum accepts."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._captum_compat import TargetType, _select_targets

__all__ = ["resolve_targets"]


def resolve_targets(output: Tensor, target: TargetType) -> Tensor:
    """Flat class index per example for any Captum target form.

    ``None`` selects the predicted class. Otherwise Captum's own ``_select_targets`` is
    applied to a tensor of flat indices shaped like ``output``, so every form Captum
    accepts (int, 0-d/one-element tensor, list, 1-D tensor, tuples for outputs with more
    than two dimensions) means here what it means for ``LayerGradCam``.

    Parameters
    ----------
    output : Tensor
        The model's output, ``n x ...``.
    target : TargetType
        As in Captum; also labels read from arrays: a NumPy integer, an integer NumPy
        array, or a list of NumPy integers or one-element integer tensors.

    Returns
    -------
    Tensor
        ``n`` int64 indices into the flattened output, on the CPU.

    Raises
    ------
    TypeError, ValueError
        Naming ``target`` when it is of the wrong type or does not select one class per
        example.
    """
    n = output.shape[0]
    flat = output.reshape(n, -1)
    if target is None:
        return flat.argmax(dim=1).cpu()
    target = _from_numpy(target)
    if isinstance(target, bool) or (isinstance(target, Tensor) and target.dtype == torch.bool):
        raise TypeError("target must be an int, a tuple, a list or an integer tensor, not bool")
    if isinstance(target, Tensor) and target.is_floating_point():
        raise TypeError(f"target must be an integer tensor, got dtype {target.dtype}")
    _check_type(target)
    if isinstance(target, list) and len(target) != n:
        raise ValueError(f"target: list of length {len(target)} for {n} inputs")
    if isinstance(target, Tensor) and target.numel() not in (1, n):
        raise ValueError(
            f"target: tensor with {target.numel()} elements for {n} inputs (expected 1 or {n})"
        )
    index = torch.arange(flat.shape[1]).reshape(output.shape[1:]).expand(output.shape)
    if isinstance(target, Tensor):
        target = target.cpu()
    try:
        selected = _select_targets(index, target)
    except (AssertionError, IndexError, RuntimeError, TypeError) as exc:
        raise ValueError(
            f"target {target!r} does not select one class per example of an output shaped "
            f"{tuple(output.shape)}: {exc}"
        ) from None
    if selected.shape != (n,):
        raise ValueError(
            f"target {target!r} must select exactly one class per example of an output "
            f"shaped {tuple(output.shape)}"
        )
    return selected.long()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_index(value: Any) -> bool:
    """An int, or a tuple of ints (a class of an output with more than two dimensions)."""
    return _is_int(value) or (isinstance(value, tuple) and all(_is_int(v) for v in value))


def _check_type(target: Any) -> None:
    """Refuse the types no Captum target form has (a float, a string, a list of floats)
    with a ``TypeError``; values are left to Captum's ``_select_targets``."""
    if isinstance(target, Tensor) or _is_index(target):
        return
    if isinstance(target, list):
        bad = next((v for v in target if not _is_index(v)), None)
        if bad is None:
            return
        got = f"a list holding {type(bad).__name__} ({bad!r})"
    else:
        got = type(target).__name__
    raise TypeError(
        "target must be an int, a tuple of ints, an integer tensor or a list of ints or "
        f"tuples (one per input), got {got}"
    )


def _integral(value: Any) -> bool:
    """A NumPy integer or a one-element integer tensor: what a label read from an array
    or a tensor of labels looks like."""
    if isinstance(value, np.integer):
        return True
    return (
        isinstance(value, Tensor)
        and value.numel() == 1
        and not value.is_floating_point()
        and value.dtype != torch.bool
    )


def _from_numpy(target: Any) -> Any:
    """Labels taken from NumPy arrays or tensors, in the forms Captum takes: a NumPy
    integer becomes an int, an integer array a tensor, and a list's NumPy integers or
    one-element tensors ints (Captum refuses all three)."""
    if isinstance(target, np.integer):
        return int(target)
    if isinstance(target, np.ndarray):
        if target.dtype.kind not in "iu":
            raise TypeError(f"target must be an integer array, got dtype {target.dtype}")
        return torch.from_numpy(target.astype(np.int64))
    if isinstance(target, list) and any(_integral(t) for t in target):
        return [int(t) if _integral(t) else t for t in target]
    return target
