"""Stage 5: heat maps of a region, one small class per rule.

A region's direction ``v`` (the combination of its selected boundaries' normals, shaped
like the layer's output) is drawn on any image's layer activations ``A`` as
``sum_k weights[k, p] * A_k[p]``, then summed over channels and passed through a ReLU as
``LayerGradCam`` does. A rule is a subclass of :class:`HeatmapRule` that implements one
method, :meth:`HeatmapRule.cam_weights` (as pytorch-grad-cam's CAM variants implement
``get_cam_weights``), registered by name with :func:`register_heatmap_rule`:

- ``"elementwise"``: ``weights = v``, the rule the authors' code uses to draw
  one boundary; with ``layer=`` (``heatmap_layer``) it is drawn at an earlier layer, the
  gradient of the score ``v . psi`` there standing for ``v`` (:func:`pulled_back_heatmap`);
- ``"channel"``: Grad-CAM-like, ``weights_k = mean_p v[k, p]``;
- ``"elementwise-positive"``: ``weights = max(v, 0)``;
- ``"elementwise-members"``: ``weights = v / s_k``, ``s_k`` the mean activation of
  channel ``k`` over the seed and its 8 nearest reference members (no forward pass);
- ``"channel-members"`` (default): ``"channel"`` at the split layer,
  ``"elementwise-members"`` drawn at the input or an earlier layer (``layer=``);
- ``"region-score"``: Score-CAM-like channel weights scored by the *region*: each
  channel's activation on the seed, upsampled and min-max scaled, masks the seed; ``s_k``
  is how far the masked seed lies inside the region (the smallest signed distance
  ``h_j / ||w_j||`` over the selected boundaries) and ``weights = softmax(s)``, computed
  once on the seed (:meth:`HeatmapRule.region_weights`, ``K`` forward passes) and reused;
  with ``layer=`` the channels are those of that earlier, finer layer;
- ``"region-members"``: ``"region-score"`` computed on the seed and its 8 nearest
  reference members, each image's scores divided by their standard deviation before the
  softmax, the weights averaged (``9 K`` forward passes).

A rule's :meth:`HeatmapRule.region_weights` sees the region's members and the fitted
references through a :class:`RegionContext`: only references, never held-out images.

Outputs follow ``LayerGradCam``'s layout: the layer's shape with dimension 1 summed to 1
(``attr_dim_summation=True``), one tensor per layer output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import LayerLayout

__all__ = [
    "COMBINE_RULES",
    "HEATMAP_RULES",
    "INPUT",
    "ChannelMembersRule",
    "ChannelRule",
    "ElementwiseMembersRule",
    "ElementwisePositiveRule",
    "ElementwiseRule",
    "HeatmapRule",
    "RegionContext",
    "RegionMembersRule",
    "RegionScoreRule",
    "check_input_dtypes",
    "combine_normals",
    "get_heatmap_rule",
    "member_scale",
    "pulled_back_heatmap",
    "read_layer",
    "region_score_weights",
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


#: ``heatmap_layer`` value that draws the map at the model's input.
INPUT = "input"


def get_heatmap_rule(name: str, layer: nn.Module | str | None = None) -> HeatmapRule:
    """The rule registered as ``name``, drawn at ``layer`` (None: the split layer,
    ``"input"``: the model's input).

    Raises
    ------
    ValueError
        For an unknown name, or a layer given to a rule that cannot be drawn elsewhere.
    """
    if name not in HEATMAP_RULES:
        raise ValueError(f"heatmap_rule must be one of {tuple(HEATMAP_RULES)}, got {name!r}")
    return HEATMAP_RULES[name](layer)


def layer_map(scaled: Tensor, relu: bool = True, attr_dim_summation: bool = True) -> Tensor:
    """``LayerGradCam``'s layout of weights times activations: summed over dimension 1
    (``attr_dim_summation``, for tensors with more than one dimension), then a ReLU
    (``relu``, ``relu_attributions``)."""
    if attr_dim_summation and scaled.dim() > 1:
        scaled = scaled.sum(dim=1, keepdim=True)
    return F.relu(scaled) if relu else scaled


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
    layer : nn.Module or "input", optional
        Draw the map at this earlier layer (``heatmap_layer``); only rules with
        ``supports_layer`` accept it (``"input"``: rules with ``supports_input``).

    Attributes
    ----------
    name : str
        The name ``heatmap_rule=`` selects it by.
    forward_passes : str
        Extra model forward passes per seed (its cost), for the docs and the evaluation.
    cost_per_channel : int
        The same as a number: extra forward passes per seed per channel of the layer
        (0 for the rules that need none).
    supports_layer : bool
        Whether the rule can be drawn at another layer than the split layer.
    supports_input : bool
        Whether it can be drawn at the input (``heatmap_layer="input"``: input times
        gradient of the rule's score).
    """

    name: ClassVar[str] = ""
    forward_passes: ClassVar[str] = "0"
    cost_per_channel: ClassVar[int] = 0
    supports_layer: ClassVar[bool] = False
    supports_input: ClassVar[bool] = False

    def __init__(self, layer: nn.Module | str | None = None) -> None:
        if isinstance(layer, str) and (layer != INPUT or not self.supports_input):
            raise ValueError(
                f"heatmap_layer={layer!r} cannot be combined with heatmap_rule={self.name!r}"
                " (the input takes the elementwise rules); pass heatmap_layer=None"
            )
        if layer is not None and not self.supports_layer:
            raise ValueError(
                f"heatmap_layer draws the elementwise rules at another layer; it cannot be "
                f"combined with heatmap_rule={self.name!r}; pass heatmap_layer=None"
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
        context: RegionContext | None = None,
    ) -> Tensor | None:
        """Per-region weights computed once on the seed and saved with the region.

        ``weight``/``bias``: the selected boundaries; ``seed_inputs``: the seed (batch
        of one); ``seed_activations``: its layer tensors (without the batch dimension);
        ``features_of``: inputs ``B x ...`` to features ``B x D``; ``context``: the
        region's members and the fitted references (:class:`RegionContext`).
        Default: None.
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
        return tuple(
            layer_map(self.cam_weights(v, a, channel_weights) * a, relu, attr_dim_summation)
            for v, a in zip(parts, activations)
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
        """Heat maps on new ``inputs``, read through a
        :class:`~captum_repinterp.reader.LayerReader` (``activations``: the split
        layer's tensors when already read)."""
        if self.layer is not None:
            return reader.pulled_back(
                inputs,
                additional_forward_args,
                self.score_direction(direction, channel_weights, reader.layout),
                self.layer,
                relu,
                attr_dim_summation,
            )
        if activations is None:
            activations, _ = reader.read(inputs, additional_forward_args)
        return self.draw(
            direction, activations, reader.layout, channel_weights, relu, attr_dim_summation
        )

    def score_direction(
        self,
        direction: Tensor,
        channel_weights: Tensor | None = None,
        layout: LayerLayout | None = None,
    ) -> Tensor:
        """The direction whose score ``u . psi`` is drawn at an earlier ``layer`` (rules
        with ``supports_layer``; ``direction`` is ``D`` or ``n x D``, ``channel_weights``
        what :meth:`region_weights` computed, ``layout`` the split layer's); at the split
        layer its gradient times activation is the rule's own map."""
        return direction


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
        scaled = layout.flatten((parts[0] * _per_channel(channel_weights, parts[0]),))
        return scaled if direction.dim() == 2 else scaled[0]

    def cam_weights(
        self, direction: Tensor, activation: Tensor, channel_weights: Tensor | None
    ) -> Tensor:
        if channel_weights is None:
            return direction
        return direction * _per_channel(channel_weights, activation)

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


def _per_channel(channel_weights: Tensor, activation: Tensor) -> Tensor:
    """``K`` or ``n x K`` weights shaped to broadcast over ``n x K x ...``."""
    n = activation.shape[0]
    cw = channel_weights if channel_weights.dim() == 2 else channel_weights[None].expand(n, -1)
    return cw.to(activation.device, activation.dtype).reshape(
        n, cw.shape[-1], *([1] * (activation.dim() - 2))
    )


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
        return _per_channel(channel_weights, activation)

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
        return (layer_map(_per_channel(channel_weights, acts) * acts, relu, attr_dim_summation),)

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


@dataclass
class RegionContext:
    """What a rule may read about the region besides its boundaries and the seed.

    Attributes
    ----------
    members : Tensor
        Indices of the references inside the region, nearest to the seed first
        (semantic distance).
    references : FittedReferences
        The fitted references (``features``, ``predictions``, ``layout`` and, when
        ``fit`` was given a tensor, the reference images ``inputs``).
    reader : LayerReader
        Reads the model on new inputs (``reader.forward_func``).
    additional_forward_args : tuple or None
        The seed's extra forward arguments.
    """

    members: Tensor
    references: Any
    reader: Any
    additional_forward_args: tuple | None = None

    def with_members(self, seed_activation: Tensor, m: int) -> Tensor:
        """``seed_activation`` (``1 x ...``, float32 on the CPU) followed by the stored
        features of the ``m`` nearest members, shaped like it: ``(1 + k) x ...`` with
        ``k <= m`` (the seed itself left out when it is a reference; no forward pass)."""
        rows = self.nearest_members(m, seed_features=seed_activation.reshape(-1))
        if rows.numel() == 0:
            return seed_activation
        feats = self.references.features[rows].to(torch.float32)
        return torch.cat([seed_activation, feats.reshape(rows.numel(), *seed_activation.shape[1:])])

    def nearest_members(
        self,
        m: int,
        seed_inputs: tuple[Tensor, ...] | None = None,
        seed_features: Tensor | None = None,
    ) -> Tensor:
        """The ``m`` nearest members (indices into the references), leaving out the seed
        itself when it is a reference.

        With ``seed_features`` (``D``) a member whose stored features equal them (within
        ``1e-5`` times their largest absolute value: a one-image forward pass and
        ``fit``'s batches round differently) is left out, and no reference images are
        needed. Otherwise the rule needs the reference
        images: a member whose image equals ``seed_inputs``' is left out, and the result
        is empty when ``fit`` was not given a tensor.
        """
        images = getattr(self.references, "inputs", None)
        if m <= 0 or self.members.numel() == 0 or (seed_features is None and images is None):
            return self.members[:0]
        seed = seed_inputs[0] if seed_inputs is not None and len(seed_inputs) == 1 else None
        if seed_features is None and seed is None:
            return self.members[:m].to(torch.long)
        # fetch candidates in one batch (a round trip for sharded references), more only
        # when copies of the seed among the first ones leave fewer than m
        k, n = m + 1, self.members.numel()
        while True:
            rows = self.members[:k]
            if seed_features is not None:
                # the seed's features come from a one-image forward pass, the stored
                # ones from fit's batches: equal up to float32 rounding
                cand = self.references.features[rows].reshape(rows.numel(), -1)
                diff = (cand.to(seed_features) - seed_features.reshape(1, -1)).abs()
                # relative to the features' size: the rounding is, and features can be
                # small (a tolerance of at least 1e-5 took every member of features
                # scaled by 1e-6 for the seed)
                scale = float(seed_features.abs().max())
                same = diff.amax(dim=1) <= 1e-5 * scale
            else:
                cand = images[rows].to(seed.device)
                same = (cand == seed).reshape(rows.numel(), -1).all(dim=1)
            kept = rows[~same.cpu()]
            if kept.numel() >= m or k >= n:
                return kept[:m].to(torch.long)
            k = min(2 * k, n)


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
    from ._captum_compat import _format_additional_forward_args
    from .inputs import format_inputs

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
        As in :func:`layer_heatmap`.

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
