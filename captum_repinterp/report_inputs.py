"""What ``captum-repinterp report`` is given: the model factory and data functions
(``"package.module:function"`` strings), resolved and checked before any work.

:func:`prepare_report` turns the command's arguments into :class:`ReportInputs` (the
model, its split layer and head, reference and held-out images as tensors, true labels,
classes and their names) for :func:`captum_repinterp.report.run_report`. Datasets and
DataLoaders (an ``ImageFolder``) are stacked into tensors: the report indexes its images,
so it holds them in memory. Bad arguments raise a ValueError or TypeError naming the
argument; the command line turns them into a usage error.
"""

from __future__ import annotations

import inspect
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_int, describe_value
from .features import eval_mode, model_device

__all__ = [
    "ReportInputs",
    "checked_labels",
    "folder_names",
    "load_callable",
    "prepare_report",
    "resolve_data",
    "resolve_model",
]


def load_callable(spec: str, name: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the function.

    The current directory is put on ``sys.path`` first, so a module next to the user's
    working directory is found. Resolution is :func:`pkgutil.resolve_name`.

    Raises
    ------
    ValueError
        Naming ``name`` when ``spec`` is malformed, cannot be imported or is not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"{name} must look like 'package.module:function', got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name = spec.split(":")[0]
    try:
        fn = pkgutil.resolve_name(spec)
    except ImportError as exc:
        raise ValueError(f"{name}: cannot import module {module_name!r}: {exc}") from exc
    except AttributeError:
        fn = None
    if not callable(fn):
        raise ValueError(f"{name}: {module_name!r} has no callable {spec.split(':')[1]!r}")
    return fn


def _call_without_arguments(spec: str, name: str) -> Any:
    """Load ``spec`` with :func:`load_callable` and call it with no arguments; a
    function that needs arguments is a ValueError naming ``name``."""
    fn = load_callable(spec, name)
    try:
        inspect.signature(fn).bind()
    except TypeError as exc:
        raise ValueError(f"{name}: {spec} must take no arguments ({exc})") from None
    except ValueError:  # no signature to check (some builtins)
        pass
    return fn()


def resolve_model(
    obj: Any, layer: str | None = None, references: Tensor | None = None
) -> tuple[nn.Module, nn.Module, Callable | None]:
    """``(model, layer, head)`` from what a model factory returned.

    Accepts ``model`` (then ``layer = model.features[-1]``), ``(model, layer)`` or
    ``(model, layer, head)``. Pick a layer with :func:`captum_repinterp.find_layer` when
    the model has no ``features``. A ``layer`` name (see :func:`prepare_report`)
    replaces the factory's layer; ``"auto"`` runs ``find_layer`` on ``references``.
    """
    head = split = None
    if isinstance(obj, (tuple, list)):
        if len(obj) not in (2, 3):
            raise ValueError(
                "model factory must return model, (model, layer) or (model, layer, head); "
                f"got a sequence of length {len(obj)}"
            )
        model, split = obj[0], obj[1]
        head = obj[2] if len(obj) == 3 else None
        if layer is not None and head is not None:
            raise ValueError(
                "layer: the model factory also returned a head, which belongs to its "
                "own layer; return model or (model, layer) to choose the layer here"
            )
    else:
        model = obj
        if not isinstance(model, nn.Module):
            raise TypeError(f"model factory must return an nn.Module, got {type(model).__name__}")
        if layer is None:
            features = getattr(model, "features", None)
            if not isinstance(features, nn.Sequential) or len(features) == 0:
                raise ValueError(
                    "model factory: the model has no non-empty nn.Sequential .features; "
                    "return (model, layer) to name the layer to interpret, or name it with "
                    "--layer (a module name, or 'auto' for find_layer)"
                )
            split = features[-1]
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory must return an nn.Module, got {type(model).__name__}")
    if layer is not None:
        split = _named_layer(model, layer, references)
    if not isinstance(split, nn.Module):
        raise TypeError(f"model factory: layer must be an nn.Module, got {type(split).__name__}")
    return model, split, head


def checked_labels(value: Any, images: Tensor, name: str) -> Tensor | None:
    """True labels of ``images`` as a tensor, checked (the report's and the command's check).

    Parameters
    ----------
    value : array-like of int, shape ``(N,)``, or None
        Class indices ``>= 0``, one per image.
    images : Tensor
        The images they label, ``N x ...``.
    name : str
        The argument's name in error messages (``reference_labels``, ``heldout_labels``).

    Returns
    -------
    Tensor or None
        ``torch.as_tensor(value)``, or None when ``value`` is None.

    Raises
    ------
    ValueError
        Naming ``data: <name>``: not ``N`` integer labels, or a negative label.
    """
    if value is None:
        return None
    try:
        labels = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):  # strings, objects, ragged lists
        raise ValueError(
            f"data: {name} must be {images.shape[0]} integer labels (class indices), got "
            f"{type(value).__name__} {str(value)[:60]}"
        ) from None
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise ValueError(
            f"data: {name} must be {images.shape[0]} integer labels, got shape "
            f"{tuple(labels.shape)} ({labels.dtype})"
        )
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(
            f"data: {name} must be class indices >= 0, got {int(labels.min())} (labels "
            "are compared with the model's predicted classes)"
        )
    return labels.long()


def resolve_data(obj: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(references, heldout, reference_labels, heldout_labels)`` from a data factory.

    Accepts ``(reference_images, heldout_images)`` or
    ``(reference_images, heldout_images, reference_labels, heldout_labels)`` (either
    label entry may be None). The images may be tensors, or Datasets / DataLoaders of
    images or ``(image, label, ...)`` items (an ``ImageFolder``), which are stacked into
    tensors (the report indexes its images, so it holds them in memory; a DataLoader
    that shuffles is read in its dataset's order, one with another random sampler is
    refused, and images of different sizes are a ValueError); the items'
    integer labels are the true labels unless labels are given (a held-out
    ``ImageFolder`` with fewer class folders than the references' has its labels
    renumbered to the reference folders' numbers, by folder name).
    """
    if not isinstance(obj, (tuple, list)) or len(obj) not in (2, 4):
        raise ValueError(
            "data must return (reference_images, heldout_images) or (reference_images, "
            "heldout_images, reference_labels, heldout_labels)"
        )
    (refs, item_ref_labels), (held, item_held_labels) = (
        _as_images(obj[0], "reference_images"),
        _as_images(obj[1], "heldout_images"),
    )
    for value, what in ((refs, "reference_images"), (held, "heldout_images")):
        if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[0] == 0:
            got = describe_value(value) if hasattr(value, "shape") else type(value).__name__
            hint = (
                " (torch.from_numpy(a) converts a NumPy array)"
                if hasattr(value, "__array__") and not isinstance(value, Tensor)
                else ""
            )
            raise TypeError(
                f"data: {what} must be a non-empty tensor of images (batch first), a "
                f"Dataset or a DataLoader of them; got {got}{hint}"
            )
    for value, what in ((refs, "reference_images"), (held, "heldout_images")):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            # found here, not as a traceback from fit
            raise ValueError(f"data: {what} contain NaN or inf values")
    if refs.shape[1:] != held.shape[1:]:
        raise ValueError(
            f"data: reference and held-out images differ in shape: {tuple(refs.shape[1:])} "
            f"vs {tuple(held.shape[1:])}"
        )
    if len(obj) == 2:
        obj = (*obj, item_ref_labels, _renumbered(item_held_labels, obj[1], obj[0]))
    return (
        refs,
        held,
        checked_labels(obj[2], refs, "reference_labels"),
        checked_labels(obj[3], held, "heldout_labels"),
    )


def folder_names(value: Any) -> list[str] | None:
    """The class names of an ``ImageFolder`` (its ``classes``), also behind a DataLoader
    or a ``Subset``; None when ``value`` has none."""
    for _ in range(3):  # DataLoader -> Subset -> ImageFolder
        names = getattr(value, "classes", None)
        if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
            return list(names)
        value = getattr(value, "dataset", None)
    return None


def _renumbered(labels: Tensor | None, heldout: Any, references: Any) -> Tensor | None:
    """Held-out item labels in the reference folders' numbers. An ``ImageFolder``
    numbers the folders it finds, so a held-out folder without one of the reference
    classes numbers the later ones differently; they are renumbered by folder name."""
    held_names, ref_names = folder_names(heldout), folder_names(references)
    if labels is None or held_names is None or ref_names is None or held_names == ref_names:
        return labels
    missing = [n for n in held_names if n not in ref_names]
    if missing:
        raise ValueError(
            f"data: heldout_images: its folders {missing} are not among the reference "
            f"folders {ref_names}, so its labels cannot be given the references' numbers; "
            "give both sets the same class folders, or give the labels"
        )
    index = torch.tensor([ref_names.index(n) for n in held_names])
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(index):
        return labels
    return index[labels]


_RESIZE = (
    "the report stacks them into one tensor: resize them to one size in the dataset's "
    "transform (e.g. torchvision's transforms.Resize((h, w)))"
)


def _in_dataset_order(loader: Any, what: str) -> Any:
    """``loader``, or when it shuffles (``shuffle=True``) a loader of the same dataset,
    batch size and collate function that reads it in order: the page numbers images
    by their place in the set (``#i``), which must be the dataset's index and the same
    on every run. Other random samplers (with replacement, a weighted or random subset)
    draw other images each time and are refused."""
    from torch.utils.data import DataLoader, RandomSampler

    sampler = loader.sampler
    if not _draws_at_random(loader):
        return loader
    if (
        type(sampler) is RandomSampler
        and not sampler.replacement
        and sampler.num_samples == len(loader.dataset)
        and loader.batch_size is not None
    ):
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )
    raise ValueError(
        f"data: {what} is a DataLoader with a random sampler ({type(sampler).__name__}): "
        "the report numbers images by their place in the set (#i), so it reads them in a "
        "fixed order; pass the Dataset (or a torch.utils.data.Subset of it), or a DataLoader "
        "with shuffle=False"
    )


def _draws_at_random(loader: Any) -> bool:
    """Whether ``loader`` reads its items in a random order (one of torch's random
    samplers, as its sampler or its batch sampler's)."""
    from torch.utils.data import RandomSampler, SubsetRandomSampler, WeightedRandomSampler

    random = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
    inner = getattr(loader.batch_sampler, "sampler", None)
    return isinstance(loader.sampler, random) or isinstance(inner, random)


def _as_images(value: Any, what: str) -> tuple[Any, Tensor | None]:
    """A Dataset or DataLoader of images (an ``ImageFolder``) as one tensor, and the
    integer labels its items carry (``(image, label)``), else None; anything else is
    returned as it is. The report indexes its images, so they are held in memory."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if not isinstance(value, (Dataset, DataLoader)):
        return value, None
    if isinstance(value, Dataset) and not hasattr(value, "__len__"):
        raise TypeError(f"data: {what} is a dataset without a length; pass a tensor")
    loader = value if isinstance(value, DataLoader) else DataLoader(value, batch_size=64)
    if loader.batch_size is None and loader.batch_sampler is None:
        # batch_size=None: items one by one, without a batch dimension; read in batches
        order = {} if isinstance(loader.dataset, IterableDataset) else {"sampler": loader.sampler}
        loader = DataLoader(loader.dataset, batch_size=64, num_workers=loader.num_workers, **order)
    loader = _in_dataset_order(loader, what)
    images, labels = [], []
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except RuntimeError as exc:  # default_collate stacking images of other sizes
            if "equal size" not in str(exc):
                raise
            raise ValueError(
                f"data: {what}: the images differ in size ({exc}); {_RESIZE}"
            ) from None
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(first, Tensor):
            raise TypeError(
                f"data: the items of {what} must be images or (image, label, ...) "
                f"tuples, got {type(first).__name__}"
            )
        if images and first.shape[1:] != images[0].shape[1:]:
            raise ValueError(
                f"data: {what}: the images differ in size ({tuple(images[0].shape[1:])} and "
                f"{tuple(first.shape[1:])} in different batches); {_RESIZE}"
            )
        images.append(first)
        second = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        if isinstance(second, Tensor) and second.dim() == 1 and not second.is_floating_point():
            labels.append(second)
    stacked = torch.cat(images) if images else torch.zeros(0)
    have_labels = labels and sum(len(t) for t in labels) == len(stacked)
    return stacked, torch.cat(labels) if have_labels else None


@dataclass
class ReportInputs:
    """Everything :func:`build_report` needs, resolved and checked."""

    model: nn.Module
    layer: nn.Module
    head: Callable | None
    references: Tensor
    heldout: Tensor
    reference_labels: Tensor | None
    heldout_labels: Tensor | None
    classes: list[int] | None
    title: str
    class_names: list[str] | None = None


def _predicted_classes(model: nn.Module, images: Tensor, batch_size: int = 512) -> set[int]:
    """The classes ``model`` predicts on ``images`` (run in eval mode; modes restored)."""
    device = model_device(model, model)
    batches = (images[s : s + batch_size] for s in range(0, len(images), batch_size))
    with eval_mode(model), torch.no_grad():
        return {
            int(c)
            for batch in batches
            for c in model(batch if device is None else batch.to(device)).argmax(1).unique()
        }


def _check_model_takes(model: nn.Module, references: Tensor, heldout: Tensor) -> None:
    """Run ``model`` on the first reference and the first held-out image (eval mode,
    modes restored): images of a dtype or shape it cannot take (integer images, another
    number of channels) are a ValueError/TypeError naming the data argument, found
    before any work rather than as a traceback from ``fit``."""
    from .inputs import translate_forward_error

    device = model_device(model, model)
    for images, what in ((references, "reference_images"), (heldout, "heldout_images")):
        one = images[:1] if device is None else images[:1].to(device)
        try:
            with eval_mode(model), torch.no_grad():
                model(one)
        except Exception as exc:  # noqa: BLE001 - translated, or raised as it was
            translated = translate_forward_error(exc, (one,), f"data: {what}", None)
            if translated is None:
                raise
            raise translated from exc


def _named_layer(model: nn.Module, name: str, references: Tensor) -> nn.Module:
    """The split layer the report's ``layer`` argument names (``"auto"``: find_layer)."""
    if name == "auto":
        from .layers import find_layer

        return find_layer(model, references[:4])
    try:
        if not name.strip():  # get_submodule("") is the model itself: no split at all
            raise AttributeError(name)
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise ValueError(
            f"layer: the model has no submodule {name!r} (a dotted name as in "
            f"model.named_modules(), e.g. 'layer4' or 'features.7', or 'auto'; its "
            f"children: {names[:12]})"
        ) from None


def _class_names(names: Sequence[str] | None, present: set[int]) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError("class_names must be a sequence of str (one name per class index)")
    if present and max(present) >= len(names):
        raise ValueError(
            f"class_names: {len(names)} names, but the model predicts class {max(present)} "
            "on the held-out images (one name per class index from 0)"
        )
    return list(names)


def prepare_report(
    model_factory: str | None = None,
    data: str | None = None,
    classes: Sequence[int] | None = None,
    random_state: int = 0,
    layer: str | None = None,
    class_names: Sequence[str] | None = None,
) -> ReportInputs:
    """Resolve the report's arguments: load model and data, check the classes.

    ``model_factory`` and ``data`` are ``"package.module:function"`` strings; give both
    or neither. Without them the demo (small CNN, MNIST-5k, see
    :func:`captum_repinterp.demo.mnist_setup`) audits ``classes`` (default ``0, 1, 2``
    to keep it fast).

    ``layer`` names the split layer in the factory's model (a dotted name as in
    ``model.named_modules()``, e.g. ``"layer3"``; ``"auto"`` runs
    :func:`captum_repinterp.find_layer` on the first references) and replaces the one the
    factory returned; a factory that also returned a head cannot be given one (the head
    belongs to its own layer). ``class_names`` gives one name per class index, shown next
    to the indices (the demo has its own).

    Raises
    ------
    ValueError, TypeError
        Naming the argument at fault (the CLI turns them into a usage error).
    """
    if (model_factory is None) != (data is None):
        raise ValueError("give both --model-factory and --data, or neither (the demo)")
    if model_factory is None and (layer is not None or class_names is not None):
        raise ValueError("--layer and --class-names apply to --model-factory's model, not the demo")
    if classes is not None:
        classes = [check_int(c, "classes", 0) for c in classes]
    if model_factory is None:
        from .demo import mnist_setup

        s = mnist_setup(random_state)
        inputs = ReportInputs(
            s.model,
            s.layer,
            s.head,
            s.references,
            s.heldout,
            s.reference_labels,
            s.heldout_labels,
            list(classes) if classes is not None else [0, 1, 2],
            "Audit report: small CNN on MNIST-5k",
            s.class_names,
        )
    else:
        built = _call_without_arguments(model_factory, "model_factory")
        raw = _call_without_arguments(data, "data")
        refs, held, ref_labels, held_labels = resolve_data(raw)
        if isinstance(built, nn.Module) or (
            isinstance(built, (tuple, list)) and built and isinstance(built[0], nn.Module)
        ):
            _check_model_takes(built if isinstance(built, nn.Module) else built[0], refs, held)
        model, split, head = resolve_model(built, layer, refs)
        ref_classes = _predicted_classes(model, refs)
        if len(ref_classes) < 2:  # fit's own check, found here as an argument error
            raise ValueError(
                f"data: reference_images: the model predicts a single class "
                f"({min(ref_classes)}) for every reference; representative interpretations "
                "need references of at least two predicted classes"
            )
        # an ImageFolder's folder names (replaced by class_names when given)
        names = folder_names(raw[0])
        inputs = ReportInputs(
            model,
            split,
            head,
            refs,
            held,
            ref_labels,
            held_labels,
            classes,
            f"Audit report: {model_factory}",
            None if names is None else list(names),
        )
    if inputs.classes is None and class_names is None:
        return inputs
    present = _predicted_classes(inputs.model, inputs.heldout)
    if class_names is not None:
        inputs.class_names = _class_names(class_names, present)
    if inputs.classes is not None:
        if not present.intersection(inputs.classes):
            raise ValueError(
                f"classes: none of {inputs.classes} is predicted on the held-out images "
                f"(predicted: {sorted(present)})"
            )
    return inputs
