"""Representative interpretations of CNNs (Lam, Chu et al., ICCV 2021) for Captum.

Public names are imported lazily, so that ``captum_repinterp.datasets`` and
``captum_repinterp.models`` can be used on their own.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "Interpretation",
    "NoBoundaryWarning",
    "NotACutError",
    "NotACutWarning",
    "NonPiecewiseLinearWarning",
    "NotFittedError",
    "ProbabilityOutputWarning",
    "RepresentativeInterpretation",
    "SeedOnBoundaryWarning",
    "audit",
    "find_layer",
]
__version__ = "0.1.0"

_LAZY = {
    "RepresentativeInterpretation": "attribution",
    "NotFittedError": "attribution",
    "Interpretation": "interpretation",
    "NoBoundaryWarning": "region",
    "SeedOnBoundaryWarning": "region",
    "NotACutError": "cuts",
    "NotACutWarning": "cuts",
    "audit": "auditing",
    "find_layer": "layers",
    "NonPiecewiseLinearWarning": "layers",
    "ProbabilityOutputWarning": "tracing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
