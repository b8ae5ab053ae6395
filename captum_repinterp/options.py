"""The options of ``interpret``/``attribute``, validated once.

:class:`InterpretOptions` is built from the keyword arguments of the public methods and
passed down as one object, so every check runs once per call, in one place.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

from torch import nn

from ._checks import check_bool, check_choice, check_int
from .heatmap import COMBINE_RULES, HEATMAP_RULES, INPUT, HeatmapRule, get_heatmap_rule
from .solver import REFINE_MODES

__all__ = [
    "AUTO",
    "DEFAULT_HEATMAP_LAYER",
    "DEFAULT_HEATMAP_RULE",
    "InterpretOptions",
    "resolve_heatmap_layer",
]

#: The heat-map rule of ``interpret``/``attribute`` when none is given.
DEFAULT_HEATMAP_RULE = "channel-members"

#: ``heatmap_layer`` value: the resolution chosen on the references
#: (:mod:`captum_repinterp.resolution`).
AUTO = "auto"

#: The names ``heatmap_layer`` takes besides a module and None.
HEATMAP_LAYER_NAMES = (INPUT, AUTO)

#: The ``heatmap_layer`` of ``interpret``/``attribute`` when none is given: the split
#: layer or the input, whichever keeps more class evidence on the references (with
#: ``"channel-members"``, the fifth version of the rule in ``docs/choices.md``).
DEFAULT_HEATMAP_LAYER: str | None = AUTO


@dataclass(frozen=True)
class InterpretOptions:
    """How one seed is interpreted (see
    :meth:`RepresentativeInterpretation.interpret
    <captum_repinterp.attribution.RepresentativeInterpretation.interpret>`).

    Raises
    ------
    ValueError, TypeError
        Naming the option, when a value is out of range or of the wrong type.
    """

    n_boundaries: int = 50
    delta: int | float | None = None
    random_state: int = 0
    refine: str = "tighten"
    heatmap_rule: str = DEFAULT_HEATMAP_RULE
    combine: str = "sum"
    bisection_steps: int = 20
    progress: bool = False
    heatmap_layer: nn.Module | str | None = DEFAULT_HEATMAP_LAYER

    def __post_init__(self) -> None:
        # frozen: store the checked values as plain ints (NumPy integers are taken)
        object.__setattr__(self, "n_boundaries", check_int(self.n_boundaries, "n_boundaries"))
        object.__setattr__(
            self, "bisection_steps", check_int(self.bisection_steps, "bisection_steps")
        )
        check_choice(self.refine, "refine", REFINE_MODES)
        check_choice(self.combine, "combine", COMBINE_RULES)
        if isinstance(self.random_state, bool) or not isinstance(
            self.random_state, numbers.Integral
        ):
            raise TypeError(f"random_state must be an int, got {self.random_state!r}")
        object.__setattr__(self, "random_state", int(self.random_state))
        if not -(2**63) <= self.random_state < 2**64:  # what torch.Generator takes
            raise ValueError(
                f"random_state must be an int in [-2**63, 2**64), got {self.random_state}"
            )
        _check_delta(self.delta)
        object.__setattr__(self, "progress", check_bool(self.progress, "progress"))
        layer = self.heatmap_layer
        if isinstance(layer, str) and layer not in HEATMAP_LAYER_NAMES:
            raise ValueError(
                f"heatmap_layer must be an nn.Module, 'input', 'auto' or None, got {layer!r}"
            )
        if layer is not None and not isinstance(layer, (nn.Module, str)):
            raise TypeError(
                "heatmap_layer must be an nn.Module, 'input', 'auto' or None, got "
                f"{type(layer).__name__}"
            )
        self.rule  # noqa: B018  (validates heatmap_rule and its combination with the layer)

    @property
    def rule(self) -> HeatmapRule:
        """The heat-map rule object (see :mod:`captum_repinterp.heatmap`); with
        ``heatmap_layer="auto"`` the rule at the split layer (the facade resolves
        ``"auto"`` before the rule draws)."""
        layer = self.heatmap_layer
        if layer == AUTO:
            return get_heatmap_rule(self.heatmap_rule, None)
        return get_heatmap_rule(self.heatmap_rule, layer)

    def resolved(self, auto_layer: str | None) -> InterpretOptions:
        """These options with ``heatmap_layer="auto"`` replaced by ``auto_layer`` (the
        resolution chosen on the references, see :mod:`captum_repinterp.resolution`)
        for the rules that can be drawn there, by the split layer for the others."""
        if self.heatmap_layer != AUTO:
            return self
        return replace(
            self, heatmap_layer=resolve_heatmap_layer(self.heatmap_rule, AUTO, auto_layer)
        )


def resolve_heatmap_layer(heatmap_rule: str, heatmap_layer: object, auto_layer: str | None):
    """``heatmap_layer`` with ``"auto"`` replaced by ``auto_layer`` (the resolution chosen
    on the references) when ``heatmap_rule`` can be drawn there, by the split layer
    (None) when it cannot; any other value as it is."""
    if heatmap_layer != AUTO:
        return heatmap_layer
    return auto_layer if HEATMAP_RULES[heatmap_rule].supports_input else None


def _check_delta(delta: object) -> None:
    """What can be said of ``delta`` before the negatives are counted (the solver checks
    the count against their number)."""
    if delta is None:
        return
    if isinstance(delta, bool):
        raise ValueError(f"delta must be an int, a float or None, got {delta!r}")
    if isinstance(delta, numbers.Integral):
        if delta < 0:
            raise ValueError(f"delta must be a count in [0, number of negatives], got {delta}")
        return
    if isinstance(delta, numbers.Real):
        if not 0.0 <= float(delta) < 1.0:
            raise ValueError(f"delta as a float must be a share in [0, 1), got {delta}")
        return
    raise TypeError(f"delta must be an int, a float or None, got {type(delta).__name__}")
