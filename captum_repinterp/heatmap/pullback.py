"""Maps drawn at an earlier layer or at the input: the gradient of the region's score
``v . psi`` there stands for the direction ``v`` (:func:`pulled_back_heatmap`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..features import LayerLayout
from .base import layer_map


def check_input_dtypes(inputs: tuple[Tensor, ...]) -> None:
    """``heatmap_layer="input"`` multiplies each input tensor by its gradient, which
    exists for floating-point tensors only.

    Raises
    ------
    TypeError
        Naming ``heatmap_layer``, for an input tensor of another dtype.
    """
    for t in inputs:
        if isinstance(t, Tensor) and not t.is_floating_point():
            raise TypeError(
                f"heatmap_layer='input' draws input times gradient, which needs "
                f"floating-point inputs, got {t.dtype}; pass heatmap_layer=None or a layer"
            )


def pulled_back_heatmap(
    forward_func: Callable,
    layer: nn.Module,
    heatmap_layer: nn.Module,
    inputs: tuple[Tensor, ...],
    additional_forward_args: tuple | None,
    directions: Tensor,
    layout: LayerLayout,
    attribute_to_layer_input: bool = False,
    relu: bool = True,
    attr_dim_summation: bool = True,
) -> tuple[Tensor, ...]:
    """The elementwise rule drawn at an earlier layer (``heatmap_layer=``).

    The region lives at ``layer`` (features ``psi``); its direction ``v`` defines the
    linear score ``v . psi``. At ``heatmap_layer`` (activations ``A'``, finer maps) the
    map of an input is ``sum_k (d(v . psi)/dA')[k, p] * A'_k[p]``: gradient times
    activation of that score, computed with Captum's ``LayerGradientXActivation``. At
    ``heatmap_layer = layer`` the gradient is ``v`` itself and this is exactly the
    ``"elementwise"`` rule, so it is the same rule at another resolution.

    Parameters
    ----------
    forward_func, layer : callable, nn.Module
        The model and the split layer.
    heatmap_layer : nn.Module or "input"
        A layer the model runs before ``layer``, on the path from the inputs to it, or
        ``"input"``: the map is then ``sum_c x_c * d(v . psi)/dx_c`` per pixel (Captum's
        ``InputXGradient``), one map per input tensor.
    inputs, additional_forward_args : tuple
        The examples (batch first) and extra arguments of ``forward_func``.
    directions : Tensor
        ``D`` (shared) or ``n x D`` (one per example): the directions ``v``.
    layout : LayerLayout
        Shapes of ``layer``'s tensors.
    attribute_to_layer_input, relu, attr_dim_summation : bool
        As in :meth:`HeatmapRule.draw` (``relu`` is ``relu_attributions``).

    Returns
    -------
    tuple of Tensor
        ``LayerGradCam``-shaped maps at ``heatmap_layer`` (one per tensor it outputs; at
        the input ``N x 1 x H x W`` per input tensor).
    """
    from captum.attr import InputXGradient, LayerGradientXActivation

    n = inputs[0].shape[0]
    if isinstance(heatmap_layer, str):
        check_input_dtypes(inputs)
    if n == 0:  # no gradient to take; at the input the maps' shape is known
        if not isinstance(heatmap_layer, str):
            raise ValueError("inputs: an empty batch has no maps at heatmap_layer")
        return tuple(
            layer_map(t.detach().new_zeros(t.shape), relu, attr_dim_summation) for t in inputs
        )
    dirs = directions if directions.dim() == 2 else directions[None].expand(n, -1)
    k = len(inputs)

    def along_direction(*args: Any) -> Tensor:
        seen: list[Any] = []

        def keep(value: Any) -> Any:
            # what runs after gets copies, so that an in-place operation there (DenseNet's
            # F.relu(features, inplace=True), or the layer itself on its input) cannot
            # change the tensors the score is taken at: psi as fit read it
            seen.append(value)
            if isinstance(value, (tuple, list)):
                return type(value)(t.clone() if isinstance(t, Tensor) else t for t in value)
            return value.clone() if isinstance(value, Tensor) else value

        if attribute_to_layer_input:
            handle = layer.register_forward_pre_hook(lambda module, inp: keep(inp))
        else:
            handle = layer.register_forward_hook(lambda module, inp, out: keep(out))
        calls: list[int] = []
        counter = (
            None
            if isinstance(heatmap_layer, str)
            else heatmap_layer.register_forward_hook(lambda *_: calls.append(1))
        )
        try:
            forward_func(*args)
        finally:
            handle.remove()
            if counter is not None:
                counter.remove()
        if len(seen) != 1:
            raise ValueError("layer: expected the layer to run once per forward pass")
        if counter is not None and len(calls) != 1:
            raise ValueError(
                f"heatmap_layer: the layer runs {len(calls)} times per forward pass; pass a "
                "layer that runs once (its map would mix the calls)"
            )
        value = seen[0]
        tensors = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        psi = layout.flatten(tensors)
        return (psi * dirs.to(psi.device, psi.dtype)).sum(dim=1)

    if isinstance(heatmap_layer, str):  # INPUT: input times gradient of the same score
        explainer = InputXGradient(along_direction)
        inputs = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    else:
        explainer = LayerGradientXActivation(along_direction, heatmap_layer)
    try:
        attr = explainer.attribute(
            inputs if k > 1 else inputs[0], additional_forward_args=additional_forward_args
        )
    except RuntimeError as exc:
        unused = "not have been used in the graph" in str(exc)
        if unused and isinstance(heatmap_layer, str):
            raise ValueError(
                "heatmap_layer='input': the score at layer does not depend on every input "
                "tensor (an input the model ignores has no map); pass heatmap_layer=None"
            ) from exc
        if unused or "does not require grad" in str(exc):
            raise ValueError(
                "heatmap_layer: the score at layer does not depend on heatmap_layer's "
                "output; pass a layer that runs before layer, on the path to it"
            ) from exc
        raise
    maps = attr if isinstance(attr, tuple) else (attr,)
    return tuple(layer_map(m, relu, attr_dim_summation).detach() for m in maps)
