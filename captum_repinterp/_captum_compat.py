"""The one place where Captum's private helpers are imported.

Captum keeps its input/target formatting helpers in ``captum._utils``; they are not part
of its public API, so a Captum upgrade may move them. Everything in this package imports
them from here, so that such an upgrade touches one file.
"""

from __future__ import annotations

from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _select_targets,
)
from captum._utils.typing import TargetType
from captum.attr import GradientAttribution, LayerAttribution
from captum.log import log_usage

__all__ = [
    "GradientAttribution",
    "LayerAttribution",
    "TargetType",
    "_format_additional_forward_args",
    "_format_output",
    "_format_tensor_into_tuples",
    "_select_targets",
    "log_usage",
]
