"""Stage 4-5 for one seed: from its features to an :class:`Interpretation`.

Candidates are drawn from the references on the other side of the class-``c`` decision,
their boundaries sampled and matched (:mod:`captum_repinterp.boundaries`), a few chosen
by the greedy cover (:mod:`captum_repinterp.solver`), and the members ranked by semantic
distance to the seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._captum_compat import TargetType, _format_additional_forward_args
from ._checks import check_finite_outputs, check_grad_mode
from .boundaries import sample_and_match
from .features import caller_stacklevel, eval_mode, module_name
from .heatmap import RegionContext, check_input_dtypes
from .inputs import check_against_references, format_inputs, slice_args
from .interpretation import Interpretation
from .layers import warn_nonlinear_head
from .match import margins, semantic_distance
from .options import InterpretOptions
from .reader import LayerReader
from .references import FittedReferences
from .sampler import Boundaries, choose_candidates
from .solver import greedy_cover_bits
from .targets import resolve_targets

__all__ = [
    "NoBoundaryWarning",
    "Seed",
    "SeedOnBoundaryWarning",
    "assemble_interpretation",
    "find_region",
    "find_regions",
    "interpret_seed",
    "read_seeds",
]


class NoBoundaryWarning(UserWarning):
    """A seed's region got no boundary: it is not a decision region and its map is zero."""


class SeedOnBoundaryWarning(UserWarning):
    """The seed is not strictly inside its own region: it lies on one of the region's
    boundaries (its two largest logits tie, or nearly)."""


def _warn_seed_on_boundary(seed_margins: Tensor, target: int) -> None:
    worst = float(seed_margins.min())
    warnings.warn(
        f"the seed is predicted as class {target} but lies on one of its region's "
        f"boundaries (smallest margin {worst:.3g} logits: its two largest logits tie, up "
        "to float rounding), so the region, which holds the points strictly on the "
        f"class-{target} side, does not contain the seed: contains(seed) is False and "
        "references equal to the seed are not members. Interpret a nearby image, or "
        "read the region as that of the class beside the tie.",
        SeedOnBoundaryWarning,
        stacklevel=caller_stacklevel(),
    )


def _warn_no_boundary(n_sampled: int, n_candidates: int, target: int) -> None:
    if n_sampled == 0 and n_candidates == 0:
        why = (
            f"no reference lies on the other side of the class-{target} decision (with "
            f"the seed predicted as {target}: every reference is; with another target: no "
            f"reference is predicted as {target}), so there is no segment to search"
        )
    elif n_sampled == 0:
        why = (
            f"none of the {n_candidates} segments from the seed to references on the other "
            f"side of the class-{target} decision changed the decision"
        )
    else:
        why = (
            f"none of the {n_sampled} sampled boundaries separates a reference of another "
            "class from the seed at a cost the cover accepts"
        )
    warnings.warn(
        f"the region of this seed has no boundary: {why}. The interpretation's "
        "has_boundaries is False, every reference is a member and the heat map is zero; "
        "the model's output may barely depend on this layer, or try more n_boundaries.",
        NoBoundaryWarning,
        stacklevel=caller_stacklevel(),
    )


@dataclass(frozen=True)
class Seed:
    """One seed image of a batch, as read through the split layer.

    Attributes
    ----------
    inputs : tuple of Tensor
        The seed (a batch of one, detached, where the caller gave it).
    additional_forward_args : tuple or None
        Its extra arguments of ``forward_func``.
    features : Tensor
        ``D``: ``psi(x)``.
    logits : Tensor
        ``1 x C``: the model's output on it.
    target : int
        The class explained.
    activations : tuple of Tensor
        Its layer tensors, without the batch dimension.
    trunk : object or None
        The model's outputs before the layer, recorded when the seed was read, for its
        head (see :meth:`~captum_repinterp.reader.LayerReader.read`); None when the head
        records them itself.
    """

    inputs: tuple[Tensor, ...]
    additional_forward_args: tuple | None
    features: Tensor
    logits: Tensor
    target: int
    activations: tuple[Tensor, ...]
    trunk: Any = field(default=None, repr=False, compare=False)


def read_seeds(
    references: FittedReferences,
    reader: LayerReader,
    inputs: Any,
    target: TargetType,
    additional_forward_args: Any,
    options: InterpretOptions,
) -> tuple[list[Seed], tuple[Tensor, ...]]:
    """The seeds of a batch (one forward pass each) and their layer tensors (``n x ...``).

    Raises
    ------
    TypeError, ValueError
        Naming ``inputs``, ``target`` or ``heatmap_layer``.
    """
    inputs_t = format_inputs(inputs)
    # the seed's read records what its head would record in a run of its own, unless
    # the head is affine and its exact boundaries come from the kept logits (no head call)
    exact = getattr(references, "affine", None) is not None and (
        getattr(references, "logits", None) is not None
    )
    trunks: list[Any] | None = None if exact else []
    activations, outputs = reader.read(inputs_t, additional_forward_args, trunks=trunks)
    if isinstance(options.heatmap_layer, str):  # after read's checks against the references
        check_input_dtypes(inputs_t)
    if outputs.shape[0] == 0:
        return [], activations
    check_finite_outputs(outputs, "inputs")
    targets = resolve_targets(outputs, target)
    warn_nonlinear_head(references.head_nonlinear)
    extra = _format_additional_forward_args(additional_forward_args)
    psi = references.layout.flatten(activations)
    n = psi.shape[0]
    seeds = [
        Seed(
            tuple(t[i : i + 1].detach() for t in inputs_t),
            slice_args(extra, n, i, i + 1),
            psi[i],
            outputs[i : i + 1].reshape(1, -1),
            int(targets[i]),
            tuple(a[i] for a in activations),
            trunks[0] if trunks and n == 1 else None,
        )
        for i in range(n)
    ]
    return seeds, activations


def interpret_seed(
    references: FittedReferences, reader: LayerReader, seed: Seed, options: InterpretOptions
) -> Interpretation:
    """The interpretation of one seed, with its heat-map rule's per-region weights.

    A reference set that finds regions itself (a ``find_region`` method, see
    :mod:`captum_repinterp.distributed`) is handed the region search.
    """
    own = getattr(references, "find_region", None)
    device = reader.device
    with eval_mode(reader.forward_func, reader.layer):
        one = seed.inputs if device is None else tuple(t.to(device) for t in seed.inputs)
        extra = seed.additional_forward_args
        head = reader.head_for(one, extra, trunk=seed.trunk)
        args = (reader, head, seed.features, seed.logits, seed.target, options)
        region = own(*args) if own is not None else find_region(references, *args)
        region.channel_weights = options.rule.region_weights(
            region.weight,
            region.bias,
            one,
            seed.activations,
            lambda batch: reader.features_of(batch, extra),
            context=RegionContext(region.members, references, reader, extra),
        )
    return region


def check_heatmap_layer(
    reader: LayerReader, inputs: Any, additional_forward_args: Any, heatmap_layer: Any
) -> None:
    """Refuse, before any region is searched, a ``heatmap_layer`` module the maps cannot
    be drawn at: not a module of the model, not on the path to the split layer (e.g.
    after it) or run more than once per forward pass. The last two are found by drawing
    a zero direction's map on the first input (one forward and one backward pass), so
    the error is the one the map would give.

    Raises
    ------
    ValueError
        Naming ``heatmap_layer`` (or ``inputs``, for inputs unlike the references).
    """
    if not isinstance(heatmap_layer, nn.Module):
        return
    model = reader.forward_func
    if isinstance(model, nn.Module) and module_name(model, heatmap_layer) is None:
        raise ValueError("heatmap_layer: the layer is not part of forward_func")
    inputs_t = format_inputs(inputs)
    check_against_references(inputs_t, reader.input_spec, "inputs")
    n = inputs_t[0].shape[0]
    if n == 0:  # no image to draw on (attribute names the empty batch)
        return
    extra = _format_additional_forward_args(additional_forward_args)
    first = tuple(t[:1] for t in inputs_t)
    zero = torch.zeros(reader.layout.dim)
    reader.pulled_back(first, slice_args(extra, n, 0, 1), zero, heatmap_layer)


def find_regions(
    references: FittedReferences,
    reader: LayerReader,
    inputs: Any,
    target: TargetType,
    additional_forward_args: Any,
    options: InterpretOptions,
) -> tuple[list[Interpretation], tuple[Tensor, ...]]:
    """The interpretation of every seed in ``inputs`` (one forward pass each).

    Returns the interpretations, in order, and the seeds' layer tensors (``n x ...``).
    Seeds are independent: a batch gives what its images give one at a time.
    A reference set that runs seeds itself (``find_regions`` method, see
    :mod:`captum_repinterp.distributed`) is handed the call.
    """
    check_grad_mode("interpret")
    check_heatmap_layer(reader, inputs, additional_forward_args, options.heatmap_layer)
    run = getattr(references, "find_regions", None)
    if run is not None:
        return run(reader, inputs, target, additional_forward_args, options)
    seeds, activations = read_seeds(
        references, reader, inputs, target, additional_forward_args, options
    )
    progress = tqdm(seeds, desc="interpret", disable=not options.progress)
    return [interpret_seed(references, reader, seed, options) for seed in progress], activations


def find_region(
    references: FittedReferences,
    reader: LayerReader,
    head: Callable[..., Tensor],
    seed_features: Tensor,
    seed_logits: Tensor,
    target: int,
    options: InterpretOptions,
) -> Interpretation:
    """The representative interpretation of one seed.

    Parameters
    ----------
    references : FittedReferences
        The fitted reference set.
    reader : LayerReader
        Kept by the interpretation to read new inputs.
    head : callable
        The head ``B x D -> B x C`` for this seed.
    seed_features : Tensor
        ``D``: ``psi(x)``.
    seed_logits : Tensor
        ``1 x C``: the model's output on the seed.
    target : int
        The class ``c`` explained.
    options : InterpretOptions
        The validated options.

    Returns
    -------
    Interpretation

    Raises
    ------
    ValueError
        When ``target`` is out of range.
    """
    n_classes = seed_logits.shape[1]
    if not 0 <= target < n_classes:
        raise ValueError(f"target {target} is out of range for {n_classes} classes")
    seed_in_class = int(seed_logits.argmax(dim=1)[0]) == target
    preds = references.predictions
    candidates = choose_candidates(
        preds, target, seed_in_class, options.n_boundaries, options.random_state
    )
    sampled = sample_and_match(
        head, seed_features, references, candidates, target, options.bisection_steps,
        seed_logits=seed_logits,
    )  # fmt: skip
    bounds = sampled.boundaries
    positive = preds == target
    cover = greedy_cover_bits(sampled.failing, positive, delta=options.delta, refine=options.refine)
    sel = cover.selected
    if sel.numel() == 0:
        _warn_no_boundary(len(bounds), candidates.numel(), target)
    members = torch.nonzero(cover.inside, as_tuple=False).flatten()
    psi_x = seed_features.detach().cpu()
    if sel.numel() > 0:
        values = sampled.margins(members, sel)
    else:
        values = _l1_to_rows(references.features, members, psi_x)
    return assemble_interpretation(
        references, reader, bounds, sel, members, values, psi_x, target, seed_in_class,
        cover.delta, cover.reached, options,
    )  # fmt: skip


def assemble_interpretation(
    references: FittedReferences,
    reader: LayerReader,
    bounds: Boundaries,
    selected: Tensor,
    members: Tensor,
    member_values: Tensor,
    seed_features: Tensor,
    target: int,
    seed_in_class: bool,
    delta: int,
    reached: bool,
    options: InterpretOptions,
) -> Interpretation:
    """The :class:`Interpretation` of a selection: members ranked, purity and coverage.

    ``member_values``: the members' margins for the ``selected`` boundaries
    (``len(members) x k``), or, when nothing is selected, their L1 distances to the seed's
    features (the ranking's fallback). ``seed_features``: ``psi(x)`` on the CPU.
    """
    w_sel, b_sel = bounds.weight[selected], bounds.bias[selected]
    seed_m = (w_sel.double() @ seed_features.double()) + b_sel.double()
    # checked as contains_features checks membership
    seed_row = seed_features.reshape(1, -1).float()
    if (
        seed_in_class
        and selected.numel() > 0
        and not bool((margins(seed_row, w_sel, b_sel) > 0).all())
    ):
        _warn_seed_on_boundary(seed_m, target)
    if selected.numel() > 0:
        dist = semantic_distance(seed_m, member_values)
    else:
        dist = member_values.double()
    order = torch.argsort(dist, stable=True)
    positive = references.predictions == target
    n_inside = int(members.numel())
    n_pos_inside = int(positive[members].sum())
    n_pos = int(positive.sum())
    return Interpretation(
        target=target,
        seed_in_class=seed_in_class,
        weight=w_sel,
        bias=b_sel,
        runner_up=bounds.runner_up[selected],
        members=members[order],
        member_distances=dist[order],
        purity=n_pos_inside / n_inside if n_inside else 1.0,
        coverage=n_pos_inside / n_pos if n_pos else 0.0,
        delta=delta,
        reached=reached,
        n_sampled=len(bounds),
        seed_margins=seed_m,
        layout=references.layout,
        heatmap_rule=options.heatmap_rule,
        combine=options.combine,
        heatmap_layer=options.heatmap_layer,
        reader=reader,
    )


def _l1_to_rows(features: Tensor, rows: Tensor, point: Tensor, chunk: int = 8192) -> Tensor:
    """``sum |features[r] - point|`` for the given rows, gathered in chunks (float64)."""
    out = torch.empty(rows.numel(), dtype=torch.float64)
    p = point.double()
    for s in range(0, rows.numel(), chunk):
        part = features[rows[s : s + chunk]].double()
        out[s : s + chunk] = (part - p).abs().sum(1)
    return out
