"""The Captum facade: :class:`RepresentativeInterpretation`.

A thin layer that formats inputs and targets with Captum's helpers, then calls the
pipeline stages in order::

    fit:        references --references.fit_references--> FittedReferences (psi, predictions)
    interpret:  seeds --reader--> psi(x), logits --targets--> class c
                --region.find_region (sampler, match, solver)--> Interpretation
    attribute:  interpret, then the region's heat-map rule on the seed itself
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._captum_compat import (
    GradientAttribution,
    LayerAttribution,
    TargetType,
    _format_output,
    log_usage,
)
from ._checks import check_bool, check_grad_mode
from .features import eval_mode
from .inputs import check_model, uncompiled
from .interpretation import Interpretation
from .layers import warn_nonlinear_head
from .model_watch import ModelWatch
from .options import AUTO, DEFAULT_HEATMAP_LAYER, DEFAULT_HEATMAP_RULE, InterpretOptions
from .reader import LayerReader
from .references import FittedState, NotFittedError, fit_references
from .region import find_regions
from .tracing import warn_probability_output

__all__ = ["RepresentativeInterpretation", "NotFittedError"]


class RepresentativeInterpretation(FittedState, LayerAttribution, GradientAttribution):
    r"""Representative interpretations (Lam, Chu et al., ICCV 2021) as a Captum method.

    The network is split at ``layer`` (a cut; the head after it piecewise linear). For a
    seed, linear pieces of the head's decision boundary are sampled and a few chosen by
    greedy submodular-cost submodular cover, so that the region they bound holds many
    references of the seed's class and (almost) none of others. The attribution is the
    region's heat map on the seed; :meth:`interpret` returns the whole region.

    Usage mirrors ``LayerGradCam`` plus one :meth:`fit` over reference images::

        >>> ri = RepresentativeInterpretation(model, find_layer(model, images[:1]))
        >>> attr = ri.fit(reference_images).attribute(images)  # where heatmap_layer="auto" chose
        >>> region = ri.interpret(images[:1])  # .similar(5), .purity, .contains(x)

    Parameters
    ----------
    forward_func : callable or nn.Module
        The model, returning class scores (``N x C``; more dimensions are flattened and
        ``target`` tuples index them as in Captum).
    layer : nn.Module
        The layer to split at, usually the last convolutional block, called once per
        forward pass.
    device_ids : list of int, optional
        As in Captum's layer methods (kept for signature compatibility).
    head : callable, optional
        ``head(layer_output) -> logits``. The default runs the model with the layer's
        output replaced, the modules before the layer answering with their outputs
        recorded once per seed, so a given head saves little (a new user measured the
        same times on a ResNet-18 split at ``layer3``); give one when the model cannot
        be run that way, e.g. when its forward runs the layer under ``torch.no_grad()``
        (a frozen backbone), which :meth:`fit` refuses without ``head``.

    Notes
    -----
    Bad input gets a ValueError or TypeError naming the argument. A head that is not
    piecewise linear gets a :class:`~captum_repinterp.layers.NonPiecewiseLinearWarning`.
    A model in training mode runs in eval mode for each call, with a warning. The calls
    take gradients, so under ``torch.inference_mode()`` they raise a RuntimeError
    (``torch.no_grad()`` is fine); a model whose forward runs the layer under
    ``torch.no_grad()`` (a frozen backbone) is refused at :meth:`fit` (a ValueError
    naming ``layer``) unless ``head`` is given. Calls made under
    ``torch.autocast`` run with it off, in the model's own dtypes. Source:
    "Finding Representative Interpretations on Convolutional Neural Networks", ICCV 2021
    (arXiv 2108.06384).
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        device_ids: list[int] | None = None,
        head: Callable | None = None,
    ) -> None:
        check_model(forward_func, layer, head)
        forward_func = uncompiled(forward_func)  # explained eagerly (same function)
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        GradientAttribution.__init__(self, forward_func)
        self.head = head

    def has_convergence_delta(self) -> bool:
        return False

    multiplies_by_inputs = property(
        lambda self: False,
        doc="False, as for ``LayerGradCam``: the maps weight the layer's activations by the "
        "region's direction (at the input resolution: input times gradient of the "
        "region's score); they are not completeness-style attributions.",
    )

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
        cut_check: str = "raise",
    ) -> RepresentativeInterpretation:
        r"""Compute and keep the layer features and predictions of the references.

        Parameters
        ----------
        references : Tensor, tuple of Tensor, Dataset or DataLoader
            Reference images, batch first, scaled as the model expects; unlabelled (the
            model's predictions are used, at least two classes; labels of ``(inputs,
            label)`` items are ignored). Transforms must be deterministic: the figures
            and ``heatmap_layer="auto"`` read the references again, and a Dataset whose
            first items read twice differ (random crops or flips) gets a warning.
        batch_size : int
            Batch size for tensors and Datasets (a DataLoader keeps its own).
        additional_forward_args : any, optional
            As in ``attribute``; tensors of ``N`` rows are sliced with each batch.
        attribute_to_layer_input : bool
            Split at the layer's input instead of its output.
        progress : bool
            Show a tqdm progress bar.
        store : str or os.PathLike, optional
            A directory for an on-disk reference store (:mod:`captum_repinterp.store`),
            so that ``N x D`` never has to fit in RAM. An interrupted fit resumes when
            called again with the same references; a finished store of as many rows is
            reused (its first rows recomputed and compared, same checks and results).
        append : bool
            With ``store``: add these references after the ones already stored. The rows
            this call appends are checked as a new store's first rows are (a few are
            recomputed and compared, so a model whose features depend on the batch or
            differ from run to run is refused). ``heatmap_layer="auto"`` cannot read the
            references of an appended store back: it then draws at the split layer, with
            a warning (pass ``heatmap_layer`` yourself). An interrupted append resumes
            when called again with the same references and ``append=True``.
        cut_check : {"raise", "warn", "off"}
            When the first references show that ``layer`` is not a cut (a skip path or
            an extra input bypasses it, see :mod:`captum_repinterp.cuts`): raise
            :class:`~captum_repinterp.cuts.NotACutError`, warn, or do not check.

        Returns
        -------
        self
            With ``references_``, ``reader_``, ``features_`` (``N x D`` float32, CPU),
            ``predictions_`` (``N`` int64), ``layout_``, ``projection_``, ``store_``,
            ``affine_`` (the head as an affine map when it is one at every reference:
            then the regions are exact, else None and they are sampled). What was
            learned belongs to the model's current weights: ``interpret``,
            ``attribute``, ``transform`` and ``audit`` raise a ``ValueError`` naming
            ``forward_func`` once they change in place (an optimizer step,
            ``load_state_dict`` of other values, a forward pass in training mode);
            call ``fit`` again (:mod:`captum_repinterp.model_watch`).

        Raises
        ------
        TypeError, ValueError
            Naming the argument: references empty, not batch first, NaN, failing in the
            model or of one predicted class; a bad ``store`` path or store; ``layer``
            when the model's forward runs it with gradients off (pass ``head``).
        NotACutError
            (a ValueError) With ``cut_check="raise"``, when ``layer`` is not a cut.
        """
        fitted = fit_references(
            self.forward_func,
            self.layer,
            references,
            self.head,
            batch_size,
            additional_forward_args,
            attribute_to_layer_input,
            check_bool(progress, "progress"),
            store,
            check_bool(append, "append"),
            cut_check,
        )
        self._references = fitted
        # a store's fit has hashed the weights already (to write or check the store)
        stored = None if fitted.store is None else fitted.store.meta.get("model")
        self._watch = ModelWatch.of(self.forward_func, stored)
        self._reader = LayerReader(
            self.forward_func,
            self.layer,
            fitted.layout,
            fitted.input_spec,
            attribute_to_layer_input,
            self.head,
        )
        warn_nonlinear_head(fitted.head_nonlinear)
        warn_probability_output(fitted.head_output_op)
        return self

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
        with self._watching():
            return self.reader_.features(
                inputs, batch_size, additional_forward_args, check_bool(progress, "progress")
            )

    # ------------------------------------------------------------------ interpret
    def interpret(
        self,
        inputs: Any,
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_boundaries: int = 50,
        delta: int | float | None = None,
        random_state: int = 0,
        refine: str = "tighten",
        heatmap_rule: str = DEFAULT_HEATMAP_RULE,
        combine: str = "sum",
        bisection_steps: int = 20,
        progress: bool = False,
        heatmap_layer: nn.Module | str | None = DEFAULT_HEATMAP_LAYER,
    ) -> Interpretation | list[Interpretation]:
        r"""Representative interpretation(s) of seed image(s).

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            Seed image(s), batch first (``x[None]`` for a single image).
        target : int, tuple, Tensor or list, optional
            The class to explain per seed, in any Captum form (default: the predicted
            class; another class gives its side of the boundaries, without the seed).
        additional_forward_args : any, optional
            Extra arguments of ``forward_func``. Each seed runs alone: a tensor whose first
            dimension is the number of seeds is cut to the seed's row; any other argument
            is passed whole (so a tensor shared by the batch must not have as many rows
            as there are seeds: give it a leading dimension of 1).
        n_boundaries : int
            Candidate boundaries sampled per seed (``|Q|``, 50 in the paper).
        delta : int, float or None
            Negatives allowed inside: a count, a share in ``[0, 1)``, or ``None``
            (default) for the negatives no sampled boundary separates from the seed.
        random_state : int
            Seed of the random choice of candidates (the same for every seed image).
        refine : {"tighten", "prune", "none"}
            After the greedy loop: add every zero-cost boundary, drop boundaries that
            change neither count, or nothing.
        heatmap_rule : str
            A rule registered in :mod:`captum_repinterp.heatmap`: ``"channel-members"``
            (default: at the split layer Grad-CAM's form with the region's direction,
            ``relu(sum_k mean_p v[k, p] A_k)``; at the input or an earlier layer the
            region's score with each channel in units of its mean level over the seed
            and its 8 nearest members, drawn by gradient times activation; no extra
            forward pass), ``"elementwise-members"`` (that member-scaled score at every
            resolution), ``"elementwise"`` (the authors' rule),
            ``"elementwise-positive"``, ``"channel"``, ``"region-score"`` (``K`` forward
            passes per seed), ``"region-members"`` (``9 K``).
        combine : {"sum", "unit"}
            How the selected normals are combined into the heat-map direction.
        bisection_steps : int
            Bisection steps per candidate (bracket width ``2 ** -steps``).
        progress : bool
            Progress bar over seeds.
        heatmap_layer : nn.Module, "input", "auto" or None
            Where the elementwise rules and ``"channel-members"`` draw the region's
            score (the region stays at
            ``layer``): ``None``, the split layer; an earlier layer; ``"input"``, the
            model's input (input times gradient, one value per pixel); ``"auto"``, the
            split layer or the input, whichever keeps more class evidence on the
            references (:attr:`heatmap_resolution_`, chosen once per fit; see
            :mod:`captum_repinterp.resolution`). ``"region-score"`` and
            ``"region-members"`` also take an earlier layer (its channels), not the
            input; ``"channel"`` only the split layer; with ``"auto"`` these rules draw
            at the split layer.

        Returns
        -------
        Interpretation or list of Interpretation
            One for a batch of one, else a list in the order of ``inputs``.

        Raises
        ------
        NotFittedError
            Before :meth:`fit`.
        TypeError, ValueError
            Naming the argument: inputs not shaped or typed like the references, a
            target out of range, an option out of range.
        """
        options = InterpretOptions(
            n_boundaries, delta, random_state, refine, heatmap_rule, combine,
            bisection_steps, progress, self._split_layer_as_none(heatmap_layer),
        )  # fmt: skip
        # one training-mode warning per call (the stages' own blocks then find eval mode)
        with self._watching(), eval_mode(self.forward_func, self.layer, warn=True):
            options = self._resolve(options)
            results, _ = find_regions(
                self.references_, self.reader_, inputs, target, additional_forward_args, options
            )
        return results[0] if len(results) == 1 else results

    def _split_layer_as_none(self, heatmap_layer: Any) -> Any:
        """The split layer named as a module is the split layer: None, before the
        options are checked (rules drawn only at the split layer accept it too)."""
        return None if heatmap_layer is self.layer else heatmap_layer

    def _resolve(self, options: InterpretOptions) -> InterpretOptions:
        """``heatmap_layer="auto"`` replaced by the resolution chosen on the references
        (not chosen for rules that draw at the split layer anyway)."""
        if options.heatmap_layer != AUTO or not options.rule.supports_input:
            return options.resolved(None)
        return options.resolved(self.heatmap_resolution_.heatmap_layer)

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
        random_state: int = 0,
        refine: str = "tighten",
        heatmap_rule: str = DEFAULT_HEATMAP_RULE,
        combine: str = "sum",
        bisection_steps: int = 20,
        progress: bool = False,
        heatmap_layer: nn.Module | str | None = DEFAULT_HEATMAP_LAYER,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Heat map of each seed's representative interpretation, on the seed itself.

        Parameters
        ----------
        attribute_to_layer_input : bool, optional
            Must match what ``fit`` used (``None``: use that).
        relu_attributions, attr_dim_summation : bool
            Keep only positive evidence; sum over dimension 1. Both True by default, as
            in the Grad-CAM paper; Captum's ``LayerGradCam`` defaults to
            ``relu_attributions=False``, so pass the same value to both when comparing.
        inputs, target, additional_forward_args, n_boundaries, delta, random_state, ...
            As in :meth:`interpret` (and its other options).

        Returns
        -------
        Tensor or tuple of Tensor
            Raw values (not scaled, not upsampled) where the map is drawn. With
            ``heatmap_layer=None``: shaped like ``LayerGradCam.attribute`` on the same
            layer, ``N x 1 x h x w`` for a convolutional layer, ``N x 1`` for an
            ``N x D`` layer, a tuple for a layer with several outputs; at an earlier
            layer, like ``LayerGradCam`` on that layer; at the input, ``N x 1 x H x W``
            per input tensor (``N x C x H x W`` with ``attr_dim_summation=False``). The
            default ``"auto"`` gives the split layer's or the input's, as
            :attr:`heatmap_resolution_` says.

        Raises
        ------
        NotFittedError, TypeError, ValueError
            As :meth:`interpret` (and ``attribute_to_layer_input`` unlike ``fit``'s).

        Examples
        --------
        >>> attr = ri.attribute(images)
        >>> up = LayerAttribution.interpolate(attr, images.shape[-2:], "bilinear")
        """
        check_grad_mode("attribute")
        relu_attributions = check_bool(relu_attributions, "relu_attributions")
        attr_dim_summation = check_bool(attr_dim_summation, "attr_dim_summation")
        fitted_to_input = self.attribute_to_layer_input_
        if attribute_to_layer_input is not None:
            attribute_to_layer_input = check_bool(
                attribute_to_layer_input, "attribute_to_layer_input"
            )
        if attribute_to_layer_input is not None and attribute_to_layer_input != fitted_to_input:
            raise ValueError(
                f"attribute_to_layer_input={attribute_to_layer_input} but fit used "
                f"{fitted_to_input}; refit with the same value"
            )
        options = InterpretOptions(
            n_boundaries, delta, random_state, refine, heatmap_rule, combine,
            bisection_steps, progress, self._split_layer_as_none(heatmap_layer),
        )  # fmt: skip
        # one training-mode warning per call (the stages' own blocks then find eval mode)
        with self._watching(), eval_mode(self.forward_func, self.layer, warn=True):
            options = self._resolve(options)
            regions, activations = find_regions(
                self.references_, self.reader_, inputs, target, additional_forward_args, options
            )
            if not regions and isinstance(options.heatmap_layer, nn.Module):
                raise ValueError("inputs: an empty batch has no maps at heatmap_layer")
            dim = self.layout_.dim
            directions = (
                torch.stack([r.direction for r in regions])
                if regions
                else torch.zeros(0, dim, dtype=activations[0].dtype)  # an empty batch
            )
            weights = [r.channel_weights for r in regions] or [None]
            maps = options.rule.maps(
                self.reader_,
                inputs,
                additional_forward_args,
                directions,
                None if weights[0] is None else torch.stack(weights),
                relu_attributions,
                attr_dim_summation,
                activations=activations,
            )
            return _format_output(len(maps) > 1, maps)

    def audit(self, images: Tensor, target: int | None = None, **kwargs: Any) -> Any:
        """Audit the decision logics of a class: :func:`captum_repinterp.auditing.audit`."""
        from .auditing import audit

        return audit(self, images, target, **kwargs)
