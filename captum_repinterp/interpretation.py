"""Stage 5: the interpretation object a user keeps.

An :class:`Interpretation` is a decision region of feature space (the intersection of the
selected half-spaces), the reference images inside it ranked by semantic distance to the
seed, and a heat-map direction that is reused on any image. It is plain tensors plus a
little metadata, saved as one ``.npz`` file (no pickled code).
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from ._captum_compat import _format_output
from ._checks import check_bool
from .features import LayerLayout, module_name
from .heatmap import HeatmapRule, combine_normals, get_heatmap_rule
from .match import margins, semantic_distance
from .saving import load_interpretation, metadata, save_interpretation

__all__ = ["Interpretation"]


@dataclass
class Interpretation:
    """A representative interpretation of one seed image.

    Attributes
    ----------
    target : int
        The class ``c`` explained (index into the flattened model output).
    seed_in_class : bool
        Whether the model predicts ``c`` for the seed (False only for an explicit other
        target; then the region is the class-``c`` side and does not contain the seed).
    weight, bias : Tensor
        ``k x D`` and ``k``: the selected boundaries ``h_j(psi) = w_j . psi + b_j``,
        oriented so that the region is ``{h_j > 0 for all j}``.
    runner_up : Tensor
        ``k``: the class on the other side of each selected boundary.
    members : Tensor
        Indices into the reference set of the references inside the region, in
        ascending semantic distance to the seed.
    member_distances : Tensor
        Their semantic distances (float64), in logit-margin units: the sum over the
        selected boundaries of ``|h_j(x) - h_j(r)|``, each ``h_j`` a difference of two
        logits on the boundary's linear piece.
    purity : float
        Share of members predicted as ``target`` (1.0 for an empty region).
    coverage : float
        Share of the references predicted as ``target`` that are members.
    delta : int
        Negatives allowed inside (the resolved value).
    reached : bool
        Whether the cover constraint (at most ``delta`` negatives inside) was reached.
    n_sampled : int
        Candidate boundaries the solver chose from (after dropping duplicates).
    seed_margins : Tensor
        ``k``: ``h_j(psi(x))`` of the seed.
    layout : LayerLayout
        Shapes of the layer's tensors.
    heatmap_rule, combine : str
        How the heat map is drawn (see :mod:`captum_repinterp.heatmap`).
    channel_weights : Tensor or None
        ``K`` per-region channel weights, computed once on the seed: the softmax weights
        of ``"region-score"`` and ``"region-members"``, the ``1 / s_k`` levels of
        ``"elementwise-members"`` and ``"channel-members"`` (the default; scaled to mean
        1; ``"channel-members"`` uses them away from the split layer); None for the other
        rules.
    heatmap_layer : nn.Module, "input" or None
        Draw the map at this earlier layer, or at the input (``"input"``), instead of
        the split layer (see
        :func:`~captum_repinterp.heatmap.pulled_back_heatmap`); None: the split layer.
        ``interpret(heatmap_layer="auto")`` stores what ``"auto"`` resolved to.
    reader : LayerReader or None
        Reads the model's layer on new inputs (:mod:`captum_repinterp.reader`); needed by
        :meth:`contains`, :meth:`distance` and :meth:`heatmap`, not by the
        ``*_features`` methods.
    """

    target: int
    seed_in_class: bool
    weight: Tensor
    bias: Tensor
    runner_up: Tensor
    members: Tensor
    member_distances: Tensor
    purity: float
    coverage: float
    delta: int
    reached: bool
    n_sampled: int
    seed_margins: Tensor
    layout: LayerLayout
    heatmap_rule: str = "elementwise"
    combine: str = "sum"
    channel_weights: Tensor | None = None
    heatmap_layer: Any = field(default=None, repr=False, compare=False)
    reader: Any = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ properties
    @property
    def n_boundaries(self) -> int:
        """Number of selected boundaries."""
        return int(self.weight.shape[0])

    @property
    def has_boundaries(self) -> bool:
        """False when no boundary was selected (a
        :class:`~captum_repinterp.region.NoBoundaryWarning` was given): the region is then
        every reference and the map zero."""
        return self.n_boundaries > 0

    @property
    def direction(self) -> Tensor:
        """The heat-map direction ``v`` (``D``): the combined selected normals."""
        return combine_normals(self.weight, self.combine)

    @property
    def rule(self) -> HeatmapRule:
        """The heat-map rule object (see :mod:`captum_repinterp.heatmap`)."""
        return get_heatmap_rule(self.heatmap_rule, self.heatmap_layer)

    def __len__(self) -> int:
        return int(self.members.numel())

    def __eq__(self, other: object) -> bool:
        """Same region, members, ranking and map settings (tensors compared with
        ``torch.equal`` and their dtypes), drawn at the same place: the split layer, the
        input, or a layer of the same qualified name in its model. The model and its
        reader are not compared, so a loaded interpretation equals the one saved."""
        if not isinstance(other, Interpretation):
            return NotImplemented
        if self._map_site() != other._map_site():
            return False
        for f in fields(self):
            if not f.compare:
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, Tensor) or isinstance(b, Tensor):
                same = (
                    isinstance(a, Tensor)
                    and isinstance(b, Tensor)
                    and a.dtype == b.dtype
                    and torch.equal(a.cpu(), b.cpu())
                )
            else:
                same = bool(a == b)
            if not same:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  (mutable, compared by value)

    def _map_site(self) -> Any:
        """Where the map is drawn, comparable across models: None (the split layer),
        ``"input"``, or the layer's qualified name in the model (its identity when the
        model does not name it)."""
        layer = self.heatmap_layer
        if layer is None or isinstance(layer, str):
            return layer
        name = module_name(getattr(self.reader, "forward_func", None), layer)
        return ("layer", name if name is not None else id(layer))

    def __repr__(self) -> str:
        return (
            f"Interpretation(target={self.target}, boundaries={self.n_boundaries}, "
            f"members={len(self)}, purity={self.purity:.3f}, coverage={self.coverage:.3f}, "
            f"delta={self.delta}, reached={self.reached})"
        )

    # ------------------------------------------------------------------ ranking
    def ranking(self) -> tuple[Tensor, Tensor]:
        """Members and their semantic distances to the seed, nearest first."""
        return self.members, self.member_distances

    def similar(self, k: int = 5) -> Tensor:
        """Indices of the ``k`` members nearest to the seed by semantic distance."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"k must be a non-negative int, got {k!r}")
        if k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        return self.members[: int(k)]

    # ------------------------------------------------------------------ features
    def contains_features(self, features: Tensor) -> Tensor:
        """Membership of feature rows (``n x D``) in the region, as a bool tensor."""
        features = self._check_features(features)
        if self.n_boundaries == 0:
            return torch.isfinite(features).all(dim=1)
        return (margins(features, self.weight, self.bias) > 0).all(dim=1)

    def distance_features(self, features: Tensor) -> Tensor:
        """Semantic distance of feature rows (``n x D``) to the seed (float64)."""
        features = self._check_features(features)
        if self.n_boundaries == 0:
            return torch.zeros(features.shape[0], dtype=torch.float64)
        return semantic_distance(self.seed_margins, margins(features, self.weight, self.bias))

    def evaluate_features(
        self, features: Tensor, predictions: Tensor, exclude: Any = None
    ) -> dict[str, float]:
        """The region used as a rule, scored on (held-out) feature rows.

        Parameters
        ----------
        features : Tensor
            ``n x D`` features of the images to score on.
        predictions : Tensor
            ``n`` predicted classes of those images.
        exclude : int, sequence of int or Tensor, optional
            Rows to leave out, e.g. the seed when it is one of the images (it is inside
            its own region by construction and would inflate the scores).

        Returns
        -------
        dict
            ``n_inside``; ``precision``: share of the rows inside whose prediction is
            ``target`` (NaN when none is inside); ``coverage``: share of the rows predicted
            as ``target`` that are inside (NaN when there are none).
        """
        inside = self.contains_features(features)
        if not isinstance(predictions, Tensor):
            raise TypeError(f"predictions must be a tensor, got {type(predictions).__name__}")
        if predictions.shape[0] != inside.shape[0]:
            raise ValueError(
                f"predictions must have one entry per row of features ({inside.shape[0]}), "
                f"got {predictions.shape[0]}"
            )
        keep = torch.ones_like(inside)
        if exclude is not None:
            idx = torch.as_tensor(exclude, dtype=torch.long).reshape(-1)
            if idx.numel() and not bool(((idx >= -len(keep)) & (idx < len(keep))).all()):
                raise ValueError(
                    f"exclude: row indices must be in [0, {len(keep)}), got {exclude!r}"
                )
            keep[idx.to(keep.device)] = False
        inside = inside & keep
        pos = (predictions.to(inside.device) == self.target) & keep
        n_in = int(inside.sum())
        n_pos = int(pos.sum())
        hit = int((inside & pos).sum())
        return {
            "n_inside": n_in,
            "precision": hit / n_in if n_in else float("nan"),
            "coverage": hit / n_pos if n_pos else float("nan"),
        }

    def _check_features(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor):
            raise TypeError(f"features must be a tensor, got {type(features).__name__}")
        if features.dim() == 1:
            features = features[None]
        if features.dim() != 2 or features.shape[1] != self.layout.dim:
            raise ValueError(f"features must be n x {self.layout.dim}, got {tuple(features.shape)}")
        return features

    # ------------------------------------------------------------------ on new inputs
    def _need_reader(self, what: str) -> Any:
        if self.reader is None:
            raise RuntimeError(
                f"{what} needs the model: load the interpretation with "
                "Interpretation.load(path, explainer=ri) or use the *_features methods"
            )
        layout = getattr(self.reader, "layout", self.layout)
        if layout != self.layout:  # a reader set by hand: as many features can still differ
            raise ValueError(
                f"reader: its layer gives tensors shaped {layout.shapes}, but the "
                f"interpretation was found at a layer giving {self.layout.shapes}; use the "
                "reader of the explainer the interpretation was made with"
            )
        return self.reader

    def contains(self, inputs: Any, additional_forward_args: Any = None) -> Tensor:
        """Whether each new input lies in the decision region.

        This is the interpretation used as a rule: the model should predict ``target``
        for the images it contains (its precision is measured on held-out images).

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            ``n x ...`` images, scaled as the model expects (as for ``attribute``).
        additional_forward_args : any, optional
            As in Captum; tensors of ``n`` rows are sliced per image.

        Returns
        -------
        Tensor
            ``n`` bools.

        Raises
        ------
        RuntimeError
            When the interpretation has no model (loaded without ``explainer=``).
        TypeError, ValueError
            For inputs the model's reader cannot take, naming the argument.

        Notes
        -----
        One forward pass per image, so that an image's answer does not depend on the
        batch it came in (as for ``distance``, and ``heatmap`` at the split layer; maps
        drawn at the input or an earlier layer take one batched gradient and equal an
        image's own map up to float rounding). For many images, or a
        Dataset or DataLoader, the batched route: ``features, _ = ri.transform(images)``,
        then ``contains_features(features)`` (features equal up to float rounding, so an
        image on a boundary can differ); measured 3.7x faster on a VGG-11 at 64 px,
        1.1x on a ResNet-18 at 224 px, where each image's own compute dominates.
        """
        activations, _ = self._need_reader("contains").read(inputs, additional_forward_args)
        return self.contains_features(self.layout.flatten(activations).cpu())

    def distance(self, inputs: Any, additional_forward_args: Any = None) -> Tensor:
        """Semantic distance of each new input to the seed.

        Parameters and errors as for :meth:`contains`. Returns ``n`` float64 distances in
        logit-margin units: the sum over the selected boundaries of
        ``|h_j(seed) - h_j(x)|`` (inputs outside the region get one too).
        """
        activations, _ = self._need_reader("distance").read(inputs, additional_forward_args)
        return self.distance_features(self.layout.flatten(activations).cpu())

    def heatmap(
        self,
        inputs: Any,
        additional_forward_args: Any = None,
        relu_attributions: bool = True,
        attr_dim_summation: bool = True,
    ) -> Tensor | tuple[Tensor, ...]:
        """The representative heat map reused on new inputs.

        The same direction ``v`` (from the seed's selected boundaries) is applied to every
        input's activations, so one map explains every image in the region.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            ``n x ...`` images, scaled as the model expects.
        additional_forward_args : any, optional
            As in Captum.
        relu_attributions : bool
            Keep only the positive part of the map, as ``LayerGradCam``.
        attr_dim_summation : bool
            Sum over channels (``n x 1 x h x w``), as ``LayerGradCam``; False keeps one
            map per channel.

        Returns
        -------
        Tensor or tuple of Tensor
            At the split layer shaped like ``LayerGradCam``'s there (e.g.
            ``n x 1 x 7 x 7``); at ``heatmap_layer`` like ``LayerGradCam``'s on that
            layer; at the input (``heatmap_layer="input"``, also what ``"auto"`` may have
            resolved to) ``n x 1 x H x W``. Upsample layer maps with
            ``LayerAttribution.interpolate(maps, inputs.shape[-2:], "bilinear")``.

        Notes
        -----
        At the split layer each image's map is read from its own forward pass, so it does
        not depend on the batch. At the input or an earlier layer the batch takes one
        gradient (6x faster than one per image for 64 images at the input of a ResNet-18
        at 64 px): a map equals the image's own map up to float rounding (about 3e-7).

        Raises
        ------
        RuntimeError
            When the interpretation has no model (loaded without ``explainer=``).
        TypeError
            When ``relu_attributions`` or ``attr_dim_summation`` is not a bool.
        """
        relu_attributions = check_bool(relu_attributions, "relu_attributions")
        attr_dim_summation = check_bool(attr_dim_summation, "attr_dim_summation")
        maps = self.rule.maps(
            self._need_reader("heatmap"),
            inputs,
            additional_forward_args,
            self.direction,
            self.channel_weights,
            relu_attributions,
            attr_dim_summation,
        )
        return _format_output(len(maps) > 1, maps)

    attribute = heatmap

    def heatmap_from_activations(
        self,
        activations: tuple[Tensor, ...],
        relu_attributions: bool = True,
        attr_dim_summation: bool = True,
    ) -> tuple[Tensor, ...]:
        """Heat maps of the shared direction on given split-layer activations.

        Parameters
        ----------
        activations : tuple of Tensor
            The split layer's outputs for ``n`` images (as a forward hook records them);
            one tensor stands for a tuple of one.
        relu_attributions, attr_dim_summation : bool
            As for :meth:`heatmap`.

        Returns
        -------
        tuple of Tensor
            The maps, shaped as :meth:`heatmap`'s at the split layer.

        Raises
        ------
        ValueError
            When the map is drawn at another layer or the input (that needs the model),
            or ``activations`` are not shaped as the split layer's outputs.
        TypeError
            When a flag is not a bool, or ``activations`` not tensors.
        """
        relu_attributions = check_bool(relu_attributions, "relu_attributions")
        attr_dim_summation = check_bool(attr_dim_summation, "attr_dim_summation")
        if self.heatmap_layer is not None:
            raise ValueError(
                "this interpretation draws its map at heatmap_layer, which needs the model: "
                "use heatmap(inputs)"
            )
        activations = self._check_activations(activations)
        return self.rule.draw(
            self.direction,
            activations,
            self.layout,
            self.channel_weights,
            relu_attributions,
            attr_dim_summation,
        )

    def _check_activations(self, activations: Any) -> tuple[Tensor, ...]:
        """``activations`` as a tuple shaped as the split layer's outputs (a bare tensor
        was iterated over its images, each read as a batch: maps of the wrong images)."""
        if isinstance(activations, Tensor):
            activations = (activations,)
        if not isinstance(activations, (tuple, list)) or not all(
            isinstance(a, Tensor) for a in activations
        ):
            raise TypeError(
                "activations must be a tensor or a tuple of tensors (the split layer's "
                f"outputs), got {type(activations).__name__}"
            )
        shapes = tuple(tuple(a.shape[1:]) for a in activations)
        sizes = {a.shape[0] for a in activations if a.dim() > 0}
        if shapes != self.layout.shapes or len(sizes) != 1:
            got = tuple(tuple(a.shape) for a in activations)
            raise ValueError(
                f"activations: shaped {got}, but the split layer gives n x "
                f"{self.layout.shapes} per output (n images, the same n for each)"
            )
        return tuple(activations)

    # ------------------------------------------------------------------ persistence
    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description (everything but the tensors)."""
        return metadata(self)

    def save(self, path: str | os.PathLike) -> None:
        """Save as one ``.npz`` file: the tensors as arrays and the metadata as JSON.

        The file is written at ``path`` as given: no ``.npz`` suffix is added (unlike
        ``numpy.savez``), so :meth:`load` takes the same path.

        Raises
        ------
        TypeError
            For a ``path`` that is not a str or os.PathLike.
        ValueError
            For an empty ``path`` or a directory.
        """
        save_interpretation(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, explainer: Any = None) -> Interpretation:
        """Load a saved interpretation (``allow_pickle=False``: no code is executed).

        Pass the fitted :class:`RepresentativeInterpretation` (or its ``reader_``) as
        ``explainer`` to use the methods that need the model (``contains``,
        ``heatmap``, ``distance``). The file keeps a fingerprint of the model's weights
        (SHA-1 of its parameters and buffers) and the split layer's name; an explainer
        whose model has other weights, or whose layer has another name, is taken with a
        ``UserWarning`` (a model wrapped or renamed may be the same one).

        Raises
        ------
        ValueError
            For a file of another format version, an explainer whose layer is shaped
            unlike the interpretation's, that reads the other side of it
            (``attribute_to_layer_input``) or that was fitted on fewer references than
            the members' indices need, or a map drawn at a layer the given model does
            not have.
        TypeError, NotFittedError
            For an ``explainer`` that is not a (fitted) explainer or reader; a ``path``
            that is not a str or os.PathLike is a TypeError too.
        """
        return load_interpretation(cls, path, explainer)
