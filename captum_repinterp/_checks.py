"""Argument checks shared by the public entry points (one message format everywhere)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_finite_outputs",
    "check_grad_mode",
    "check_int",
    "describe_value",
]


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; bools and other types are refused (NumPy
    integers are taken and returned as ``int``).

    Raises
    ------
    ValueError
        Naming ``name``: "must be a positive int" (``minimum == 1``) or "must be an int
        >= minimum", with the value given.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {describe_value(value)}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """``value`` when it is a bool (NumPy's ``bool_`` is taken and returned as ``bool``).

    Raises
    ------
    TypeError
        Naming ``name``: a string such as ``"no"`` or a number would be truthy or falsy
        without saying so.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {describe_value(value)}")


def check_finite_outputs(outputs: torch.Tensor, name: str, first: int = 0) -> None:
    """Refuse examples whose model outputs (``n x ...``) hold NaN or inf.

    Their predicted class is undefined, so they can neither be references nor seeds.
    ``first`` is the index of ``outputs``' first row in the argument ``name``.

    Raises
    ------
    ValueError
        Naming ``name`` and the first (up to 10) offending examples.
    """
    finite = torch.isfinite(outputs.reshape(outputs.shape[0], -1)).all(dim=1)
    if bool(finite.all()):
        return
    bad = (torch.nonzero(~finite).flatten() + first).tolist()
    shown = ", ".join(map(str, bad[:10])) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
    raise ValueError(
        f"{name}: the model's outputs are NaN or inf for example(s) {shown}, so their "
        "predicted class is undefined and they have no decision region; check those "
        "inputs or the model (an overflow, a division by zero), or leave them out"
    )


def describe_value(value: Any) -> str:
    """``repr(value)``, or ``"a Tensor of shape (80,)"`` for an array or tensor (whose
    repr would print its values)."""
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, numbers.Number) and len(shape) > 0:
        return f"a {type(value).__name__} of shape {tuple(shape)}"
    return repr(value)


def check_grad_mode(what: str) -> None:
    """Refuse to run ``what``, which takes gradients, under ``torch.inference_mode()``
    (gradients are enabled where needed, so ``torch.no_grad()`` is fine).

    Raises
    ------
    RuntimeError
        Saying so, instead of a failure deep in autograd or a fallback without gradients.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} takes gradients, which torch.inference_mode() forbids; call it "
            "outside that block (torch.no_grad() is fine)"
        )


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
