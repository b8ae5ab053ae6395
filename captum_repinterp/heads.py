"""The head ``G: psi -> logits``: the part of the network after the split layer.

Either given by the user (``head(layer_output) -> logits``, wrapped by :class:`UserHead`)
or derived from the model (:class:`HookHead`): the model is run on the seed's input with
the layer's output replaced, through a forward hook, by the points where the head is
evaluated. Both take ``B x D`` features and return ``B x C`` logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._captum_compat import _expand_additional_forward_args
from .features import LayerLayout, flatten_logits, forward_with_layer

__all__ = ["HookHead", "UserHead", "make_head"]


class HookHead:
    """The head ``psi -> logits`` derived from the model by replacing the layer's output.

    The part of the model before the layer is run on ``inputs`` (one example); the
    layer's output is replaced by the batch of points. When the model uses its input
    again after the layer (a skip connection around the layer), the head is the one *at
    that input*, which is what the method needs for that seed.

    Speed: the part before the layer is run on the single example and only the layer's
    output carries the batch (the rest of the model broadcasts or never looks at the
    input again). Whether that gives the same logits as running the model on the
    example repeated ``B`` times is checked on the first call with ``B > 1``; if it does
    not (or fails), every call runs the repeated batch.
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        inputs: tuple[Tensor, ...],
        additional_forward_args: tuple | None,
        layout: LayerLayout,
        attribute_to_layer_input: bool = False,
    ) -> None:
        if any(t.shape[0] != 1 for t in inputs):
            raise ValueError("HookHead needs the inputs of exactly one example")
        self.forward_func = forward_func
        self.layer = layer
        self.inputs = inputs
        self.additional_forward_args = additional_forward_args
        self.layout = layout
        self.attribute_to_layer_input = attribute_to_layer_input
        self.broadcast: bool | None = None  # decided on the first call with B > 1

    def _run(self, psi: Tensor, repeat: bool, rows: int | None = None) -> Tensor:
        b = psi.shape[0]
        inputs, extra = self.inputs, self.additional_forward_args
        if repeat:
            inputs = tuple(t.expand(b, *t.shape[1:]).contiguous() for t in inputs)
            extra = _expand_additional_forward_args(extra, b)
        _, _, out = forward_with_layer(
            self.forward_func,
            self.layer,
            inputs,
            extra,
            self.attribute_to_layer_input,
            replace=psi,
            layout=self.layout,
        )
        return flatten_logits(out, b if rows is None else rows)

    def __call__(self, psi: Tensor, rows: int | None = None) -> Tensor:
        """Logits ``B x C`` at features ``psi`` (``B x D``).

        ``rows``: the number of output rows to expect when it differs from ``B`` (a
        hook further down replaces a tensor by a batch, see ``ProjectedHead``).
        """
        if rows is not None:
            return self._run(psi, repeat=True, rows=rows)
        if psi.shape[0] == 1 or self.broadcast is False:
            return self._run(psi, repeat=True)
        if self.broadcast:
            return self._run(psi, repeat=False)
        full = self._run(psi, repeat=True)
        try:
            with torch.no_grad():
                fast = self._run(psi.detach(), repeat=False)
            self.broadcast = fast.shape == full.shape and torch.allclose(
                fast, full.detach(), rtol=1e-5, atol=1e-6
            )
        except (RuntimeError, ValueError):
            self.broadcast = False
        return full


class UserHead:
    """Wraps a user-given ``head(layer_output) -> logits`` to take ``B x D`` features."""

    def __init__(self, head: Callable, layout: LayerLayout) -> None:
        self.head = head
        self.layout = layout

    def __call__(self, psi: Tensor, rows: int | None = None) -> Tensor:
        """Logits ``B x C`` at features ``psi``; ``rows`` as in :class:`HookHead`."""
        parts = self.layout.unflatten(psi)
        out = self.head(parts if self.layout.is_tuple else parts[0])
        if not isinstance(out, Tensor):
            raise TypeError(f"head must return a tensor, got {type(out).__name__}")
        return flatten_logits(out, psi.shape[0] if rows is None else rows)


def make_head(
    forward_func: Callable,
    layer: nn.Module,
    layout: LayerLayout,
    head: Callable | None,
    inputs: tuple[Tensor, ...],
    additional_forward_args: tuple | None,
    attribute_to_layer_input: bool = False,
) -> HookHead | UserHead:
    """The head for one seed: the user's ``head`` when given, else a :class:`HookHead`
    anchored at ``inputs`` (one example)."""
    if head is not None:
        return UserHead(head, layout)
    return HookHead(
        forward_func, layer, inputs, additional_forward_args, layout, attribute_to_layer_input
    )
