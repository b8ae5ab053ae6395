"""Which resolution the heat maps are drawn at: the split layer or the input.

``heatmap_layer="auto"`` (the default of ``interpret``/``attribute``) resolves here, once
per fitted explainer. The map of a region is the gradient times activation of its linear
score ``v . psi``, at the split layer (the paper's map, one value per position of the
layer) or at the input (one value per pixel: input times gradient of the same score). Which
of the two keeps the class evidence better depends on the model and the data, not on the
region: on 28 x 28 digits on black the strokes are the evidence and pixel maps keep them;
on faces on grey, scattered pixels are not a face and the layer's smooth map keeps more.

So the choice is made on the references, before any region: for a seeded random sample
of references both maps of the local linear piece of the head (the normal of
the boundary between the predicted class and the runner-up, ``d(z_c - z_c') / d psi``;
inside the piece this is exactly a boundary normal, as the region's directions are) are
scored by insertion (Petsiuk et al., RISE, arXiv:1806.07421): keep the top share ``s`` of
the pixels by the map, set the rest to ``baseline`` (0 in the model's input space,
Captum's default baseline), read the softmax score of the predicted class; average over
the shares ``INSERTION_SHARES``. The per-image scores of the two maps are compared by
one-sided Wilcoxon signed-rank tests (paired over the images), sequentially: on 16
references, then 32, then 64 (the sample grows only while the answer is unclear). At each
look the input is chosen when its scores are higher at level ``alpha / looks``
(``0.05 / 3``), the split layer when its scores are; when neither is clear after the last
look, near ties included, the split layer (the paper's map) is kept, so that a choice
does not flip with the sample. A clear difference is found on 16 images, a smaller one
on up to 64 (on 16 alone, one small CNN on 28 x 28 digits kept the split layer, p = .13,
where the input's maps were far better).

The split layer's candidate is always the elementwise map (gradient times activation of
the margin), whatever rule then draws there: with the default ``"channel-members"`` the
drawn map is the channel form, which is not scored (see ``docs/choices.md``).
Per-image differences of at most :data:`SCORE_TIE` are ties.

Only models whose input is one image batch (``N x C x H x W``) and whose split layer has
one output tensor are scored; otherwise, and when ``fit`` was not given the references as
a tensor, ``Dataset`` or ``DataLoader`` it can read by index, the maps stay at the split
layer and :attr:`ResolutionChoice.reason` says why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

from ._checks import check_grad_mode, check_int
from .features import eval_mode, grad_mode_at
from .inputs import reference_rows
from .masking import mask_images, softmax_scores, upsample

__all__ = [
    "INSERTION_SHARES",
    "SCORE_TIE",
    "ResolutionChoice",
    "choose_heatmap_layer",
    "input_better_p_value",
    "insertion_scores",
    "margin_maps",
]

#: Shares of pixels kept when scoring a map by insertion.
INSERTION_SHARES: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class ResolutionChoice:
    """Where ``heatmap_layer="auto"`` draws the maps, and why.

    Attributes
    ----------
    heatmap_layer : {"input", None}
        ``"input"``: the input's resolution; ``None``: the split layer's.
    scores : dict
        Mean insertion score (softmax probability of the predicted class, in ``[0, 1]``)
        per candidate, ``"layer"`` and ``"input"``; empty when nothing was scored.
    n_images : int
        References scored.
    reason : str
        How the choice was made.
    p_value : float or None
        One-sided Wilcoxon signed-rank p-value that the input's per-image scores are
        higher (None when nothing was scored).
    """

    heatmap_layer: str | None
    scores: dict[str, float] = field(default_factory=dict)
    n_images: int = 0
    reason: str = ""
    p_value: float | None = None


def _margin_function(forward_func: Callable, top: Tensor, runner_up: Tensor) -> Callable:
    """``x -> z_top(x) - z_runner_up(x)`` for a batch whose classes are fixed."""

    def margin(x: Tensor) -> Tensor:
        out = forward_func(x).reshape(x.shape[0], -1)
        rows = torch.arange(x.shape[0], device=out.device)
        return out[rows, top.to(out.device)] - out[rows, runner_up.to(out.device)]

    return margin


def margin_maps(
    forward_func: Callable,
    layer: nn.Module,
    images: Tensor,
    top: Tensor,
    runner_up: Tensor,
    attribute_to_layer_input: bool = False,
) -> tuple[Tensor, Tensor]:
    """Both candidate maps of the margin ``z_top - z_runner_up`` on each image.

    Parameters
    ----------
    forward_func : callable
        The model (``N x C x H x W`` to ``N x classes``).
    layer : nn.Module
        The split layer.
    images : Tensor
        ``N x C x H x W``.
    top, runner_up : Tensor
        ``N`` class indices.
    attribute_to_layer_input : bool
        Whether the split layer's features are its input.

    Returns
    -------
    tuple of Tensor
        ``N x 1 x h x w`` at the split layer (gradient times activation summed over the
        channels, as the elementwise rule) and ``N x 1 x H x W`` at the input (input
        times gradient summed over the colour channels); ReLU-ed, as the maps are. Both
        come from one forward and backward pass (what Captum's
        ``LayerGradientXActivation`` and ``InputXGradient`` give, in one pass).

    Raises
    ------
    TypeError
        When the split layer gives several tensors or not a tensor.
    ValueError
        When the split layer does not run exactly once per forward pass.
    """
    seen: list[Tensor] = []

    def keep(tensors: Any) -> Any:
        if isinstance(tensors, (tuple, list)) and len(tensors) != 1:
            raise TypeError("the split layer has several output tensors")
        t = tensors[0] if isinstance(tensors, (tuple, list)) else tensors
        if not isinstance(t, Tensor):
            raise TypeError(f"the split layer gives a {type(t).__name__}, not a tensor")
        seen.append(t)
        # what runs after the layer gets a copy, so that an in-place operation there
        # (a ReLU(inplace=True)) cannot change the tensor the gradient is taken at;
        # a one-tensor tuple (list) stays one
        copy = t.clone()
        if isinstance(tensors, (tuple, list)):
            return [copy] if isinstance(tensors, list) else (copy,)
        return copy

    if attribute_to_layer_input:
        handle = layer.register_forward_pre_hook(lambda module, args: keep(args))
    else:
        handle = layer.register_forward_hook(lambda module, inp, out: keep(out))
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():  # also under torch.no_grad()
        try:
            margin = _margin_function(forward_func, top, runner_up)(x)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ValueError("layer: expected the layer to run once per forward pass")
        act = seen[0]
        grad_x, grad_act = torch.autograd.grad(margin.sum(), (x, act))
    return (
        (grad_act * act).detach().sum(dim=1, keepdim=True).clamp_min(0),
        (grad_x * x).detach().sum(dim=1, keepdim=True).clamp_min(0),
    )


def insertion_scores(
    forward_func: Callable,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    shares: Sequence[float] = INSERTION_SHARES,
    baseline: float = 0.0,
    batch_size: int = 256,
) -> Tensor:
    """Softmax score of ``targets`` on the images with only the top ``shares`` of their
    pixels kept (by ``maps``, upsampled bilinearly), the rest set to ``baseline``.

    Parameters
    ----------
    forward_func : callable
        The model.
    images : Tensor
        ``N x C x H x W``.
    maps : Tensor
        ``N x 1 x h x w`` heat maps (any resolution).
    targets : Tensor
        ``N`` class indices.
    shares : sequence of float
        Shares of pixels kept, each in ``(0, 1]``.
    baseline : float
        Value of the removed pixels, in the model's input space.
    batch_size : int
        Images per forward pass.

    Returns
    -------
    Tensor
        ``N x len(shares)`` float64 probabilities.
    """
    size = tuple(images.shape[-2:])
    up = upsample(maps.detach().float().cpu(), size).to(images.device)
    masked = torch.cat([mask_images(images, up, s, baseline) for s in shares])
    scores = softmax_scores(forward_func, masked, targets.repeat(len(shares)), batch_size)
    return scores.reshape(len(shares), images.shape[0]).T


def choose_heatmap_layer(
    forward_func: Callable,
    layer: nn.Module,
    references: Tensor | None,
    attribute_to_layer_input: bool = False,
    n_images: int = 16,
    max_images: int = 64,
    shares: Sequence[float] = INSERTION_SHARES,
    baseline: float = 0.0,
    random_state: int = 0,
    device: torch.device | None = None,
    alpha: float = 0.05,
    progress: bool = False,
) -> ResolutionChoice:
    """Choose the resolution of ``heatmap_layer="auto"`` on the references (see the
    module's text). Each reference scored costs one forward pass, one forward and backward
    pass (both maps, :func:`margin_maps`) and ``2 * len(shares)`` forward passes
    (insertion); ``n_images`` to ``max_images`` of them, once per fitted explainer.

    Parameters
    ----------
    forward_func : callable
        The model.
    layer : nn.Module
        The split layer.
    references : Tensor, Dataset, DataLoader or None
        What ``fit`` was given (a sample is read by index; a DataLoader's dataset); None
        when it was not kept.
    attribute_to_layer_input : bool
        As fit used.
    n_images, max_images : int
        References scored at the first look, and at most: the sample doubles from
        ``n_images`` while neither map is clearly better, up to ``max_images`` (a random
        sample, ``random_state``: the first rows of one permutation).
    shares, baseline : sequence of float, float
        As in :func:`insertion_scores`.
    random_state : int
        Seed of the sample.
    device : torch.device, optional
        Where the model runs.
    alpha : float
        Level of the choice, split over the looks: at each look a one-sided Wilcoxon
        signed-rank test at ``alpha / looks`` decides for the input, another for the
        split layer.
    progress : bool
        Show a tqdm progress bar over the references scored (``fit``'s ``progress``
        when the choice runs for ``heatmap_layer="auto"``).

    Returns
    -------
    ResolutionChoice

    Raises
    ------
    ValueError
        When ``n_images`` or ``max_images`` is not a positive int, or
        ``max_images < n_images``.
    """
    n_images, max_images = check_int(n_images, "n_images"), check_int(max_images, "max_images")
    if max_images < n_images:
        raise ValueError(f"max_images must be >= n_images, got {max_images} < {n_images}")
    check_grad_mode('heatmap_layer="auto" (the choice on the references)')
    if not isinstance(references, (Tensor, Dataset, DataLoader)):
        return ResolutionChoice(
            None,
            reason="fit was not given one image tensor, Dataset or DataLoader it can read "
            "back (e.g. references appended to a store)",
        )
    source = references.dataset if isinstance(references, DataLoader) else references
    try:
        n = len(source)
    except TypeError:  # an iterable-style dataset: no random access
        return ResolutionChoice(None, reason="the references' dataset has no random access")
    pool = _rows_read(references, n)
    if pool is None:
        return ResolutionChoice(
            None, reason="the DataLoader's sampler reads rows of its dataset it cannot list"
        )
    if len(pool) < 2:
        return ResolutionChoice(None, reason="fewer than two references to compare on")
    gen = torch.Generator().manual_seed(random_state)
    order = pool[torch.randperm(len(pool), generator=gen)]
    cap = min(max_images, len(pool))
    looks = [min(n_images, cap)]  # 16, 32, 64 by default
    while looks[-1] < cap:
        looks.append(min(2 * looks[-1], cap))
    level = alpha / len(looks)
    per_image: dict[str, list[Tensor]] = {"layer": [], "input": []}
    done = 0
    chosen, verdict = None, "no clear difference: the split layer is kept"
    bar = tqdm(
        total=looks[0],  # raised to the next look's size only when that look is taken
        desc='heatmap_layer="auto": scoring both maps on references (once per fit)',
        unit="image",
        disable=not progress,
    )
    with bar, eval_mode(forward_func, layer, warn=True):
        for size in looks:
            try:
                images = reference_rows(references, order[done:size]).detach()
            except (TypeError, ValueError, RuntimeError) as exc:
                reason = f"the reference images could not be read ({exc})"
                return ResolutionChoice(None, reason=reason)
            if images.dim() != 4:
                reason = "the references are not one N x C x H x W batch"
                return ResolutionChoice(None, reason=reason)
            if not images.is_floating_point():
                reason = (
                    f"the references are {images.dtype} images, and the input's maps (input "
                    "times gradient) need floating-point inputs"
                )
                return ResolutionChoice(None, reason=reason)
            if device is not None:
                images = images.to(device)
            if bar.total != size:
                bar.total = size
                bar.refresh()
            failed = _score_both(
                forward_func, layer, images, attribute_to_layer_input, shares, baseline, per_image
            )
            if failed:
                return ResolutionChoice(None, reason=failed)
            bar.update(size - done)
            done = size
            at_input, at_layer = torch.cat(per_image["input"]), torch.cat(per_image["layer"])
            p_value = input_better_p_value(at_input, at_layer)
            if p_value < level:
                chosen, verdict = "input", "the input's maps score higher"
                if at_input.mean() <= at_layer.mean():  # the signed ranks, not the means
                    verdict += " on most references, though lower on average"
                break
            layer_p_value = input_better_p_value(at_layer, at_input)
            if layer_p_value < level:
                verdict = "the split layer's maps score higher"
                if at_layer.mean() <= at_input.mean():
                    verdict += " on most references, though lower on average"
                break
    # the smallest p the exact test can give, on the references whose scores differ
    differ = _untied_differences(at_input, at_layer).size
    if chosen is None and differ and 0.5**differ >= level:
        some = f" ({differ} of {done} score differently)" if differ < done else ""
        verdict = f"too few references to decide on{some}: the split layer is kept"
    elif chosen is None and layer_p_value >= level and at_layer.mean() > at_input.mean():
        # not "no difference" without a word: the kept layer scored higher, not clearly
        verdict = (
            "no clear difference at this level (the split layer's maps scored higher on "
            f"average, p = {layer_p_value:.2g} for them): the split layer is kept"
        )
    scores = {"layer": float(at_layer.mean()), "input": float(at_input.mean())}
    at = f"at each of {len(looks)} looks" if len(looks) > 1 else "at one look"
    return ResolutionChoice(
        chosen,
        scores,
        done,
        reason=f"insertion score on {done} references: {verdict} (one-sided Wilcoxon "
        f"p = {p_value:.2g} for the input; level {level:.2g} {at})",
        p_value=p_value,
    )


def _score_both(
    forward_func: Callable,
    layer: nn.Module,
    images: Tensor,
    attribute_to_layer_input: bool,
    shares: Sequence[float],
    baseline: float,
    per_image: dict[str, list[Tensor]],
) -> str:
    """Append the per-image insertion scores of both maps of ``images`` to ``per_image``;
    return why they could not be scored (empty when they were)."""
    with torch.no_grad():  # a model that fails here fails the same way in the call
        out = forward_func(images).reshape(images.shape[0], -1)
    if out.shape[1] < 2:
        return "the model has fewer than two outputs"
    top, runner_up = out.topk(2, dim=1).indices.unbind(1)
    try:
        with grad_mode_at(layer, attribute_to_layer_input) as grad_at_layer:
            at_layer, at_input = margin_maps(
                forward_func, layer, images, top, runner_up, attribute_to_layer_input
            )
        if at_layer.dim() != 4:
            return "the split layer has no spatial layout"
        for name, m in (("layer", at_layer), ("input", at_input)):
            scores = insertion_scores(forward_func, images, m, top, shares, baseline)
            if not bool(torch.isfinite(scores).all()):
                return "the model's scores on the masked references are not finite"
            per_image[name].append(scores.mean(1).cpu())
    except torch.OutOfMemoryError:
        raise  # not the model's nature: a choice kept for the whole fit must not hang on it
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        if grad_at_layer and not any(grad_at_layer):
            return (
                "the model runs the split layer with gradients off (torch.no_grad() in its "
                "forward; the regions use head=), so the input's maps (input times gradient "
                "through the model) cannot be drawn"
            )
        return f"the maps could not be scored ({exc})"
    return ""


def _rows_read(references: Tensor | Dataset | DataLoader, n: int) -> Tensor | None:
    """The rows of the dataset (of ``n``) that ``fit`` read: all of them, the indices of
    a DataLoader's ``SubsetRandomSampler`` or list sampler (its own, or that of the
    ``BatchSampler`` it was given as ``batch_sampler``; without the last partial
    batch under ``drop_last=True`` when the order is fixed), None when a sampler cannot
    say without drawing."""
    # batch_sampler None: no batching, one item per dataset row
    if not isinstance(references, DataLoader) or references.batch_sampler is None:
        return torch.arange(n)
    batches = references.batch_sampler  # also when given as batch_sampler=
    if not isinstance(batches, BatchSampler):
        return None
    sampler = batches.sampler
    if isinstance(sampler, SequentialSampler):
        m = min(n, len(sampler))
        return torch.arange(m - m % batches.batch_size if batches.drop_last else m)
    if batches.drop_last:
        return None  # which rows the dropped batch held depends on the draw
    if isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == n:
        return torch.arange(n)
    indices = getattr(sampler, "indices", sampler)  # SubsetRandomSampler, or a sequence
    if isinstance(indices, (Sequence, Tensor, np.ndarray)):
        return torch.as_tensor(list(indices), dtype=torch.long).unique()
    return None


#: Per-image differences of insertion scores (softmax probabilities) at most this large
#: count as ties: they are float noise, not evidence (a model whose logits are all about
#: 1e-13 scores 0.25 with every map, up to such differences).
SCORE_TIE = 1e-6


def input_better_p_value(at_input: Tensor, at_layer: Tensor) -> float:
    """One-sided p-value of the Wilcoxon signed-rank test that the input's per-image
    insertion scores are higher than the split layer's (paired; differences of at most
    :data:`SCORE_TIE` are ties and left out, as the test leaves out zeros; 1.0 when
    every pair is tied)."""
    from scipy.stats import wilcoxon

    # ties are left out before the call: with zeros in ``d``, scipy takes the normal
    # approximation, p = .023 for 4 of 4 (exact .0625)
    d = _untied_differences(at_input, at_layer)
    if d.size == 0:
        return 1.0
    return float(wilcoxon(d, alternative="greater").pvalue)


def _untied_differences(at_input: Tensor, at_layer: Tensor) -> np.ndarray:
    """The per-image differences ``at_input - at_layer`` that are not ties (larger than
    :data:`SCORE_TIE` in magnitude), float64."""
    d = (at_input.double() - at_layer.double()).cpu().numpy()
    return d[np.abs(d) > SCORE_TIE]
