"""The options of ``interpret``/``attribute``, validated once.

:class:`InterpretOptions` is built from the keyword arguments of the public methods and
passed down as one object, so every check runs once per call, in one place.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from torch import nn

from ._checks import check_choice, check_int
from .heatmap import COMBINE_RULES, HeatmapRule, get_heatmap_rule
from .solver import REFINE_MODES

__all__ = ["DEFAULT_HEATMAP_RULE", "InterpretOptions"]

#: The heat-map rule of ``interpret``/``attribute`` when none is given.
DEFAULT_HEATMAP_RULE = "elementwise-members"


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
    heatmap_layer: nn.Module | None = None

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
        if self.heatmap_layer is not None and not isinstance(self.heatmap_layer, nn.Module):
            raise TypeError(
                "heatmap_layer must be an nn.Module or None, got "
                f"{type(self.heatmap_layer).__name__}"
            )
        self.rule  # noqa: B018  (validates heatmap_rule and its combination with the layer)

    @property
    def rule(self) -> HeatmapRule:
        """The heat-map rule object (see :mod:`captum_repinterp.heatmap`)."""
        return get_heatmap_rule(self.heatmap_rule, self.heatmap_layer)


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
