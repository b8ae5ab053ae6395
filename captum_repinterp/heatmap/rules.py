"""The rules drawn from the region's direction alone or with its members' stored
features (no forward pass): ``elementwise``, ``channel``, ``elementwise-positive``,
``elementwise-members`` and ``channel-members`` (the default)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from ..features import LayerLayout
from .base import HeatmapRule, RegionContext, register_heatmap_rule


@register_heatmap_rule
class ElementwiseRule(HeatmapRule):
    """``sum_k v[k, p] * A_k[p]``: the authors' rule (drawn at ``layer`` when given)."""

    name = "elementwise"
    supports_layer = True
    supports_input = True

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
class ElementwisePositiveRule(HeatmapRule):
    """``sum_k max(v[k, p], 0) * A_k[p]``: only the direction's positive part.

    With a ReLU layer ``A >= 0``, so a position scores high when its active channels
    all push the margins up; channels the region wants low do not cancel them.
    """

    name = "elementwise-positive"
    supports_layer = True
    supports_input = True

    def score_direction(
        self,
        direction: Tensor,
        channel_weights: Tensor | None = None,
        layout: LayerLayout | None = None,
    ) -> Tensor:
        return direction.clamp_min(0)

    def cam_weights(
        self, direction: Tensor, activation: Tensor, channel_weights: Tensor | None
    ) -> Tensor:
        return direction.clamp_min(0)


@register_heatmap_rule
class ElementwiseMembersRule(HeatmapRule):
    """``sum_k v[k, p] * A_k[p] / s_k``: the elementwise rule with each channel in units
    of its typical level in the region.

    ``s_k`` is the mean activation of channel ``k`` over the seed and its
    ``n_members`` nearest reference members (by semantic distance), read from the
    stored reference features, so it costs no forward pass. A channel that is large
    everywhere in the region then counts as much as a small one. Falls back to the
    elementwise rule for a layer with several outputs.
    """

    name = "elementwise-members"
    forward_passes = "0 (reads the stored features of 8 members)"
    supports_layer = True
    supports_input = True
    n_members: ClassVar[int] = 8

    def score_direction(
        self,
        direction: Tensor,
        channel_weights: Tensor | None = None,
        layout: LayerLayout | None = None,
    ) -> Tensor:
        """``v / s``: at an earlier ``layer`` the score ``(v / s) . psi`` (each channel of
        the split layer in units of its level ``s_k``) is drawn by gradient times
        activation; at the split layer that is this rule's own map."""
        if channel_weights is None or layout is None:
            return direction
        parts = layout.unflatten(direction if direction.dim() == 2 else direction[None])
        if len(parts) != 1:
            return direction
        scaled = layout.flatten((parts[0] * per_channel(channel_weights, parts[0]),))
        return scaled if direction.dim() == 2 else scaled[0]

    def cam_weights(
        self, direction: Tensor, activation: Tensor, channel_weights: Tensor | None
    ) -> Tensor:
        if channel_weights is None:
            return direction
        return direction * per_channel(channel_weights, activation)

    def region_weights(
        self,
        weight: Tensor,
        bias: Tensor,
        seed_inputs: tuple[Tensor, ...],
        seed_activations: tuple[Tensor, ...],
        features_of: Callable[[Tensor], Tensor],
        context: RegionContext | None = None,
    ) -> Tensor | None:
        if len(seed_activations) != 1 or seed_activations[0].dim() < 1:
            return None
        seed = seed_activations[0].detach().to("cpu", torch.float32)[None]
        a = seed if context is None else context.with_members(seed, self.n_members)
        return member_scale(self.channel_levels(a))

    def channel_levels(self, activations: Tensor) -> Tensor:
        """``n x K`` levels of the channels of ``n x K x ...`` activations: their means."""
        return activations.flatten(2).mean(dim=2) if activations.dim() > 2 else activations


@register_heatmap_rule
class ChannelMembersRule(ElementwiseMembersRule):
    """The ``"channel"`` map at the split layer, the ``"elementwise-members"`` map
    anywhere else (the input, or an earlier layer given by ``heatmap_layer``).

    At the split layer: ``relu(sum_k mean_p(v[k, p]) * A_k)``, Grad-CAM's form with the
    region's direction in place of the gradient. At the input or an earlier layer: the
    score ``(v / s) . psi`` (each channel in units of its level over the seed and its 8
    nearest reference members) drawn by gradient times activation. With
    ``heatmap_layer="auto"`` (the default) this is the pair the fifth version of the rule
    in ``docs/choices.md`` ranked first: the channel form where ``"auto"`` keeps the split
    layer (a deep head such as a ResNet's ``layer4``, or faces on grey), the member-scaled
    score where it draws at the input. No extra forward pass.
    """

    name = "channel-members"

    def cam_weights(
        self, direction: Tensor, activation: Tensor, channel_weights: Tensor | None
    ) -> Tensor:
        return ChannelRule.cam_weights(self, direction, activation, channel_weights)


def member_scale(levels: Tensor) -> Tensor:
    """``1 / s_k`` with ``s_k`` the mean of ``levels`` (``n x K``) over its rows, scaled
    so that the weights have mean 1; channels whose level is not positive get the
    largest weight of the others (float32)."""
    s = levels.double().mean(dim=0)
    ok = s > 0
    out = torch.zeros_like(s)
    out[ok] = 1.0 / s[ok]
    if bool(ok.any()):
        out[~ok] = out[ok].max()
        out = out / out.mean()
    else:
        out = torch.ones_like(s)
    return out.float()


def per_channel(channel_weights: Tensor, activation: Tensor) -> Tensor:
    """``K`` or ``n x K`` weights shaped to broadcast over ``n x K x ...``."""
    n = activation.shape[0]
    cw = channel_weights if channel_weights.dim() == 2 else channel_weights[None].expand(n, -1)
    return cw.to(activation.device, activation.dtype).reshape(
        n, cw.shape[-1], *([1] * (activation.dim() - 2))
    )
