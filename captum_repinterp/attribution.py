"""The Captum facade: :class:`RepresentativeInterpretation`.

A thin layer that formats inputs and targets with Captum's helpers, then calls the
pipeline stages in order::

    fit:        references --features--> psi (N x D), predictions
    interpret:  seed --features--> psi(x) --sampler--> (W, b) --match--> N x m bool
                --solver--> selected boundaries --> Interpretation
    attribute:  interpret, then the interpretation's heat map on the seed itself
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._captum_compat import (
    GradientAttribution,
    LayerAttribution,
    TargetType,
    _expand_additional_forward_args,
    _format_additional_forward_args,
    _format_output,
    _select_targets,
    log_usage,
)
from ._checks import check_choice, check_int
from .features import (
    HookHead,
    LayerLayout,
    UserHead,
    _slice_args,
    check_against_references,
    eval_mode,
    extract_features,
    format_inputs,
    forward_with_layer,
    model_device,
    translate_forward_error,
)
from .heatmap import (
    COMBINE_RULES,
    HEATMAP_RULES,
    layer_heatmap,
    pulled_back_heatmap,
    region_score_weights,
)
from .interpretation import Interpretation
from .layers import nonlinear_ops_after, nonlinear_ops_in, warn_nonlinear_head
from .match import failing_bits, margins, semantic_distance
from .projection import Projection, build_projection
from .sampler import Boundaries, choose_candidates, near_duplicates, sample_boundaries
from .solver import greedy_cover_bits
from .store import fit_to_store

__all__ = ["RepresentativeInterpretation", "NotFittedError"]

_REFINE = ("tighten", "prune", "none")


class NotFittedError(RuntimeError):
    """Raised when ``attribute``/``interpret`` is called before ``fit``."""


def resolve_targets(output: Tensor, target: TargetType) -> Tensor:
    """Flat class index per example for any Captum target form.

    ``None`` selects the predicted class. Otherwise Captum's own ``_select_targets`` is
    applied to a tensor of flat indices shaped like ``output``, so every form Captum
    accepts (int, 0-d/one-element tensor, list, 1-D tensor, tuples for outputs with more
    than two dimensions) means here what it means for ``LayerGradCam``.
    """
    n = output.shape[0]
    flat = output.reshape(n, -1)
    if target is None:
        return flat.argmax(dim=1).cpu()
    if isinstance(target, bool) or (isinstance(target, Tensor) and target.dtype == torch.bool):
        raise TypeError("target must be an int, a tuple, a list or an integer tensor, not bool")
    if isinstance(target, Tensor) and target.is_floating_point():
        raise TypeError(f"target must be an integer tensor, got dtype {target.dtype}")
    if isinstance(target, list) and len(target) != n:
        raise ValueError(f"target: list of length {len(target)} for {n} inputs")
    if isinstance(target, Tensor) and target.numel() not in (1, n):
        raise ValueError(
            f"target: tensor with {target.numel()} elements for {n} inputs (expected 1 or {n})"
        )
    index = torch.arange(flat.shape[1]).reshape(output.shape[1:]).expand(output.shape)
    if isinstance(target, Tensor):
        target = target.cpu()
    try:
        selected = _select_targets(index, target)
    except (AssertionError, IndexError, RuntimeError, TypeError) as exc:
        raise ValueError(
            f"target {target!r} does not select one class per example of an output shaped "
            f"{tuple(output.shape)}: {exc}"
        ) from None
    if selected.shape != (n,):
        raise ValueError(
            f"target {target!r} must select exactly one class per example of an output "
            f"shaped {tuple(output.shape)}"
        )
    return selected.long()


class RepresentativeInterpretation(LayerAttribution, GradientAttribution):
    r"""Representative interpretations (Lam, Chu et al., ICCV 2021) as a Captum method.

    The network is split at ``layer``; the head from that layer to the logits is
    piecewise linear. For a seed image, linear pieces of the head's decision boundary are
    sampled between the seed and references of other classes, and a few are chosen by
    greedy submodular-cost submodular cover so that the convex region they bound holds as
    many references of the seed's class as possible and (almost) none of others. The
    attribution is the region's heat map on the seed; :meth:`interpret` returns the whole
    region (members ranked by semantic distance, membership test, reusable heat map).

    Usage mirrors ``LayerGradCam`` plus one :meth:`fit` over reference images::

        >>> ri = RepresentativeInterpretation(model, model.features[-1])
        >>> ri.fit(reference_images)
        >>> attr = ri.attribute(images)            # N x 1 x h x w, like LayerGradCam
        >>> up = LayerAttribution.interpolate(attr, images.shape[-2:], "bilinear")
        >>> region = ri.interpret(images[0])
        >>> region.similar(5), region.purity, region.contains(new_images)

    Parameters
    ----------
    forward_func : callable or nn.Module
        The model, returning class scores (``N x C``; outputs with more dimensions are
        flattened and ``target`` tuples index them as in Captum).
    layer : nn.Module
        The layer to split at, usually the last convolutional block. It must be called
        exactly once per forward pass.
    device_ids : list of int, optional
        As in Captum's layer methods (kept for signature compatibility; features are
        gathered through a hook on ``layer``).
    head : callable, optional
        ``head(layer_output) -> logits`` mapping the layer's output (a tensor, or a tuple
        for a layer with several outputs) to the model's output. Faster than the default,
        which re-runs the model on the seed with the layer's output replaced through a
        forward hook (exact also for heads that reuse earlier activations).

    Notes
    -----
    To choose ``layer`` automatically, pass
    ``captum_repinterp.layers.find_layer(model, example_input)``: the last convolutional
    block whose head is piecewise linear.

    Bad input gets a ValueError or TypeError naming the argument: inputs without a batch
    dimension are caught before the model runs; when the model fails on inputs whose
    shape or dtype differs from the references', the model's exception is re-raised as a
    ValueError (shape) or TypeError (dtype) naming ``inputs``, with both shapes, chained
    with ``from``; a failure on inputs like the references is the model's own and
    propagates unchanged. Integer tensors (e.g. ``uint8`` images) are passed to the model
    as they are (the method differentiates with respect to layer features, never inputs),
    so a model that converts them itself works; otherwise the error asks for
    ``x.float() / 255``. If the head after ``layer`` is not piecewise linear (Sigmoid,
    Tanh, GELU, SiLU, ELU, Softmax, Softplus, Mish, Hardswish, layer norm, ..., as modules
    or functional calls), a :class:`~captum_repinterp.layers.NonPiecewiseLinearWarning`
    is given in ``fit`` and once per ``attribute``/``interpret`` call: boundaries are then
    local linear approximations. A model in training mode is run in eval mode for the
    duration of each call, with a warning, and every module's flag is restored.
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        device_ids: list[int] | None = None,
        head: Callable | None = None,
    ) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
        if not isinstance(layer, nn.Module):
            raise TypeError(
                f"layer must be a torch.nn.Module, got {type(layer).__name__}; to choose one "
                "automatically use captum_repinterp.layers.find_layer(model, example_input)"
            )
        if isinstance(forward_func, nn.Module) and not any(
            m is layer for m in forward_func.modules()
        ):
            raise ValueError(
                "layer: the given module is not a submodule of forward_func; pass e.g. "
                "model.features[-1] of the same model instance"
            )
        if head is not None and not callable(head):
            raise TypeError(f"head must be callable or None, got {type(head).__name__}")
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        GradientAttribution.__init__(self, forward_func)
        self.head = head

    # ------------------------------------------------------------------ Captum flags
    def has_convergence_delta(self) -> bool:
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        references: Any,
        batch_size: int = 128,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        progress: bool = True,
        store: str | os.PathLike | None = None,
        append: bool = False,
    ) -> RepresentativeInterpretation:
        r"""Compute and store the layer features and predictions of the references.

        Parameters
        ----------
        references : Tensor, tuple of Tensor, Dataset or DataLoader
            Reference images (unlabelled: the model's predictions are used). Dataset
            items and DataLoader batches may be ``(inputs, label, ...)``; labels are
            ignored.
        batch_size : int
            Batch size for tensors and Datasets (a DataLoader keeps its own).
        additional_forward_args : any, optional
            As in ``attribute``; tensors whose first dimension is the number of
            references are sliced with each batch.
        attribute_to_layer_input : bool
            Split at the layer's input instead of its output.
        progress : bool
            Show a tqdm progress bar.
        store : str or os.PathLike, optional
            A directory for an on-disk reference store (see
            :mod:`captum_repinterp.store`). Features and predictions are written batch by
            batch to memory-mapped ``.npy`` files and ``features_`` / ``predictions_``
            become tensors backed by them (copy-on-write), so ``N x D`` never has to fit in
            RAM. An interrupted fit is resumed by calling ``fit`` again with the same
            references and ``store``; a finished store of as many rows as references is
            reused without recomputation.
        append : bool
            With ``store``: add these references after the ones already stored.

        Returns
        -------
        self
            With ``features_`` (``N x D`` float32, CPU), ``predictions_`` (``N`` int64),
            ``layout_`` and ``n_references_`` set.
        """
        if not isinstance(attribute_to_layer_input, bool):
            raise TypeError("attribute_to_layer_input must be a bool")
        if store is not None and not isinstance(store, (str, os.PathLike)):
            raise TypeError(f"store must be a path or None, got {type(store).__name__}")
        if not isinstance(append, bool):
            raise TypeError(f"append must be a bool, got {type(append).__name__}")
        if append and store is None:
            raise ValueError("append=True needs a store path (store=...)")
        device = model_device(self.forward_func, self.layer)
        info: dict = {}
        ref_store = None
        with eval_mode(self.forward_func, self.layer) as was_training:
            if was_training:
                _warn_training()
            if store is None:
                features, predictions, layout = extract_features(
                    self.forward_func,
                    self.layer,
                    references,
                    batch_size=batch_size,
                    additional_forward_args=additional_forward_args,
                    attribute_to_layer_input=attribute_to_layer_input,
                    device=device,
                    progress=progress,
                    info=info,
                )
            else:
                ref_store = fit_to_store(
                    self.forward_func,
                    self.layer,
                    references,
                    store,
                    append=append,
                    batch_size=batch_size,
                    additional_forward_args=additional_forward_args,
                    attribute_to_layer_input=attribute_to_layer_input,
                    device=device,
                    progress=progress,
                    info=info,
                )
                features, predictions = ref_store.features(), ref_store.predictions()
                layout = ref_store.layout
                if not ref_store.all_finite():
                    warnings.warn(
                        "fit: some reference features are NaN or inf; they are kept but can "
                        "never be members of a region",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            nonlinear = self._scan_head(info, features, layout, attribute_to_layer_input)
        if not bool((predictions != predictions[0]).any()):
            raise ValueError(
                "references: the model predicts a single class "
                f"({int(predictions[0])}) for every reference; representative "
                "interpretations need references of at least two predicted classes"
            )
        self.features_ = features
        self.predictions_ = predictions
        self.layout_ = layout
        self.attribute_to_layer_input_ = attribute_to_layer_input
        self.n_references_ = int(features.shape[0])
        self.input_spec_ = info.get("input_spec")
        self.head_nonlinear_ = tuple(nonlinear)
        self.store_ = ref_store
        # with a store the projection is written next to the features, memory-mapped
        self.projection_ = self._build_projection(
            info, None if ref_store is None else ref_store.path / "projected.npy"
        )
        warn_nonlinear_head(self.head_nonlinear_)
        return self

    def _build_projection(
        self, info: dict, out_path: os.PathLike | None = None
    ) -> Projection | None:
        """Exact per-seed shortcut when the head starts with an affine map (see projection)."""
        modules = self.head if self.head is not None else self.forward_func
        if not isinstance(modules, nn.Module) or (self.head is None and "example" not in info):
            return None
        head = self._head_for(info.get("example", ()), info.get("example_args"))
        with eval_mode(self.forward_func, self.layer, modules):
            return build_projection(head, modules, self.features_, out_path=out_path)

    def _scan_head(
        self, info: dict, features: Tensor, layout: LayerLayout, to_input: bool
    ) -> list[str]:
        """Non-piecewise-linear operations of the head, traced on the first reference."""
        if self.head is not None:
            p = model_device(self.forward_func, self.layer)
            dtype = info["example"][0].dtype if info.get("example") else torch.float32
            if not dtype.is_floating_point:
                dtype = torch.float32
            parts = layout.unflatten(features[:1].to(p or "cpu", dtype))
            return nonlinear_ops_in(self.head, parts if layout.is_tuple else parts[0])
        if "example" not in info:
            return []
        return nonlinear_ops_after(
            self.forward_func, self.layer, info["example"], info["example_args"], to_input
        )

    def _check_fitted(self) -> None:
        if not hasattr(self, "features_"):
            raise NotFittedError(
                "This RepresentativeInterpretation is not fitted yet: call "
                "fit(reference_images) before attribute() or interpret()"
            )

    # ------------------------------------------------------------------ helpers
    def _check_heatmap_layer(self, heatmap_layer: Any, heatmap_rule: str) -> None:
        if heatmap_layer is None:
            return
        if not isinstance(heatmap_layer, nn.Module):
            raise TypeError(
                f"heatmap_layer must be an nn.Module or None, got {type(heatmap_layer).__name__}"
            )
        if heatmap_rule != "elementwise":
            raise ValueError(
                f"heatmap_layer draws the elementwise rule at another layer; it cannot be "
                f"combined with heatmap_rule={heatmap_rule!r}"
            )
        if isinstance(self.forward_func, nn.Module) and not any(
            m is heatmap_layer for m in self.forward_func.modules()
        ):
            raise ValueError("heatmap_layer: the layer is not part of forward_func")

    def _pulled_back(
        self,
        inputs: Any,
        additional_forward_args: Any,
        directions: Tensor,
        heatmap_layer: nn.Module,
        relu: bool = True,
        attr_dim_summation: bool = True,
    ) -> tuple[Tensor, ...]:
        """Maps of ``directions`` drawn at ``heatmap_layer`` (see ``pulled_back_heatmap``).

        Inputs are checked against the references as in :meth:`_layer_activations`, and a
        model failure on wrongly shaped or typed inputs is translated the same way.
        """
        inputs_t = format_inputs(inputs)
        spec = getattr(self, "input_spec_", None)
        check_against_references(inputs_t, spec, "inputs")
        extra = _format_additional_forward_args(additional_forward_args)
        device = model_device(self.forward_func, self.layer)
        if device is not None:
            inputs_t = tuple(t.to(device) for t in inputs_t)
        with eval_mode(self.forward_func, self.layer, heatmap_layer):
            try:
                return pulled_back_heatmap(
                    self.forward_func, self.layer, heatmap_layer, inputs_t, extra,
                    directions.to(device) if device is not None else directions, self.layout_,
                    self.attribute_to_layer_input_, relu, attr_dim_summation,
                )
            except (RuntimeError, TypeError) as exc:
                translated = translate_forward_error(exc, inputs_t, "inputs", spec)
                if translated is None:
                    raise
                raise translated from exc

    def _layer_activations(
        self, inputs: Any, additional_forward_args: Any = None
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """Layer tensors and model output of new inputs, one example at a time.

        One example per forward pass, so that an example's features (and everything
        decided from them) do not depend on which batch it came in.
        """
        self._check_fitted()
        inputs_t = format_inputs(inputs)
        extra = _format_additional_forward_args(additional_forward_args)
        device = model_device(self.forward_func, self.layer)
        n = inputs_t[0].shape[0]
        spec = getattr(self, "input_spec_", None)
        check_against_references(inputs_t, spec, "inputs")
        acts: list[tuple[Tensor, ...]] = []
        outs: list[Tensor] = []
        with eval_mode(self.forward_func, self.layer) as was_training, torch.no_grad():
            if was_training:
                _warn_training()
            for i in range(n):
                one = tuple(t[i : i + 1].detach() for t in inputs_t)
                if device is not None:
                    one = tuple(t.to(device) for t in one)
                tensors, was_tuple, out = forward_with_layer(
                    self.forward_func,
                    self.layer,
                    one,
                    _slice_args(extra, n, i, i + 1),
                    self.attribute_to_layer_input_,
                    name="inputs",
                    expected=spec,
                )
                layout = LayerLayout.from_outputs(tensors, was_tuple)
                if layout != self.layout_:
                    raise ValueError(
                        f"inputs: the layer's output for these inputs has shapes "
                        f"{layout.shapes}, but the references gave {self.layout_.shapes}; "
                        "use inputs shaped like the references"
                    )
                acts.append(tensors)
                outs.append(out)
        activations = tuple(torch.cat(parts) for parts in zip(*acts))
        return activations, torch.cat(outs)

    def transform(
        self,
        inputs: Any,
        batch_size: int = 128,
        additional_forward_args: Any = None,
        progress: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Layer features (``N x D`` float32, CPU) and predictions of new inputs, batched.

        For scoring interpretations on many held-out images with
        :meth:`Interpretation.contains_features`; accepts what :meth:`fit` accepts.
        """
        self._check_fitted()
        device = model_device(self.forward_func, self.layer)
        with eval_mode(self.forward_func, self.layer):
            features, predictions, layout = extract_features(
                self.forward_func,
                self.layer,
                inputs,
                batch_size=batch_size,
                additional_forward_args=additional_forward_args,
                attribute_to_layer_input=self.attribute_to_layer_input_,
                device=device,
                progress=progress,
                name="inputs",
                expected=getattr(self, "input_spec_", None),
            )
        if layout != self.layout_:
            raise ValueError(
                f"inputs: layer shapes {layout.shapes} differ from the references' "
                f"{self.layout_.shapes}"
            )
        return features, predictions

    # ------------------------------------------------------------------ interpret
    def interpret(
        self,
        inputs: Any,
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_boundaries: int = 50,
        delta: int | float | None = None,
        seed: int = 0,
        refine: str = "tighten",
        heatmap_rule: str = "elementwise",
        combine: str = "sum",
        bisection_steps: int = 20,
        progress: bool = False,
        heatmap_layer: nn.Module | None = None,
    ) -> Interpretation | list[Interpretation]:
        r"""Representative interpretation(s) of seed image(s).

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            Seed image(s), batch first (``x[None]`` for a single image). A batch of one
            gives one :class:`Interpretation`, a larger batch a list.
        target : int, tuple, Tensor or list, optional
            The class to explain per seed, in any Captum form. Default: the predicted
            class. When it differs from the prediction, the region is the class-``c``
            side of the sampled boundaries and does not contain the seed.
        additional_forward_args : any, optional
            Extra arguments of ``forward_func``.
        n_boundaries : int
            Candidate boundaries sampled per seed (``|Q|``, 50 in the paper).
        delta : int, float or None
            Negatives allowed inside the region. ``None`` (default): the smallest value
            that keeps the sampled problem feasible (negatives no sampled boundary
            separates from the seed). An int is a count, a float in ``[0, 1)`` a share of
            the negatives. ``delta=0`` selects the same boundaries as ``None`` but reports
            ``reached=False`` when some negatives cannot be cut off.
        seed : int
            Seed of the random choice of candidate references. Each seed image uses the
            same generator state, so a batch gives what its images give one at a time.
        refine : {"tighten", "prune", "none"}
            After the greedy loop: add every zero-cost boundary (``tighten``, default),
            drop boundaries that change neither count (``prune``), or nothing.
        heatmap_rule : {"elementwise", "channel", "region-score"}
            See :mod:`captum_repinterp.heatmap`. ``"region-score"`` needs one image input
            and a convolutional layer with one output; it costs one extra forward pass of
            ``K`` masked copies of the seed.
        combine : {"sum", "unit"}
            How the selected normals are combined into the heat-map direction.
        bisection_steps : int
            Bisection steps per candidate (bracket width ``2 ** -steps``).
        progress : bool
            Progress bar over seeds.
        heatmap_layer : nn.Module, optional
            Draw the (elementwise) heat map at this earlier layer of the model, whose
            finer maps the region's direction is pulled back to (see
            :func:`~captum_repinterp.heatmap.pulled_back_heatmap`). The region itself
            stays at ``layer``. Default: the map is drawn at ``layer``.
        """
        results, _ = self._interpret_batch(
            inputs,
            target,
            additional_forward_args,
            n_boundaries,
            delta,
            seed,
            refine,
            heatmap_rule,
            combine,
            bisection_steps,
            progress,
            heatmap_layer,
        )
        return results[0] if len(results) == 1 else results

    def _interpret_batch(
        self,
        inputs: Any,
        target: TargetType,
        additional_forward_args: Any,
        n_boundaries: int,
        delta: int | float | None,
        seed: int,
        refine: str,
        heatmap_rule: str,
        combine: str,
        bisection_steps: int,
        progress: bool,
        heatmap_layer: nn.Module | None = None,
    ) -> tuple[list[Interpretation], tuple[Tensor, ...]]:
        self._check_fitted()
        self._check_heatmap_layer(heatmap_layer, heatmap_rule)
        n_boundaries = check_int(n_boundaries, "n_boundaries")
        bisection_steps = check_int(bisection_steps, "bisection_steps")
        check_choice(refine, "refine", _REFINE)
        check_choice(heatmap_rule, "heatmap_rule", HEATMAP_RULES)
        check_choice(combine, "combine", COMBINE_RULES)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        inputs_t = format_inputs(inputs)
        activations, outputs = self._layer_activations(inputs_t, additional_forward_args)
        targets = resolve_targets(outputs, target)
        warn_nonlinear_head(getattr(self, "head_nonlinear_", ()), stacklevel=5)
        extra = _format_additional_forward_args(additional_forward_args)
        device = model_device(self.forward_func, self.layer)
        psi = self.layout_.flatten(activations)
        n = psi.shape[0]
        results = []
        with eval_mode(self.forward_func, self.layer):
            for i in tqdm(range(n), desc="interpret", disable=not progress):
                one = tuple(t[i : i + 1].detach() for t in inputs_t)
                if device is not None:
                    one = tuple(t.to(device) for t in one)
                extra_i = _slice_args(extra, n, i, i + 1)
                head = self._head_for(one, extra_i)
                region = self._interpret_one(
                        head,
                        psi[i],
                        outputs[i : i + 1].reshape(1, -1),
                        int(targets[i]),
                        n_boundaries,
                        delta,
                        seed,
                        refine,
                        heatmap_rule,
                        combine,
                        bisection_steps,
                    )
                if heatmap_rule == "region-score":
                    region.channel_weights = self._region_score(
                        region, one, extra_i, tuple(a[i] for a in activations)
                    )
                region.heatmap_layer = heatmap_layer
                results.append(region)
        return results, activations

    def _region_score(
        self,
        region: Interpretation,
        one: tuple[Tensor, ...],
        extra: tuple | None,
        seed_acts: tuple[Tensor, ...],
    ) -> Tensor:
        """Channel weights of the ``"region-score"`` heat-map rule for one seed."""
        if len(one) != 1 or one[0].dim() != 4 or len(seed_acts) != 1 or seed_acts[0].dim() != 3:
            raise ValueError(
                "heatmap_rule='region-score' needs one image input (1 x C x H x W) and a "
                "convolutional layer with one output (K x h x w); use 'elementwise'"
            )

        def features_of(batch: Tensor) -> Tensor:
            args = _expand_additional_forward_args(extra, batch.shape[0])
            with torch.no_grad():
                tensors, _, _ = forward_with_layer(
                    self.forward_func,
                    self.layer,
                    (batch,),
                    args,
                    self.attribute_to_layer_input_,
                )
            return self.layout_.flatten(tensors)

        return region_score_weights(one[0], seed_acts[0], features_of, region.weight, region.bias)

    def _head_for(self, one: tuple[Tensor, ...], extra: tuple | None) -> Callable:
        if self.head is not None:
            return UserHead(self.head, self.layout_)
        return HookHead(
            self.forward_func,
            self.layer,
            one,
            extra,
            self.layout_,
            self.attribute_to_layer_input_,
        )

    def _sample(
        self, head: Callable, psi_x: Tensor, cand: Tensor, target: int, n_steps: int
    ) -> tuple[Boundaries, np.ndarray, Callable[[Tensor, Tensor], Tensor]]:
        """Sample the candidate boundaries and test every reference against them.

        Returns the boundaries, the references each one pushes out (packed bits, see
        :func:`~captum_repinterp.match.failing_bits`) and ``margins_at(index, sel)``,
        the margins of the references ``index`` for the boundaries ``sel``.

        With a projection whose head runs from its leading linear layer's output ``z``
        (checked on the seed and two candidates), the bisection and the backward pass run
        on ``r``-dimensional ``z`` instead of ``D``-dimensional features, and the
        margins are ``P u + b``; the boundaries are the same planes
        (``w = A^T u``). Otherwise everything runs on the features.
        """
        projection = getattr(self, "projection_", None)
        cand_feats = self.features_[cand].to(psi_x.device, psi_x.dtype)
        zhead = None
        if projection is not None:
            zhead = projection.sampling_head(head, psi_x, cand_feats[:2])
        if zhead is None:
            bounds = sample_boundaries(head, psi_x, cand_feats, target, n_steps=n_steps)
            weight = bounds.weight.to("cpu", torch.float32)
            bias = bounds.bias.to("cpu", torch.float32)
            u = None if projection is None else projection.coefficients(weight)
        else:
            z_x = projection.z_of(psi_x[None])[0]
            z_c = projection.z_of_references(cand, psi_x)
            # near-duplicates are judged on the features' [w, b], as on the plain path
            in_z = sample_boundaries(
                zhead, z_x, z_c, target, n_steps=n_steps, duplicate_tol=-1.0
            )
            weight, bias = projection.to_features(in_z.weight, in_z.bias)
            bias = bias.to(torch.float32)
            keep = ~near_duplicates(weight, bias, gram=projection.normal_gram(in_z.weight))
            u, weight, bias = in_z.weight.cpu()[keep], weight[keep], bias[keep]
            bounds = Boundaries(weight, bias, in_z.source[keep], in_z.runner_up[keep])
        if u is None:
            features = self.features_

            def margins_at(index: Tensor, sel: Tensor) -> Tensor:
                return margins(features[index], weight[sel], bias[sel])

            return bounds, failing_bits(features, weight, bias), margins_at

        def margins_at_z(index: Tensor, sel: Tensor) -> Tensor:
            return projection.margins_rows(index, u[sel], bias[sel])

        return bounds, projection.failing_bits_of(u, bias), margins_at_z

    def _interpret_one(
        self,
        head: Callable,
        psi_x: Tensor,
        logits_x: Tensor,
        target: int,
        n_boundaries: int,
        delta: int | float | None,
        seed: int,
        refine: str,
        heatmap_rule: str,
        combine: str,
        bisection_steps: int,
    ) -> Interpretation:
        n_classes = logits_x.shape[1]
        if not 0 <= target < n_classes:
            raise ValueError(f"target {target} is out of range for {n_classes} classes")
        seed_in_class = int(logits_x.argmax(dim=1)[0]) == target
        preds = self.predictions_
        cand = choose_candidates(preds, target, seed_in_class, n_boundaries, seed)
        bounds, fail, margins_at = self._sample(head, psi_x, cand, target, bisection_steps)
        weight = bounds.weight.to("cpu", torch.float32)
        bias = bounds.bias.to("cpu", torch.float32)
        positive = preds == target
        cover = greedy_cover_bits(fail, positive, delta=delta, refine=refine)
        sel = cover.selected
        w_sel, b_sel = weight[sel], bias[sel]
        inside = cover.inside
        members = torch.nonzero(inside, as_tuple=False).flatten()
        seed_m = (w_sel.double() @ psi_x.detach().cpu().double()) + b_sel.double()
        if sel.numel() > 0:
            dist = semantic_distance(seed_m, margins_at(members, sel))
        else:
            dist = _l1_to_rows(self.features_, members, psi_x.detach().cpu())
        order = torch.argsort(dist, stable=True)
        n_inside = int(members.numel())
        n_pos_inside = int(positive[members].sum())
        n_pos = int(positive.sum())
        return Interpretation(
            target=target,
            seed_in_class=seed_in_class,
            weight=w_sel,
            bias=b_sel,
            runner_up=bounds.runner_up[sel],
            members=members[order],
            member_distances=dist[order],
            purity=n_pos_inside / n_inside if n_inside else 1.0,
            coverage=n_pos_inside / n_pos if n_pos else 0.0,
            delta=cover.delta,
            reached=cover.reached,
            n_sampled=len(bounds),
            seed_margins=seed_m,
            layout=self.layout_,
            heatmap_rule=heatmap_rule,
            combine=combine,
            explainer=self,
        )

    # ------------------------------------------------------------------ attribute
    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool | None = None,
        relu_attributions: bool = True,
        attr_dim_summation: bool = True,
        n_boundaries: int = 50,
        delta: int | float | None = None,
        seed: int = 0,
        refine: str = "tighten",
        heatmap_rule: str = "elementwise",
        combine: str = "sum",
        bisection_steps: int = 20,
        progress: bool = False,
        heatmap_layer: nn.Module | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Heat map of each seed's representative interpretation, on the seed itself.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            Seed images, batch first (as for every Captum method).
        target : int, tuple, Tensor or list, optional
            Class per example in any Captum form; default the predicted class.
        additional_forward_args : any, optional
            Extra arguments of ``forward_func``, as in Captum.
        attribute_to_layer_input : bool, optional
            Must match what ``fit`` used (``None``: use that).
        relu_attributions : bool
            Keep only positive evidence (default True, as in Grad-CAM).
        attr_dim_summation : bool
            Sum over dimension 1 (channels), as ``LayerGradCam`` does.
        n_boundaries, delta, seed, refine, heatmap_rule, combine, bisection_steps, progress
            See :meth:`interpret`.
        heatmap_layer : nn.Module, optional
            See :meth:`interpret`; the output is then shaped like ``LayerGradCam`` on
            ``heatmap_layer``.

        Returns
        -------
        Tensor or tuple of Tensor
            Shaped like ``LayerGradCam.attribute`` on the same layer: ``N x 1 x h x w``
            for a convolutional layer, ``N x 1`` for an ``N x D`` layer, a tuple for a
            layer with several outputs. Raw values (not min-max scaled).

        Examples
        --------
        >>> ri = RepresentativeInterpretation(model, model.features[-1]).fit(refs)
        >>> attr = ri.attribute(images)
        >>> up = LayerAttribution.interpolate(attr, images.shape[-2:], "bilinear")
        """
        self._check_fitted()
        if attribute_to_layer_input is not None and (
            attribute_to_layer_input != self.attribute_to_layer_input_
        ):
            raise ValueError(
                f"attribute_to_layer_input={attribute_to_layer_input} but fit used "
                f"{self.attribute_to_layer_input_}; refit with the same value"
            )
        interps, activations = self._interpret_batch(
            inputs,
            target,
            additional_forward_args,
            n_boundaries,
            delta,
            seed,
            refine,
            heatmap_rule,
            combine,
            bisection_steps,
            progress,
            heatmap_layer,
        )
        directions = torch.stack([it.direction for it in interps])
        if heatmap_layer is not None:
            maps = self._pulled_back(
                inputs, additional_forward_args, directions, heatmap_layer,
                relu_attributions, attr_dim_summation,
            )
            return _format_output(len(maps) > 1, maps)
        channel_weights = (
            torch.stack([it.channel_weights for it in interps])
            if heatmap_rule == "region-score"
            else None
        )
        maps = layer_heatmap(
            directions,
            activations,
            self.layout_,
            heatmap_rule,
            relu_attributions,
            attr_dim_summation,
            channel_weights,
        )
        return _format_output(len(maps) > 1, maps)

    # ------------------------------------------------------------------ audit
    def audit(self, images: Tensor, target: int | None = None, **kwargs: Any) -> Any:
        """Audit the decision logics used for a class: see :func:`captum_repinterp.audit.audit`.

        ``ri.audit(images, target, **kwargs)`` is ``audit(ri, images, target, **kwargs)``.
        """
        from .audit import audit

        return audit(self, images, target, **kwargs)


def _l1_to_rows(features: Tensor, rows: Tensor, point: Tensor, chunk: int = 8192) -> Tensor:
    """``sum |features[r] - point|`` for the given rows, gathered in chunks (float64)."""
    out = torch.empty(rows.numel(), dtype=torch.float64)
    p = point.double()
    for s in range(0, rows.numel(), chunk):
        part = features[rows[s : s + chunk]].double()
        out[s : s + chunk] = (part - p).abs().sum(1)
    return out


def _warn_training() -> None:
    warnings.warn(
        "the model is in training mode; RepresentativeInterpretation runs it in eval "
        "mode for the duration of the call (dropout off, batch-norm running statistics) "
        "and restores every module's mode afterwards",
        UserWarning,
        stacklevel=4,
    )
