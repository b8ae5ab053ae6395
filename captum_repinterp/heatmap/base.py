"""The heat-map rule interface: :class:`HeatmapRule`, the registry of rules by name,
and :class:`RegionContext`, what a rule may read about a region besides its boundaries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features import LayerLayout

COMBINE_RULES = ("sum", "unit")

#: Heat-map rules by name (see :func:`register_heatmap_rule`).
HEATMAP_RULES: dict[str, type[HeatmapRule]] = {}


def register_heatmap_rule(cls: type[HeatmapRule]) -> type[HeatmapRule]:
    """Class decorator: make a :class:`HeatmapRule` subclass available by its ``name``.

    The rule is selectable once the module that defines it is imported (the package's
    own rules are imported by ``heatmap/__init__.py``).

    Raises
    ------
    TypeError
        When ``cls`` is not a :class:`HeatmapRule` subclass, or sets ``supports_input``
        without ``supports_layer`` (the input is drawn by the same pull-back as an
        earlier layer; a subclass that turns ``supports_layer`` off must turn
        ``supports_input`` off too).
    ValueError
        For an empty name, or a name another rule class holds (a class redefined under
        the same module and name, as a re-run notebook cell does, replaces it).
    """
    if not (isinstance(cls, type) and issubclass(cls, HeatmapRule)):
        raise TypeError(f"register_heatmap_rule takes a HeatmapRule subclass, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError("a heat-map rule needs a non-empty name")
    if cls.supports_input and not cls.supports_layer:
        raise TypeError(
            f"heat-map rule {cls.name!r} sets supports_input without supports_layer (the "
            "input is drawn as an earlier layer is); set supports_input = False too"
        )
    taken = HEATMAP_RULES.get(cls.name)
    if taken is not None and _qualified(taken) != _qualified(cls):
        raise ValueError(
            f"heat-map rule name {cls.name!r} is taken by {_qualified(taken)}; choose another name"
        )
    HEATMAP_RULES[cls.name] = cls
    return cls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _rules_with(flag: str) -> tuple[str, ...]:
    """The registered rules whose class attribute ``flag`` is true, by name."""
    return tuple(name for name, cls in HEATMAP_RULES.items() if getattr(cls, flag))


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
    if not isinstance(name, str) or name not in HEATMAP_RULES:
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
        Whether the rule can be drawn at another layer than the split layer (gradient
        times activation of :meth:`score_direction`'s score there).
    supports_input : bool
        Whether it can be drawn at the input (``heatmap_layer="input"``: input times
        gradient of the rule's score); requires ``supports_layer``. With the default
        ``heatmap_layer="auto"`` the rules without it draw at the split layer.
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
                f" (the rules drawn at the input: {_rules_with('supports_input')}); pass "
                "heatmap_layer=None"
            )
        if layer is not None and not self.supports_layer:
            raise ValueError(
                f"heatmap_layer (another layer than the split layer) cannot be combined "
                f"with heatmap_rule={self.name!r} (the rules drawn at another layer: "
                f"{_rules_with('supports_layer')}); pass heatmap_layer=None"
            )
        self.layer = layer

    def cam_weights(
        self, direction: Tensor, activation: Tensor, channel_weights: Tensor | None
    ) -> Tensor:
        """Weights multiplied into ``activation`` position by position (:meth:`draw`
        then sums the product over channels and applies ``relu``; a rule that transforms
        the product itself, such as ``|v * A|``, overrides :meth:`draw` or returns
        ``|v| * sign(A)``).

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
