"""Stage 5: heat maps from a boundary direction ``v`` and layer activations.

``v`` is the combination of the selected boundaries' normals (their sum by default), shaped
like the layer's output. Two rules, chosen by name:

- ``"elementwise"`` (default): ``sum_k v[k, p] * A_k(x')[p]`` at every position ``p``, the
  rule the authors' code uses to draw one boundary;
- ``"channel"``: Grad-CAM-like, ``alpha_k = mean_p v[k, p]`` and ``sum_k alpha_k A_k(x')``;
- ``"region-score"``: Score-CAM-like channel weights scored by the *region*: each channel's
  activation on the seed, upsampled and min-max scaled, masks the seed; ``s_k`` is how far
  the masked seed lies inside the region (the smallest signed distance
  ``h_j / ||w_j||`` over the selected boundaries) and ``alpha = softmax(s)``. The map is
  ``sum_k alpha_k A_k(x')``; the weights are computed once on the seed and reused.

Outputs follow ``LayerGradCam``'s layout: the layer's shape with dimension 1 summed to 1
(``attr_dim_summation=True``), one tensor per layer output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import LayerLayout

__all__ = ["HEATMAP_RULES", "combine_normals", "layer_heatmap", "pulled_back_heatmap"]

HEATMAP_RULES = ("elementwise", "channel", "region-score")
COMBINE_RULES = ("sum", "unit")


def combine_normals(weight: Tensor, rule: str = "sum") -> Tensor:
    """Combine the selected normals ``k x D`` into one direction ``D``.

    ``"sum"`` adds them as they are; ``"unit"`` adds them after scaling each to unit norm,
    so that every selected boundary weighs the same.
    """
    if rule not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {rule!r}")
    if weight.shape[0] == 0:
        return weight.new_zeros(weight.shape[1])
    w = weight
    if rule == "unit":
        w = w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return w.sum(dim=0)


def region_score_weights(
    seed_inputs: Tensor,
    seed_activation: Tensor,
    features_of: Callable[[Tensor], Tensor],
    weight: Tensor,
    bias: Tensor,
) -> Tensor:
    """Channel weights of the ``"region-score"`` rule (one forward pass of ``K`` images).

    Parameters
    ----------
    seed_inputs : Tensor
        ``1 x C x H x W``: the seed image.
    seed_activation : Tensor
        ``K x h x w``: the seed's activations at the layer.
    features_of : callable
        Maps a batch of inputs (``B x C x H x W``) to layer features (``B x D``).
    weight, bias : Tensor
        The selected boundaries (``k x D``, ``k``), oriented so the region is ``h > 0``.

    Returns
    -------
    Tensor
        ``K`` weights ``softmax_k(min_j h_j(psi(x * M_k)) / ||w_j||)``, float32 on the CPU;
        uniform when no boundary is selected.
    """
    k_channels = seed_activation.shape[0]
    if weight.shape[0] == 0:
        return torch.full((k_channels,), 1.0 / k_channels)
    masks = F.interpolate(
        seed_activation[:, None].float(), size=tuple(seed_inputs.shape[-2:]), mode="bilinear",
        align_corners=False,
    )[:, 0]
    lo = masks.flatten(1).min(dim=1).values[:, None, None]
    hi = masks.flatten(1).max(dim=1).values[:, None, None]
    masks = (masks - lo) / (hi - lo).clamp_min(1e-12)
    masked = seed_inputs * masks[:, None].to(seed_inputs.dtype)
    feats = features_of(masked).to("cpu", torch.float32)
    w = weight.to("cpu", torch.float32)
    dist = (feats @ w.T + bias.to("cpu", torch.float32)[None]) / w.norm(dim=1)[None]
    return torch.softmax(dist.min(dim=1).values.double(), dim=0).float()


def layer_heatmap(
    direction: Tensor,
    activations: tuple[Tensor, ...],
    layout: LayerLayout,
    rule: str = "elementwise",
    relu: bool = True,
    attr_dim_summation: bool = True,
    channel_weights: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Heat maps of ``direction`` on a batch of layer activations.

    Parameters
    ----------
    direction : Tensor
        ``D`` (shared by the batch) or ``n x D`` (one per example).
    activations : tuple of Tensor
        The layer's tensors for ``n`` examples, shaped as in ``layout``.
    layout : LayerLayout
        Shapes of the layer's tensors.
    rule : str
        ``"elementwise"`` or ``"channel"``.
    relu : bool
        Apply a ReLU to the result (``relu_attributions``).
    attr_dim_summation : bool
        Sum over dimension 1 (channels), as ``LayerGradCam`` does.
    channel_weights : Tensor, optional
        ``K`` or ``n x K`` weights of the ``"region-score"`` rule (required by it).

    Returns
    -------
    tuple of Tensor
        One map per layer tensor, ``LayerGradCam``-shaped.
    """
    if rule not in HEATMAP_RULES:
        raise ValueError(f"heatmap_rule must be one of {HEATMAP_RULES}, got {rule!r}")
    n = activations[0].shape[0]
    if rule == "region-score":
        if channel_weights is None or len(activations) != 1:
            raise ValueError(
                "heatmap_rule='region-score' needs channel weights and a layer with one output"
            )
        a = activations[0]
        cw = channel_weights if channel_weights.dim() == 2 else channel_weights[None].expand(n, -1)
        cw = cw.to(a.device, a.dtype).reshape(n, -1, *([1] * (a.dim() - 2)))
        scaled = cw * a
        if attr_dim_summation:
            scaled = scaled.sum(dim=1, keepdim=True)
        return (F.relu(scaled) if relu else scaled,)
    if direction.dim() == 1:
        direction = direction[None].expand(n, -1)
    parts = layout.unflatten(direction.to(activations[0].device, activations[0].dtype))
    maps = []
    for v, a in zip(parts, activations):
        if rule == "channel" and v.dim() > 2:
            v = v.mean(dim=tuple(range(2, v.dim())), keepdim=True)
        scaled = v * a
        if attr_dim_summation and scaled.dim() > 1:
            scaled = scaled.sum(dim=1, keepdim=True)
        maps.append(F.relu(scaled) if relu else scaled)
    return tuple(maps)


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
    heatmap_layer : nn.Module
        A layer the model runs before ``layer``, on the path from the inputs to it.
    inputs, additional_forward_args : tuple
        The examples (batch first) and extra arguments of ``forward_func``.
    directions : Tensor
        ``D`` (shared) or ``n x D`` (one per example): the directions ``v``.
    layout : LayerLayout
        Shapes of ``layer``'s tensors.
    attribute_to_layer_input, relu, attr_dim_summation : bool
        As in :func:`layer_heatmap`.

    Returns
    -------
    tuple of Tensor
        ``LayerGradCam``-shaped maps at ``heatmap_layer`` (one per tensor it outputs).
    """
    from captum.attr import LayerGradientXActivation

    n = inputs[0].shape[0]
    dirs = directions if directions.dim() == 2 else directions[None].expand(n, -1)
    k = len(inputs)

    def along_direction(*args: Any) -> Tensor:
        seen: list[Any] = []

        def keep(module: nn.Module, inp: Any, out: Any) -> None:
            seen.append(inp if attribute_to_layer_input else out)

        handle = layer.register_forward_hook(keep)
        try:
            forward_func(*args)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ValueError("layer: expected the layer to run once per forward pass")
        value = seen[0]
        tensors = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        psi = layout.flatten(tensors)
        return (psi * dirs.to(psi.device, psi.dtype)).sum(dim=1)

    explainer = LayerGradientXActivation(along_direction, heatmap_layer)
    try:
        attr = explainer.attribute(
            inputs if k > 1 else inputs[0], additional_forward_args=additional_forward_args
        )
    except RuntimeError as exc:
        if "not have been used in the graph" in str(exc) or "does not require grad" in str(exc):
            raise ValueError(
                "heatmap_layer: the score at layer does not depend on heatmap_layer's "
                "output; pass a layer that runs before layer, on the path to it"
            ) from exc
        raise
    maps = attr if isinstance(attr, tuple) else (attr,)
    out = []
    for m in maps:
        if attr_dim_summation and m.dim() > 1:
            m = m.sum(dim=1, keepdim=True)
        out.append(F.relu(m) if relu else m)
    return tuple(t.detach() for t in out)
