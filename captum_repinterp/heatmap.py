"""Stage 5: heat maps of a region, one small class per rule.

A region's direction ``v`` (the combination of its selected boundaries' normals, shaped
like the layer's output) is drawn on any image's layer activations ``A`` as
``sum_k weights[k, p] * A_k[p]``, then summed over channels and passed through a ReLU as
``LayerGradCam`` does. A rule is a subclass of :class:`HeatmapRule` that implements one
method, :meth:`HeatmapRule.cam_weights` (as pytorch-grad-cam's CAM variants implement
``get_cam_weights``), registered by name with :func:`register_heatmap_rule`:

- ``"elementwise"`` (default): ``weights = v``, the rule the authors' code uses to draw
  one boundary; with ``layer=`` (``heatmap_layer``) it is drawn at an earlier layer, the
  gradient of the score ``v . psi`` there standing for ``v`` (:func:`pulled_back_heatmap`);
- ``"channel"``: Grad-CAM-like, ``weights_k = mean_p v[k, p]``;
- ``"region-score"``: Score-CAM-like channel weights scored by the *region*: each
  channel's activation on the seed, upsampled and min-max scaled, masks the seed; ``s_k``
  is how far the masked seed lies inside the region (the smallest signed distance
  ``h_j / ||w_j||`` over the selected boundaries) and ``weights = softmax(s)``, computed
  once on the seed (:meth:`HeatmapRule.region_weights`, ``K`` forward passes) and reused.

Outputs follow ``LayerGradCam``'s layout: the layer's shape with dimension 1 summed to 1
(``attr_dim_summation=True``), one tensor per layer output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import LayerLayout

__all__ = [
    "COMBINE_RULES",
    "HEATMAP_RULES",
    "ChannelRule",
    "ElementwiseRule",
    "HeatmapRule",
    "RegionScoreRule",
    "combine_normals",
    "get_heatmap_rule",
    "pulled_back_heatmap",
    "register_heatmap_rule",
]

COMBINE_RULES = ("sum", "unit")

#: Heat-map rules by name (see :func:`register_heatmap_rule`).
HEATMAP_RULES: dict[str, type[HeatmapRule]] = {}


def register_heatmap_rule(cls: type[HeatmapRule]) -> type[HeatmapRule]:
    """Class decorator: make a :class:`HeatmapRule` subclass available by its ``name``."""
    if not cls.name:
        raise ValueError("a heat-map rule needs a non-empty name")
    HEATMAP_RULES[cls.name] = cls
    return cls


def get_heatmap_rule(name: str, layer: nn.Module | None = None) -> HeatmapRule:
    """The rule registered as ``name``, drawn at ``layer`` (None: the split layer).

    Raises
    ------
    ValueError
        For an unknown name, or a layer given to a rule that cannot be drawn elsewhere.
    """
    if name not in HEATMAP_RULES:
        raise ValueError(f"heatmap_rule must be one of {tuple(HEATMAP_RULES)}, got {name!r}")
    return HEATMAP_RULES[name](layer)


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


class HeatmapRule:
    """How a region's direction becomes a heat map. Subclass, implement
    :meth:`cam_weights`, decorate with :func:`register_heatmap_rule`.

    Parameters
    ----------
    layer : nn.Module, optional
        Draw the map at this earlier layer (``heatmap_layer``); only rules with
        ``supports_layer`` accept it.

    Attributes
    ----------
    name : str
        The name ``heatmap_rule=`` selects it by.
    forward_passes : str
        Extra model forward passes per seed (its cost), for the docs and the evaluation.
    supports_layer : bool
        Whether the rule can be drawn at another layer than the split layer.
    """

    name: ClassVar[str] = ""
    forward_passes: ClassVar[str] = "0"
    supports_layer: ClassVar[bool] = False

    def __init__(self, layer: nn.Module | None = None) -> None:
        if layer is not None and not self.supports_layer:
            raise ValueError(
                f"heatmap_layer draws the elementwise rule at another layer; it cannot be "
                f"combined with heatmap_rule={self.name!r}"
            )
        self.layer = layer

    def cam_weights(
        self, direction: Tensor, activation: Tensor, channel_weights: Tensor | None
    ) -> Tensor:
        """Weights multiplied into ``activation`` position by position.

        Parameters
        ----------
        direction : Tensor
            ``n x K x ...``: the direction ``v`` for each example, shaped like the layer's
            tensor.
        activation : Tensor
            ``n x K x ...``: the layer's tensor.
        channel_weights : Tensor or None
            What :meth:`region_weights` computed for the region (``K`` or ``n x K``).

        Returns
        -------
        Tensor
            Broadcastable to ``activation``.
        """
        raise NotImplementedError

    def region_weights(
        self,
        weight: Tensor,
        bias: Tensor,
        seed_inputs: tuple[Tensor, ...],
        seed_activations: tuple[Tensor, ...],
        features_of: Callable[[Tensor], Tensor],
    ) -> Tensor | None:
        """Per-region weights computed once on the seed and saved with the region.

        ``weight``/``bias``: the selected boundaries; ``seed_inputs``: the seed (batch
        of one); ``seed_activations``: its layer tensors (without the batch dimension);
        ``features_of``: inputs ``B x ...`` to features ``B x D``. Default: None.
        """
        return None

    def draw(
        self,
        direction: Tensor,
        activations: tuple[Tensor, ...],
        layout: LayerLayout,
        channel_weights: Tensor | None = None,
        relu: bool = True,
        attr_dim_summation: bool = True,
    ) -> tuple[Tensor, ...]:
        """Heat maps of ``direction`` (``D``, or ``n x D`` one per example) on a batch
        of the split layer's ``activations``, one ``LayerGradCam``-shaped map per layer
        tensor."""
        n = activations[0].shape[0]
        if direction.dim() == 1:
            direction = direction[None].expand(n, -1)
        parts = layout.unflatten(direction.to(activations[0].device, activations[0].dtype))
        maps = []
        for v, a in zip(parts, activations):
            scaled = self.cam_weights(v, a, channel_weights) * a
            if attr_dim_summation and scaled.dim() > 1:
                scaled = scaled.sum(dim=1, keepdim=True)
            maps.append(F.relu(scaled) if relu else scaled)
        return tuple(maps)

    def maps(
        self,
        reader: Any,
        inputs: Any,
        additional_forward_args: Any,
        direction: Tensor,
        channel_weights: Tensor | None = None,
        relu: bool = True,
        attr_dim_summation: bool = True,
        activations: tuple[Tensor, ...] | None = None,
    ) -> tuple[Tensor, ...]:
        """Heat maps on new ``inputs``, read through a
        :class:`~captum_repinterp.reader.LayerReader` (``activations``: the split
        layer's tensors when already read)."""
        if self.layer is not None:
            return reader.pulled_back(
                inputs, additional_forward_args, direction, self.layer, relu, attr_dim_summation
            )
        if activations is None:
            activations, _ = reader.read(inputs, additional_forward_args)
        return self.draw(
            direction, activations, reader.layout, channel_weights, relu, attr_dim_summation
        )


@register_heatmap_rule
class ElementwiseRule(HeatmapRule):
    """``sum_k v[k, p] * A_k[p]``: the default (drawn at ``layer`` when given)."""

    name = "elementwise"
    supports_layer = True

    def cam_weights(
        self, direction: Tensor, activation: Tensor, channel_weights: Tensor | None
    ) -> Tensor:
        return direction


@register_heatmap_rule
class ChannelRule(HeatmapRule):
    """Grad-CAM-like: one weight per channel, ``mean_p v[k, p]``."""

    name = "channel"

    def cam_weights(
        self, direction: Tensor, activation: Tensor, channel_weights: Tensor | None
    ) -> Tensor:
        if direction.dim() > 2:
            return direction.mean(dim=tuple(range(2, direction.dim())), keepdim=True)
        return direction


@register_heatmap_rule
class RegionScoreRule(HeatmapRule):
    """Score-CAM-like channel weights scored by how far masked seeds lie in the region."""

    name = "region-score"
    forward_passes = "K (channels of the layer), once per seed"

    def cam_weights(
        self, direction: Tensor, activation: Tensor, channel_weights: Tensor | None
    ) -> Tensor:
        if channel_weights is None:
            raise ValueError("heatmap_rule='region-score' needs the region's channel weights")
        n = activation.shape[0]
        cw = channel_weights if channel_weights.dim() == 2 else channel_weights[None].expand(n, -1)
        return cw.to(activation.device, activation.dtype).reshape(
            n, -1, *([1] * (activation.dim() - 2))
        )

    def draw(
        self,
        direction: Tensor,
        activations: tuple[Tensor, ...],
        layout: LayerLayout,
        channel_weights: Tensor | None = None,
        relu: bool = True,
        attr_dim_summation: bool = True,
    ) -> tuple[Tensor, ...]:
        if len(activations) != 1:
            raise ValueError("heatmap_rule='region-score' needs a layer with one output")
        return super().draw(
            direction, activations, layout, channel_weights, relu, attr_dim_summation
        )

    def region_weights(
        self,
        weight: Tensor,
        bias: Tensor,
        seed_inputs: tuple[Tensor, ...],
        seed_activations: tuple[Tensor, ...],
        features_of: Callable[[Tensor], Tensor],
    ) -> Tensor:
        if (
            len(seed_inputs) != 1
            or seed_inputs[0].dim() != 4
            or len(seed_activations) != 1
            or seed_activations[0].dim() != 3
        ):
            raise ValueError(
                "heatmap_rule='region-score' needs one image input (1 x C x H x W) and a "
                "convolutional layer with one output (K x h x w); use 'elementwise'"
            )
        return region_score_weights(seed_inputs[0], seed_activations[0], features_of, weight, bias)


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
        seed_activation[:, None].float(),
        size=tuple(seed_inputs.shape[-2:]),
        mode="bilinear",
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
