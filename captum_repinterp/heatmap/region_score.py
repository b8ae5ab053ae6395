"""The Score-CAM-like rules scored by the region: ``region-score`` and
``region-members`` (forward passes of masked images, once per seed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features import LayerLayout
from .base import HeatmapRule, RegionContext, layer_map, register_heatmap_rule
from .rules import per_channel


@register_heatmap_rule
class RegionScoreRule(HeatmapRule):
    """Score-CAM-like channel weights scored by how far masked seeds lie in the region.

    With ``layer`` (``heatmap_layer=``) the channels are those of that earlier layer:
    its activations mask the seed and are weighted on new images, for a finer map.
    """

    name = "region-score"
    forward_passes = "K (channels of the layer), once per seed"
    cost_per_channel = 1
    supports_layer = True
    #: nearest reference members scored with the seed (0: the seed alone)
    n_members: ClassVar[int] = 0
    #: divide each image's scores by their standard deviation before the softmax
    scale_free: ClassVar[bool] = False
    #: return None (draw the elementwise rule) instead of raising when not applicable
    fallback: ClassVar[bool] = False

    def cam_weights(
        self, direction: Tensor, activation: Tensor, channel_weights: Tensor | None
    ) -> Tensor:
        if channel_weights is None:
            if self.fallback:
                return direction
            raise ValueError(f"heatmap_rule={self.name!r} needs the region's channel weights")
        return per_channel(channel_weights, activation)

    def draw(
        self,
        direction: Tensor,
        activations: tuple[Tensor, ...],
        layout: LayerLayout,
        channel_weights: Tensor | None = None,
        relu: bool = True,
        attr_dim_summation: bool = True,
    ) -> tuple[Tensor, ...]:
        if len(activations) != 1 and not (self.fallback and channel_weights is None):
            raise ValueError(f"heatmap_rule={self.name!r} needs a layer with one output")
        return super().draw(
            direction, activations, layout, channel_weights, relu, attr_dim_summation
        )

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
        if self.layer is None:
            return super().maps(
                reader,
                inputs,
                additional_forward_args,
                direction,
                channel_weights,
                relu,
                attr_dim_summation,
                activations,
            )
        if channel_weights is None:
            raise ValueError(f"heatmap_rule={self.name!r} needs the region's channel weights")
        acts = read_layer(reader, self.layer, inputs, additional_forward_args)
        return (layer_map(per_channel(channel_weights, acts) * acts, relu, attr_dim_summation),)

    def region_weights(
        self,
        weight: Tensor,
        bias: Tensor,
        seed_inputs: tuple[Tensor, ...],
        seed_activations: tuple[Tensor, ...],
        features_of: Callable[[Tensor], Tensor],
        context: RegionContext | None = None,
    ) -> Tensor | None:
        if self.layer is not None:
            if context is None:
                raise ValueError(f"heatmap_rule={self.name!r} at heatmap_layer needs the model")
            seed_activations = (
                read_layer(
                    context.reader, self.layer, seed_inputs, context.additional_forward_args
                )[0],
            )
        if (
            len(seed_inputs) != 1
            or seed_inputs[0].dim() != 4
            or len(seed_activations) != 1
            or seed_activations[0].dim() != 3
        ):
            if self.fallback:
                return None
            raise ValueError(
                f"heatmap_rule={self.name!r} needs one image input (1 x C x H x W) and a "
                "convolutional layer with one output (K x h x w); use 'elementwise'"
            )
        images, acts = seed_inputs[0], seed_activations[0][None]
        if self.n_members and context is not None and context.additional_forward_args is None:
            rows = context.nearest_members(self.n_members, seed_inputs)
            if rows.numel():
                more = context.references.inputs[rows].to(images.device, images.dtype)
                if self.layer is None:
                    feats = context.references.features[rows]
                    more_acts = feats.reshape(rows.numel(), *acts.shape[1:])
                else:
                    more_acts = read_layer(context.reader, self.layer, (more,), None)
                images = torch.cat([images, more])
                acts = torch.cat(
                    [acts.to("cpu", torch.float32), more_acts.to("cpu", torch.float32)]
                )
        return region_score_weights(
            images, acts, features_of, weight, bias, scale_free=self.scale_free
        )


@register_heatmap_rule
class RegionMembersRule(RegionScoreRule):
    """``"region-score"`` scored on the seed and its nearest reference members.

    The map is reused on the region's members, so its channel weights are chosen for
    them: each of the seed and its ``n_members`` nearest reference members (by
    semantic distance; the reference images ``fit`` was given as a tensor) is masked by
    each channel, its scores divided by their standard deviation (so that the softmax
    does not depend on the margins' scale), and the softmax weights are averaged over
    the images. Without reference images (``fit`` on a Dataset or DataLoader) or with
    ``additional_forward_args`` it scores the seed alone; on a layer or input where
    ``"region-score"`` does not apply it draws the elementwise map.
    """

    name = "region-members"
    forward_passes = "9 K (channels of the layer, for the seed and 8 members), once per seed"
    cost_per_channel = 9
    n_members = 8
    scale_free = True
    fallback = True


def read_layer(
    reader: Any, layer: nn.Module, inputs: Any, additional_forward_args: Any = None
) -> Tensor:
    """``layer``'s output (one tensor) on ``inputs`` through ``reader``'s model, no grad.

    Raises
    ------
    ValueError
        When the layer does not run, runs more than once, gives several tensors, or
        finishes after ``reader``'s split layer.
    """
    from .._captum_compat import _format_additional_forward_args
    from ..inputs import format_inputs

    inputs_t = format_inputs(inputs)
    device = reader.device
    if device is not None:
        inputs_t = tuple(t.to(device) for t in inputs_t)
    extra = _format_additional_forward_args(additional_forward_args)
    seen: list[tuple[Any, bool]] = []  # (layer's output, had the split layer finished?)
    split_ends: list[bool] = []
    split = getattr(reader, "layer", None)
    handles = [layer.register_forward_hook(lambda m, i, out: seen.append((out, bool(split_ends))))]
    if split is not None and split is not layer:
        handles.append(split.register_forward_hook(lambda *_: split_ends.append(True)))
    try:
        with torch.no_grad():
            reader.forward_func(*inputs_t, *(extra or ()))
    finally:
        for h in handles:
            h.remove()
    if len(seen) != 1 or not isinstance(seen[0][0], Tensor):
        raise ValueError(
            "heatmap_layer: expected a layer that runs once per forward pass and outputs one tensor"
        )
    out, after_split = seen[0]
    if after_split:
        raise ValueError(
            "heatmap_layer: the layer runs after the split layer; pass a layer that runs "
            "before it, on the path to it (a finer map of the same region)"
        )
    return out.detach()


def region_score_weights(
    seed_inputs: Tensor,
    seed_activation: Tensor,
    features_of: Callable[[Tensor], Tensor],
    weight: Tensor,
    bias: Tensor,
    scale_free: bool = False,
) -> Tensor:
    """Channel weights of the ``"region-score"`` rules (one forward pass of ``K`` images
    per scored image).

    Parameters
    ----------
    seed_inputs : Tensor
        ``B x C x H x W``: the scored images (the seed, then members if any).
    seed_activation : Tensor
        ``K x h x w`` (one image) or ``B x K x h x w``: their activations at the layer
        whose channels mask them.
    features_of : callable
        Maps a batch of inputs (``B x C x H x W``) to layer features (``B x D``).
    weight, bias : Tensor
        The selected boundaries (``k x D``, ``k``), oriented so the region is ``h > 0``.
    scale_free : bool
        Divide each image's scores by their standard deviation over channels before
        the softmax.

    Returns
    -------
    Tensor
        ``K`` weights, the mean over images of
        ``softmax_k(s_ik)``, ``s_ik = min_j h_j(psi(x_i * M_ik)) / ||w_j||`` (divided by
        ``std_k s_ik`` when ``scale_free``), float32 on the CPU; zeros when no
        boundary is selected (the map is then zero, like every rule's).
    """
    acts = seed_activation if seed_activation.dim() == 4 else seed_activation[None]
    k_channels = acts.shape[1]
    if weight.shape[0] == 0:  # no boundary: no region score, a zero map (as documented)
        return torch.zeros(k_channels)
    w = weight.to("cpu", torch.float32)
    b = bias.to("cpu", torch.float32)
    norms = w.norm(dim=1)
    weights = []
    for i in range(acts.shape[0]):
        image = seed_inputs[i : i + 1]
        masks = F.interpolate(
            acts[i][:, None].float(),
            size=tuple(image.shape[-2:]),
            mode="bilinear",
            align_corners=False,
        )[:, 0]
        lo = masks.flatten(1).min(dim=1).values[:, None, None]
        hi = masks.flatten(1).max(dim=1).values[:, None, None]
        masks = (masks - lo) / (hi - lo).clamp_min(1e-12)
        masked = image * masks[:, None].to(image.device, image.dtype)
        feats = features_of(masked).to("cpu", torch.float32)
        score = ((feats @ w.T + b[None]) / norms[None]).min(dim=1).values.double()
        if scale_free:
            score = score / score.std(correction=0).clamp_min(1e-12)
        weights.append(torch.softmax(score, dim=0))
    return torch.stack(weights).mean(dim=0).float()
