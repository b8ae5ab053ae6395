"""Stage 5: heat maps from a boundary direction ``v`` and layer activations.

``v`` is the combination of the selected boundaries' normals (their sum by default), shaped
like the layer's output. Two rules, chosen by name:

- ``"elementwise"`` (default): ``sum_k v[k, p] * A_k(x')[p]`` at every position ``p``, the
  rule the authors' code uses to draw one boundary;
- ``"channel"``: Grad-CAM-like, ``alpha_k = mean_p v[k, p]`` and ``sum_k alpha_k A_k(x')``.

Outputs follow ``LayerGradCam``'s layout: the layer's shape with dimension 1 summed to 1
(``attr_dim_summation=True``), one tensor per layer output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .features import LayerLayout

__all__ = ["HEATMAP_RULES", "combine_normals", "layer_heatmap"]

HEATMAP_RULES = ("elementwise", "channel")
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


def layer_heatmap(
    direction: Tensor,
    activations: tuple[Tensor, ...],
    layout: LayerLayout,
    rule: str = "elementwise",
    relu: bool = True,
    attr_dim_summation: bool = True,
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

    Returns
    -------
    tuple of Tensor
        One map per layer tensor, ``LayerGradCam``-shaped.
    """
    if rule not in HEATMAP_RULES:
        raise ValueError(f"heatmap_rule must be one of {HEATMAP_RULES}, got {rule!r}")
    n = activations[0].shape[0]
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
