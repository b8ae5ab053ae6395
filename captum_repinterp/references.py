"""Stage 1 for the reference set: ``fit`` as one function that returns what it learned.

:func:`fit_references` runs the model once over the references (in RAM, or streamed into
an on-disk :class:`~captum_repinterp.store.ReferenceStore`) and returns a
:class:`FittedReferences`: the features ``psi(r)`` (``N x D`` float32), the predictions,
the layer's layout, the input spec the model ran on, the non-piecewise-linear operations of
the head, and the exact projection shortcut when the head starts with an affine map. The
per-seed stages read the reference set through it and nothing else.

The model's outputs on the references (their logits) come with the same pass: where the
head gives them at the references' features (checked on the first references), the
per-seed search takes them for the segments' ends instead of evaluating the head there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ._checks import check_choice
from .cuts import check_cut, cut_check_examples, warn_or_raise_not_cut
from .features import (
    LAYER_WITHOUT_GRADIENTS,
    Example,
    LayerLayout,
    caller_stacklevel,
    eval_mode,
    extract_features,
    forward_with_layer,
    grad_mode_at,
    model_device,
)
from .heads import make_head
from .inputs import InputSpec, all_finite, reads_in_order, reference_rows
from .projection import (
    AffineHead,
    LeadingMap,
    Projection,
    build_projection,
    close_logits,
    find_affine_head,
    find_leading_map,
    parameter_dtype,
)
from .store import OutputRecorder, ReferenceStore, fit_to_store, keep_logits
from .tracing import HeadScan, scan_after, scan_head

if TYPE_CHECKING:
    from .reader import LayerReader

__all__ = [
    "FittedReferences",
    "FittedState",
    "HeadStudy",
    "NotFittedError",
    "fit_references",
    "study_head",
]


@dataclass(frozen=True)
class FittedReferences:
    """What ``fit`` learned about the reference set.

    Attributes
    ----------
    features : Tensor
        ``N x D`` float32 on the CPU (memory-mapped with a store): ``psi(r)``.
    predictions : Tensor
        ``N`` int64: the model's predicted class of each reference.
    layout : LayerLayout
        Shapes of the layer's tensors.
    attribute_to_layer_input : bool
        Whether ``psi`` is the layer's input instead of its output.
    example : Example
        The first reference as the model ran on it (input spec, inputs, extra arguments).
    head_nonlinear : tuple of str
        Operations of the head that are not piecewise linear (empty when it is).
    head_output_op : str or None
        ``"softmax"`` or ``"sigmoid"`` when one produces the model's output (the
        boundaries' normals are then in probabilities), else None.
    projection : Projection or None
        The exact shortcut of :mod:`captum_repinterp.projection`, when the head starts
        with an affine map.
    store : ReferenceStore or None
        The on-disk store holding ``features`` and ``predictions``, if any.
    inputs : Tensor or None
        The reference images themselves when ``fit`` was given one tensor (a handle to
        it, not a copy; row ``i`` is reference ``i``), else None. Heat-map rules that
        score masked members of a region read them.
    leading : LeadingMap or None
        The head's first linear layer when an affine map of the features feeds it
        (boundaries are then sampled on its output, computed at the segments' ends).
    affine : AffineHead or None
        The head as an affine map when it is one (the boundaries are then exact).
    logits : Tensor or None
        ``N x C`` (float32, float64 for a float64 model; memory-mapped with a store): the
        model's outputs on the references, kept when they are small next to the features
        (see :func:`~captum_repinterp.store.keep_logits`) and the head gives them at the
        references' features (checked on the first references at fit); else None.
    source : Tensor, Dataset, DataLoader or None
        What ``fit`` was given (a handle, not a copy), when it was one image tensor, a
        ``Dataset`` or a ``DataLoader`` (not with ``append``): ``heatmap_layer="auto"``
        reads a sample of reference images from it.
    progress : bool
        ``fit``'s ``progress``: also shows the progress of the one-off
        ``heatmap_layer="auto"`` choice, which runs at the first map.
    """

    features: Tensor
    predictions: Tensor
    layout: LayerLayout
    attribute_to_layer_input: bool
    example: Example
    head_nonlinear: tuple[str, ...] = ()
    head_output_op: str | None = None
    projection: Projection | None = None
    store: ReferenceStore | None = None
    inputs: Tensor | None = field(default=None, repr=False, compare=False)
    leading: LeadingMap | None = None
    affine: AffineHead | None = None
    logits: Tensor | None = field(default=None, repr=False, compare=False)
    source: Any = field(default=None, repr=False, compare=False)
    progress: bool = field(default=False, repr=False, compare=False)

    @property
    def n(self) -> int:
        """Number of references ``N``."""
        return int(self.features.shape[0])

    @property
    def input_spec(self) -> InputSpec:
        """Per-example shapes and dtypes of the reference inputs."""
        return self.example.spec


def fit_references(
    forward_func: Callable,
    layer: nn.Module,
    references: Any,
    head: Callable | None = None,
    batch_size: int = 128,
    additional_forward_args: Any = None,
    attribute_to_layer_input: bool = False,
    progress: bool = True,
    store: str | os.PathLike | None = None,
    append: bool = False,
    cut_check: str = "raise",
) -> FittedReferences:
    """Features and predictions of the references, and what the head is like.

    Arguments as in :meth:`RepresentativeInterpretation.fit
    <captum_repinterp.attribution.RepresentativeInterpretation.fit>`.

    Returns
    -------
    FittedReferences

    Raises
    ------
    ValueError, TypeError
        Naming ``references`` (empty, badly shaped or typed, NaN inputs, a model failure
        on them) or ``store``; ``references`` also when the model predicts a single class
        for all of them.
    """
    if not isinstance(attribute_to_layer_input, bool):
        raise TypeError("attribute_to_layer_input must be a bool")
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be a path or None, got {type(store).__name__}")
    if not isinstance(append, bool):
        raise TypeError(f"append must be a bool, got {type(append).__name__}")
    if append and store is None:
        raise ValueError("append=True needs a store path (store=...)")
    check_choice(cut_check, "cut_check", ("raise", "warn", "off"))
    if (
        isinstance(references, DataLoader)
        and not isinstance(references.dataset, IterableDataset)  # read in its own order
        and not reads_in_order(references)
    ):
        warnings.warn(
            "references: the DataLoader does not read its dataset in order (shuffle=True "
            "or a sampler); member indices (similar, members) follow the order of this "
            "one pass, not the dataset's",
            UserWarning,
            stacklevel=3,
        )
    device = model_device(forward_func, layer)
    if device is not None and device.type == "meta":
        raise ValueError(
            "forward_func: the model's parameters are on the meta device (shapes without "
            "values); load its weights first (e.g. model.to_empty(device='cpu'), then "
            "load_state_dict)"
        )
    with eval_mode(forward_func, layer, head, warn=True):
        ref_store, start = None, 0
        if store is None:
            recorder = OutputRecorder(forward_func)
            features, predictions, layout, example = extract_features(
                recorder,
                layer,
                references,
                batch_size=batch_size,
                additional_forward_args=additional_forward_args,
                attribute_to_layer_input=attribute_to_layer_input,
                device=device,
                progress=progress,
            )
            logits = _recorded_logits(recorder, features.shape[0], layout.dim)
        else:
            ref_store, example, start, written = fit_to_store(
                forward_func,
                layer,
                references,
                store,
                append=append,
                batch_size=batch_size,
                additional_forward_args=additional_forward_args,
                attribute_to_layer_input=attribute_to_layer_input,
                device=device,
                progress=progress,
            )
            features, predictions = ref_store.features(), ref_store.predictions()
            logits = ref_store.logits()
            layout = ref_store.layout
        _warn_if_read_differently(references, example)
        if ref_store is None:  # a store's first rows are compared below
            _warn_if_batch_dependent(
                forward_func, layer, example, features, layout, attribute_to_layer_input
            )
        if ref_store is not None:  # with append, the rows written by this call
            _check_store_rows(
                forward_func, layer, example, features[start:], layout, store,
                attribute_to_layer_input, device, None if logits is None else logits[start:],
                just_written=written,
            )  # fmt: skip
        if head is None:
            _check_layer_gradients(forward_func, layer, example, attribute_to_layer_input)
        if not all_finite(features):
            warnings.warn(
                "fit: some reference features are NaN or inf; they are kept but can never "
                "be members of a region",
                RuntimeWarning,
                stacklevel=3,
            )
        if not bool((predictions != predictions[0]).any()):
            raise ValueError(
                "references: the model predicts a single class "
                f"({int(predictions[0])}) for every reference; representative "
                "interpretations need references of at least two predicted classes"
            )
        # with a store the projection is written next to the features, memory-mapped
        out_path = None if ref_store is None else ref_store.path / "projected.npy"
        study = study_head(
            forward_func, layer, head, layout, example, features, attribute_to_layer_input,
            device, cut_check, out_path, stacklevel=5, logits=logits,
        )  # fmt: skip
    # a tuple of one tensor is that tensor (Captum's form of a one-input model)
    single = isinstance(references, tuple) and len(references) == 1
    kept = references[0] if single else references
    return FittedReferences(
        features=features,
        predictions=predictions,
        layout=layout,
        attribute_to_layer_input=attribute_to_layer_input,
        example=example,
        head_nonlinear=study.nonlinear,
        head_output_op=study.output_op,
        projection=study.projection,
        store=ref_store,
        inputs=kept if isinstance(kept, Tensor) and not append else None,
        source=None if append or isinstance(kept, tuple) else kept,
        leading=study.leading,
        affine=study.affine,
        logits=study.logits,
        progress=progress,
    )


def _recorded_logits(recorder: OutputRecorder, n: int, dim: int) -> Tensor | None:
    """The outputs the recorder kept, ``n x C``, when there is one row per reference and
    :func:`~captum_repinterp.store.keep_logits` keeps them."""
    batches = recorder.batches
    recorder.batches = []
    if not batches or sum(b.shape[0] for b in batches) != n:
        return None
    if any(b.shape[1] != batches[0].shape[1] for b in batches):
        return None
    if not keep_logits(int(batches[0].shape[1]), dim):
        return None
    return torch.cat(batches)


def _checked_logits(
    seed_head: Callable, modules: Any, features: Tensor, logits: Tensor | None,
    device: torch.device | None,
) -> Tensor | None:  # fmt: skip
    """``logits`` when the head gives them at the features of the first (up to four)
    references, else None.

    The head is anchored at the first reference, so the other rows check that it does
    not depend on the example it runs on (a cut, or the user's ``head`` is the model's
    end): only then are the references' outputs the head's values at their features
    for every seed.
    """
    if logits is None or features.shape[0] == 0 or logits.shape[0] != features.shape[0]:
        return None
    dtype = torch.float32
    if isinstance(modules, nn.Module):
        dtype = parameter_dtype(modules) or dtype
    k = min(4, features.shape[0])
    try:
        with torch.no_grad():
            out = seed_head(features[:k].to(device or "cpu", dtype))
    except (RuntimeError, ValueError, TypeError):
        return None
    expected = logits[:k].to(torch.float64)
    return logits if close_logits(out.detach().to("cpu", torch.float64), expected) else None


def _warn_if_read_differently(references: Any, example: Example) -> None:
    """Warn when the first references, read again, are not the images ``fit`` read.

    A Dataset with random transforms (``RandomCrop``, ``RandomHorizontalFlip``) gives
    another image on each read: the features ``fit`` keeps are of one draw, while
    ``plot_region``, ``heatmap_layer="auto"`` and a reused store read the references
    again. Up to four rows are read again (no forward pass) when ``references`` is a
    Dataset, or a DataLoader that reads its dataset in order, of one image tensor; the
    global random number generators are left as they were.
    """
    if isinstance(references, DataLoader):
        if references.batch_sampler is None or not reads_in_order(references):
            return
        dataset = references.dataset
    else:
        dataset = references
    if not isinstance(dataset, Dataset) or isinstance(dataset, IterableDataset):
        return
    if len(example.batch) != 1:
        return
    first = example.batch[0].detach().cpu()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            again = reference_rows(references, torch.arange(first.shape[0]))
    except (TypeError, ValueError, RuntimeError):
        return
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    again = again.detach().cpu()
    if again.shape == first.shape and again.dtype == first.dtype:
        if not first.is_floating_point():
            if torch.equal(again, first):
                return
        elif torch.allclose(again, first, rtol=1e-5, atol=1e-6 * float(first.abs().max())):
            return
    warnings.warn(
        "references: reading the first references again gave other images than fit read "
        "(random transforms in the Dataset, such as RandomCrop or RandomHorizontalFlip?); "
        "the features are of the images fit read, while plot_region, "
        "heatmap_layer='auto' and a reused store read the references again and get "
        "others; give fit deterministic transforms (e.g. Resize and CenterCrop)",
        UserWarning,
        stacklevel=caller_stacklevel(),
    )


#: What the first reference's features differing alone and in a batch mean, and the way
#: out (said by fit's warning and by a store's error alike)
_BATCH_MIXING = (
    "the model mixes the examples of a batch before the layer (batch norm with batch "
    "statistics, such as BatchNorm2d(track_running_stats=False), which eval mode does not "
    "switch off)"
)
_BATCH_MIXING_FIX = "use running statistics, or fit(..., batch_size=1)"


def _rows_close(now: Tensor, kept: Tensor, dtype: torch.dtype) -> bool:
    """Recomputed features or outputs equal to the kept ones, to the model's rounding.

    The tolerance is relative to the rows' own scale (their largest finite magnitude):
    rounding grows with the values, so features of any size, ``1e-5`` as well as
    ``1e5``, are compared alike.
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo().eps
    rtol = max(1e-3, 16 * eps)
    both = torch.cat([now.reshape(-1), kept.reshape(-1)])
    finite = both[torch.isfinite(both)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    atol = rtol * scale + torch.finfo(torch.float32).tiny
    return torch.allclose(now, kept, rtol=rtol, atol=atol, equal_nan=True)


def _run_alone(
    forward_func: Callable,
    layer: nn.Module,
    example: Example,
    layout: LayerLayout,
    attribute_to_layer_input: bool,
) -> Tensor | None:
    """The first reference's features when it runs alone (``1 x D`` float32, CPU).

    Run twice: None when the two runs differ (a model with randomness in ``forward`` is
    left to the cut check) or the model fails on one example.
    """
    try:
        with torch.no_grad():
            runs = [
                layout.flatten(
                    forward_with_layer(
                        forward_func,
                        layer,
                        example.inputs,
                        example.additional_forward_args,
                        attribute_to_layer_input,
                    )[0]
                )
                .detach()
                .to("cpu", torch.float32)
                for _ in range(2)
            ]
    except (RuntimeError, ValueError, TypeError):
        return None
    if runs[0].shape != runs[1].shape or not torch.allclose(runs[0], runs[1]):
        return None
    return runs[0]


def _warn_if_batch_dependent(
    forward_func: Callable,
    layer: nn.Module,
    example: Example,
    features: Tensor,
    layout: LayerLayout,
    attribute_to_layer_input: bool,
) -> None:
    """Warn when the first reference's features depend on the batch it ran in.

    ``fit`` and ``transform`` run the model on batches, while the seeds, ``contains``
    and the maps read one image per forward pass. A model that mixes the examples of a
    batch before the layer (batch norm with batch statistics, e.g.
    ``BatchNorm2d(track_running_stats=False)``, which eval mode does not switch off)
    gives each reference features that depend on the batch size and on its neighbours,
    and unlike a seed's. The first reference is run alone (twice: a model whose runs
    differ, such as random augmentations inside ``forward``, is left to the cut check)
    and compared with its row of the first batch, when that batch had other rows
    (in-RAM fits: an on-disk store's first rows are recomputed in a batch of up to four
    and compared with the stored ones, which such a model fails).
    """
    if len(example.batch) == 0 or example.batch[0].shape[0] < 2 or features.shape[0] == 0:
        return
    kept = features[:1].float()
    alone = _run_alone(forward_func, layer, example, layout, attribute_to_layer_input)
    if alone is None or alone.shape != kept.shape:
        return
    if _rows_close(alone, kept, example.spec[0][1]):
        return
    gap = float((alone - kept).abs().max())
    warnings.warn(
        "fit: the first reference's features at the layer differ when it runs alone and "
        f"in its batch (largest difference {gap:.3g}): {_BATCH_MIXING}. The references' "
        "features and predictions then depend on batch_size, while seeds, contains and "
        f"the maps read one image at a time; {_BATCH_MIXING_FIX}",
        UserWarning,
        stacklevel=caller_stacklevel(),
    )


def _check_layer_gradients(
    forward_func: Callable, layer: nn.Module, example: Example, attribute_to_layer_input: bool
) -> None:
    """Refuse a model whose forward runs ``layer`` with gradients off (a frozen backbone
    under ``torch.no_grad()``): without ``head`` every seed needs the gradient there.

    ``fit`` reads the references without gradients, so one forward pass of the first
    reference with gradients on records whether they are still on at the layer; a model
    that fails on one example is left to the other checks.
    """
    try:
        with grad_mode_at(layer, attribute_to_layer_input) as states, torch.enable_grad():
            forward_func(*example.inputs, *(example.additional_forward_args or ()))
    except (RuntimeError, ValueError, TypeError):
        return
    if states and not any(states):
        raise ValueError(LAYER_WITHOUT_GRADIENTS)


def _not_reproducible(store: str | os.PathLike, what: str) -> str:
    """The error for rows that this fit wrote and could not reproduce."""
    return (
        f"store: the model's {what} on the first references just written differ when they "
        "run again (the model does not give the same values from one run to the next, "
        f"e.g. random operations in forward); {os.fspath(store)!r} now "
        "holds rows that seeds and maps cannot reproduce: make the model deterministic "
        "and fit to a new path"
    )


def _check_store_rows(
    forward_func: Callable,
    layer: nn.Module,
    example: Example,
    features: Tensor,
    layout: LayerLayout,
    store: str | os.PathLike,
    attribute_to_layer_input: bool,
    device: torch.device | None,
    logits: Tensor | None = None,
    just_written: bool = False,
) -> None:
    """Refuse a store whose first rows are not these references at this layer.

    With ``just_written`` (a new store, or ``fit(..., append=True)``), ``features`` and
    ``logits`` start at the rows this call wrote, so a difference means a model that
    mixes the batch or gives other values each run, not a stale store.

    A finished store is reused (and an interrupted one resumed) on its row count alone;
    recomputing the first few references catches another model, layer or reference set
    (stale features would otherwise be used silently); when the store keeps the
    references' logits, the model's outputs on them are compared too (a model changed
    after the layer would leave stale predictions and logits).
    """
    recorder = OutputRecorder(forward_func)
    rows, _, got_layout, _ = extract_features(
        recorder,
        layer,
        example.batch,
        batch_size=len(example.batch[0]),
        additional_forward_args=example.batch_args,
        attribute_to_layer_input=attribute_to_layer_input,
        device=device,
        progress=False,
    )
    k = min(rows.shape[0], features.shape[0])
    dtype = example.spec[0][1]

    def close(now: Tensor | None, kept: Tensor) -> bool:
        """Recomputed rows equal to the stored ones, to the model's rounding."""
        return now is not None and now.shape == kept.shape and _rows_close(now, kept, dtype)

    if not (got_layout == layout and (k == 0 or close(rows[:k], features[:k].float()))):
        alone = None
        if got_layout == layout and rows.shape[0] >= 2:
            alone = _run_alone(forward_func, layer, example, layout, attribute_to_layer_input)
        if alone is not None and alone.shape == rows[:1].shape and not close(alone, rows[:1]):
            raise ValueError(
                "store: the first reference's features at the layer differ when it runs "
                f"alone and in a batch: {_BATCH_MIXING}, so the stored features depend on "
                f"batch_size; {_BATCH_MIXING_FIX}"
            )
        if just_written:
            raise ValueError(_not_reproducible(store, "features at the layer"))
        raise ValueError(
            f"store: {os.fspath(store)!r} holds the features of other references, another "
            "model or another layer (its first rows differ from these references' "
            "features; a shuffled DataLoader also gives another order); use a new path"
        )
    outputs = recorder.batches[0] if recorder.batches else None
    if logits is not None and k:
        now = None if outputs is None else outputs[:k].to(torch.float64)
        if not close(now, logits[:k].to(torch.float64)):
            if just_written:
                raise ValueError(_not_reproducible(store, "outputs"))
            raise ValueError(
                f"store: {os.fspath(store)!r} holds the outputs of another model (its first "
                "rows' features match these references' but the model's outputs on them "
                "differ, so its predictions are stale); use a new path"
            )


@dataclass(frozen=True)
class HeadStudy:
    """What :func:`study_head` learned of the head from the first references.

    Attributes
    ----------
    nonlinear : tuple of str
        The head's operations that are not piecewise linear (empty when it is).
    projection, leading, affine : optional
        The exact shortcuts of :mod:`captum_repinterp.projection` that apply, else None.
    logits : Tensor or None
        The references' recorded outputs, ``N x C``, when the head reproduces them.
    output_op : str or None
        The softmax or sigmoid that produces the model's output, if any.
    """

    nonlinear: tuple[str, ...]
    projection: Projection | None
    leading: LeadingMap | None
    affine: AffineHead | None
    logits: Tensor | None
    output_op: str | None


def study_head(
    forward_func: Callable,
    layer: nn.Module,
    head: Callable | None,
    layout: LayerLayout,
    example: Example,
    features: Tensor,
    attribute_to_layer_input: bool,
    device: torch.device | None,
    cut_check: str = "raise",
    projection_path: str | os.PathLike | None = None,
    stacklevel: int = 4,
    logits: Tensor | None = None,
) -> HeadStudy:
    """What ``fit`` learns of the head from the first references (run in eval mode).

    The cut check on the first (up to four) references (``cut_check``: ``"raise"``,
    ``"warn"`` or ``"off"``), the head's non-piecewise-linear operations, the exact
    shortcuts of :mod:`captum_repinterp.projection` found on ``features`` (all the
    references' rows, or only the first ones when they live elsewhere), and whether the
    references' ``logits`` (the model's outputs, when recorded) are the head's values at
    their features; the projection of ``features`` is written to ``projection_path`` when
    given.

    Returns
    -------
    HeadStudy
        ``logits`` as given when the head reproduces them, else None.
    """
    seed_head = make_head(
        forward_func, layer, layout, head, example.inputs, example.additional_forward_args,
        attribute_to_layer_input,
    )  # fmt: skip
    if cut_check != "off":
        pairs, pair_args = cut_check_examples(*example.check_batch())
        check = check_cut(
            forward_func, layer, pairs, pair_args, attribute_to_layer_input, head=head
        )
        warn_or_raise_not_cut(check, error=cut_check == "raise", stacklevel=stacklevel)
    scan = _scan_head(
        forward_func, layer, head, example, features, layout, device, attribute_to_layer_input
    )
    modules = head if head is not None else forward_func
    projection = leading = affine = None
    if isinstance(modules, nn.Module):
        with eval_mode(modules):
            projection = build_projection(seed_head, modules, features, out_path=projection_path)
            leading = find_leading_map(seed_head, modules, features)
            affine = find_affine_head(seed_head, modules, features)
    logits = _checked_logits(seed_head, modules, features, logits, device)
    if affine is not None and not _affine_everywhere(
        affine, seed_head, modules, features, logits, device
    ):
        affine = None
    return HeadStudy(tuple(scan.nonlinear), projection, leading, affine, logits, scan.output_op)


def _affine_everywhere(
    affine: AffineHead,
    seed_head: Callable,
    modules: nn.Module,
    features: Tensor,
    logits: Tensor | None,
    device: torch.device | None,
    chunk: int = 256,
) -> bool:
    """Whether ``affine`` gives the head's logits at every reference's features.

    The affine test looks at a few references; a kink that only the others cross (a
    ReLU in the head that one class alone switches on) would let the exact boundaries
    misjudge those references. The references' recorded logits are compared when they
    are the head's values (no extra pass), else the head runs on the feature rows at
    hand, ``chunk`` rows at a time.
    """
    dtype = parameter_dtype(modules)
    for start in range(0, features.shape[0], chunk):
        rows = features[start : start + chunk]
        if logits is not None:
            expected = logits[start : start + chunk].to(torch.float64)
        else:
            try:
                with torch.no_grad():
                    out = seed_head(rows.to(device or "cpu", dtype))
            except (RuntimeError, ValueError, TypeError):
                return False
            expected = out.detach().to("cpu", torch.float64)
        if not affine.matches(rows, expected):
            return False
    return True


def _scan_head(
    forward_func: Callable,
    layer: nn.Module,
    head: Callable | None,
    example: Example,
    features: Tensor,
    layout: LayerLayout,
    device: torch.device | None,
    attribute_to_layer_input: bool,
) -> HeadScan:
    """Non-piecewise-linear operations of the head, traced on the first reference, and
    the softmax or sigmoid producing the output."""
    if head is None:
        return scan_after(
            forward_func,
            layer,
            example.inputs,
            example.additional_forward_args,
            attribute_to_layer_input,
        )
    dtype = example.spec[0][1]
    if not dtype.is_floating_point:
        dtype = torch.float32
    parts = layout.unflatten(features[:1].to(device or "cpu", dtype))
    return scan_head(head, parts if layout.is_tuple else parts[0])


class NotFittedError(RuntimeError, AttributeError):
    """Raised when a fitted attribute or method is used before ``fit``."""


def _fitted(name: str, doc: str) -> property:
    def setter(self: FittedState, value: Any) -> None:
        self._references = dataclasses.replace(self.references_, **{name: value})

    return property(lambda self: getattr(self.references_, name), setter, doc=doc)


class FittedState:
    """The fitted attributes of an explainer, in scikit-learn's style (names ending in
    ``_``), read from the :class:`FittedReferences` that ``fit`` stores as
    ``_references`` (and the reader as ``_reader``)."""

    @property
    def references_(self) -> FittedReferences:
        """What :meth:`fit` learned (:class:`~captum_repinterp.references.FittedReferences`).

        Raises
        ------
        NotFittedError
            Before :meth:`fit`.
        """
        fitted = self.__dict__.get("_references")
        if fitted is None:
            raise NotFittedError(
                "This RepresentativeInterpretation is not fitted yet: call "
                "fit(reference_images) before attribute() or interpret()"
            )
        return fitted

    def _watching(self) -> contextlib.AbstractContextManager[None]:
        """Refuse a model changed after :meth:`fit` on entry (see
        :mod:`captum_repinterp.model_watch`), re-stamp it on exit."""
        watch = self.__dict__.get("_watch")
        return contextlib.nullcontext() if watch is None else watch.watching()

    def _check_model(self) -> None:
        """Refuse a model changed after :meth:`fit` (see :meth:`_watching`)."""
        watch = self.__dict__.get("_watch")
        if watch is not None:
            watch.check()

    @property
    def reader_(self) -> LayerReader:
        """Reads the split layer on new inputs (:class:`~captum_repinterp.reader.LayerReader`)."""
        return self.references_ and self.__dict__["_reader"]

    @property
    def heatmap_resolution_(self) -> Any:
        """Where ``heatmap_layer="auto"`` draws the maps
        (:class:`~captum_repinterp.resolution.ResolutionChoice`): chosen on the
        references on first use after :meth:`fit`, then kept.

        Raises
        ------
        NotFittedError
            Before :meth:`fit`.
        """
        from .resolution import ResolutionChoice, choose_heatmap_layer

        fitted = self.references_
        cached = self.__dict__.get("_resolution")
        if cached is not None and cached[0] is fitted:
            return cached[1]
        reader = self.reader_
        example = getattr(fitted, "example", None)
        if example is not None and example.additional_forward_args is not None:
            choice = ResolutionChoice(None, reason="the model takes additional_forward_args")
        else:
            choice = choose_heatmap_layer(
                reader.forward_func,
                reader.layer,
                getattr(fitted, "source", None),
                reader.attribute_to_layer_input,
                device=reader.device,
                progress=bool(getattr(fitted, "progress", False)),
            )
        if not choice.scores:
            warnings.warn(
                f'heatmap_layer="auto" draws the maps at the split layer: {choice.reason}; '
                'pass heatmap_layer=None (or "input") to choose yourself',
                UserWarning,
                stacklevel=caller_stacklevel(),
            )
        self.__dict__["_resolution"] = (fitted, choice)
        return choice

    features_ = _fitted("features", "``N x D`` float32 reference features (CPU).")
    predictions_ = _fitted("predictions", "``N`` int64 predicted classes of the references.")
    layout_ = _fitted("layout", "Shapes of the layer's tensors.")
    n_references_ = _fitted("n", "Number of references ``N``.")
    input_spec_ = _fitted("input_spec", "Per-example shapes and dtypes of the references.")
    head_nonlinear_ = _fitted("head_nonlinear", "Non-piecewise-linear operations of the head.")
    projection_ = _fitted("projection", "The exact projection shortcut, or None.")
    affine_ = _fitted(
        "affine",
        "The head as an affine map when it is affine at every reference (regions are then "
        "exact, built from its class boundaries, not sampled), else None.",
    )
    store_ = _fitted("store", "The on-disk reference store, or None.")
    attribute_to_layer_input_ = _fitted("attribute_to_layer_input", "As given to ``fit``.")
