"""Input formatting and validation shared by ``fit``, ``attribute`` and the readers.

Captum-style tuples of batch-first tensors, the per-example spec (shapes and dtypes) the
model ran on in ``fit``, the batches of a reference set (tensor, tuple, ``Dataset`` or
``DataLoader``), and the translation of a model failure on badly shaped or typed inputs
into a ``ValueError``/``TypeError`` that names the argument.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    SequentialSampler,
    default_collate,
)

from ._captum_compat import _format_tensor_into_tuples
from ._checks import check_int

__all__ = [
    "InputSpec",
    "check_model",
    "all_finite",
    "check_against_references",
    "check_inputs",
    "format_inputs",
    "input_spec",
    "is_compiled",
    "iter_reference_batches",
    "slice_args",
    "translate_forward_error",
    "uncompiled",
]


InputSpec = tuple[tuple[tuple[int, ...], torch.dtype], ...]
"""Per-example shape and dtype of each input tensor (what the model ran on in ``fit``)."""


def input_spec(inputs: Sequence[Tensor]) -> InputSpec:
    """Per-example shapes and dtypes of a tuple of batch-first tensors."""
    return tuple((tuple(t.shape[1:]), t.dtype) for t in inputs)


def _shapes(inputs: Sequence[Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in inputs)


def _spec_shapes(expected: InputSpec) -> str:
    return ", ".join(f"(N, {', '.join(map(str, s))}) {d}" for s, d in expected)


def check_against_references(
    inputs: Sequence[Tensor], expected: InputSpec | None, name: str = "inputs"
) -> None:
    """Catch a missing batch dimension (or a wrong number of tensors) before the model runs.

    Raises
    ------
    ValueError
        Naming ``name`` with the shape it got and the references' shape.
    """
    if expected is None:
        return
    if len(inputs) != len(expected):
        raise ValueError(
            f"{name}: got {len(inputs)} tensor(s), but the references had {len(expected)} "
            f"({_spec_shapes(expected)}); pass inputs in the same form as the references"
        )
    for t, (shape, _) in zip(inputs, expected):
        if t.dim() != len(shape) + 1:
            hint = (
                "; add the batch dimension first (x.unsqueeze(0) or x[None] for one image)"
                if t.dim() == len(shape)
                else ""
            )
            raise ValueError(
                f"{name}: got a tensor of shape {tuple(t.shape)}, but the references had "
                f"shape {_spec_shapes(expected)} ({len(shape) + 1}-D, batch first){hint}"
            )


def translate_forward_error(
    exc: BaseException, inputs: Sequence[Tensor], name: str, expected: InputSpec | None
) -> Exception | None:
    """A clear ValueError/TypeError for a model failure, or ``None`` to re-raise it as is.

    With ``expected`` (the references' per-example shapes and dtypes, on which the model
    ran): tensors shaped differently give a ValueError, of another dtype a TypeError, and a
    failure on tensors like the references is the model's own (``None``). Without
    ``expected`` (``fit``'s first batch): integer tensors give a TypeError asking for
    floats, anything else a ValueError describing the batch. A forward that does not
    take the positional arguments it got gives a TypeError naming
    ``additional_forward_args``. Out-of-memory errors are never translated.
    """
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return None
    said = f"forward_func raised {type(exc).__name__}: {exc}"
    if isinstance(exc, TypeError) and "positional argument" in str(exc):
        if len(inputs) > 1 and any(
            t.dim() == 1 and not t.is_floating_point() for t in inputs[1:]
        ):  # (images, labels) given as a tuple: a tuple means one tensor per model input
            return TypeError(
                f"{name}: a tuple of {len(inputs)} tensors is {len(inputs)} inputs of the "
                f"model (shapes {_shapes(inputs)}), and forward_func does not take them; "
                "if the 1-D integer tensor is labels, pass the images alone (labels are "
                "not used), or a Dataset/DataLoader of (image, label) items. "
                f"{said}"
            )
        return TypeError(
            f"additional_forward_args: forward_func was called with {name} and the "
            "additional_forward_args given, and does not take them; pass the extra "
            f"arguments its forward needs (as a tuple), or none. {said}"
        )
    if expected is not None:
        got = input_spec(inputs)
        if [s for s, _ in got] != [s for s, _ in expected]:
            return ValueError(
                f"{name}: the model failed on tensor(s) of shape {_shapes(inputs)}, but the "
                f"references had shape {_spec_shapes(expected)}; give {name} the references' "
                f"shape (channels, size). {said}"
            )
        if [d for _, d in got] != [d for _, d in expected]:
            return TypeError(
                f"{name}: the model failed on dtype {[str(d) for _, d in got]}, but the "
                f"references were {[str(d) for _, d in expected]}; convert {name} to the "
                f"references' dtype (integer images: x.float() / 255, or the scaling the "
                f"model was trained with). {said}"
            )
        return None
    if any(not (t.is_floating_point() or t.is_complex()) for t in inputs):
        return TypeError(
            f"{name}: the model failed on tensor(s) {_shapes(inputs)}; integer images are "
            "passed to the model unchanged, so convert them to floating point first "
            f"(x.float() / 255, or the scaling the model was trained with). {said}"
        )
    return ValueError(
        f"{name}: the model failed on a batch {_shapes(inputs)}; check that {name} have "
        f"the shape (channels, size) and dtype the model expects. {said}"
    )


def all_finite(t: Tensor, chunk_elements: int = 1 << 22) -> bool:
    """Whether every value of a float tensor is finite.

    First one sum: a NaN or an infinity anywhere makes it non-finite, so a finite sum
    settles it without any temporary. Only when the sum is not finite (a non-finite
    value, or finite values that overflow when added) are the values checked one by
    one, in row chunks of about ``chunk_elements`` values: ``torch.isfinite`` allocates
    temporaries as large as its input (an ``abs`` in the tensor's own dtype, then two
    bool masks), 1.7x a 360 MB feature matrix when run on all of it, and per-batch
    temporaries of that size fragment the heap.
    """
    if not t.is_floating_point() and not t.is_complex():
        return True
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    if t.dim() == 0:
        return False
    rows = max(1, chunk_elements // max(1, t[0].numel()))
    return all(bool(torch.isfinite(t[s : s + rows]).all()) for s in range(0, t.shape[0], rows))


def _first_element(item: Any) -> Any:
    """A Dataset item or DataLoader batch ``(inputs, label, ...)``: keep the inputs."""
    if isinstance(item, Tensor):
        return item
    if isinstance(item, (tuple, list)) and len(item) > 0:
        return item[0]
    if isinstance(item, dict):
        raise TypeError("references: dict batches are not supported; yield (inputs, ...) tuples")
    raise TypeError(f"references: cannot read inputs from a {type(item).__name__}")


def reads_in_order(loader: DataLoader) -> bool:
    """Whether ``loader`` reads its dataset's rows in order: its sampler (or that of the
    ``batch_sampler`` given in place of one) is a ``SequentialSampler``."""
    return isinstance(getattr(loader.batch_sampler, "sampler", loader.sampler), SequentialSampler)


def rows_read(references: Any, n: int | None) -> int | None:
    """How many references ``fit`` reads from ``references``, ``n`` the length of the
    tensor or dataset: fewer than ``n`` for a DataLoader whose sampler reads some rows
    or that drops its last partial batch (``drop_last=True``); None when unknown (a
    DataLoader without batching, or with a batch sampler that has no ``sampler``)."""
    if not isinstance(references, DataLoader) or n is None:
        return n
    batches = references.batch_sampler
    if not isinstance(batches, BatchSampler):
        return None
    try:
        m = len(batches.sampler)  # type: ignore[arg-type]
    except TypeError:
        return None
    return m - m % batches.batch_size if batches.drop_last else m


def reference_rows(references: Any, indices: Tensor, name: str = "references") -> Tensor:
    """Rows ``indices`` of a reference tensor, ``Dataset`` or ``DataLoader`` (of its
    dataset, by index), batched as ``fit`` read them: by the DataLoader's ``collate_fn``,
    a Dataset's items by PyTorch's default one (tensors, NumPy arrays, ``(inputs, ...)``).

    Raises
    ------
    TypeError, ValueError
        Naming ``name``: not one of those types, items that are not tensors, an index
        out of range.
    """
    collate = default_collate
    if isinstance(references, DataLoader):
        if references.batch_sampler is not None:  # else its items are batches already
            collate = references.collate_fn
        references = references.dataset
    if not isinstance(references, (Tensor, Dataset)):
        raise TypeError(
            f"{name} must be a Tensor, Dataset or DataLoader, got {type(references).__name__}"
        )
    n = len(references)  # type: ignore[arg-type]
    if len(indices) and int(indices.max()) >= n:
        raise ValueError(
            f"{name}: row #{int(indices.max())} asked for, but only {n} references were given"
        )
    if isinstance(references, Tensor):
        return references[indices]
    items = [references[int(i)] for i in [*indices.tolist(), 0]]  # 0: the shape if empty
    bad = f"{name}: Dataset items must be tensors, arrays or (tensor, ...) tuples"
    try:
        batch = _first_element(collate(items))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{bad} ({exc})") from exc
    if not isinstance(batch, Tensor):
        raise TypeError(bad)
    return batch[:-1]


def iter_reference_batches(
    references: Any,
    batch_size: int,
    additional_forward_args: tuple | None = None,
    name: str = "references",
) -> tuple[int | None, Iterator[tuple[tuple[Tensor, ...], tuple | None]]]:
    """Batches of reference inputs, as Captum-style tuples.

    Accepts a tensor, a tuple of tensors (one per model input), a ``Dataset`` whose items
    are tensors or ``(inputs, label, ...)`` tuples, or a ``DataLoader`` yielding such
    batches. Tensor entries of ``additional_forward_args`` whose first dimension equals
    the number of references are sliced with the batch; others are passed unchanged.

    Returns
    -------
    (n, iterator)
        The number of references when known in advance, and the batches.
    """
    batch_size = check_int(batch_size, "batch_size")
    if isinstance(references, (Tensor, tuple)):
        refs = _format_tensor_into_tuples(references)
        if len(refs) == 0 or not all(isinstance(t, Tensor) for t in refs):
            raise TypeError(f"{name}: expected a tensor or a tuple of tensors")
        if any(t.dim() == 0 for t in refs):
            raise ValueError(f"{name}: tensors need a batch dimension")
        n = refs[0].shape[0]
        if any(t.shape[0] != n for t in refs):
            raise ValueError(f"{name}: all tensors must have the same batch size")

        def gen_tensor() -> Iterator[tuple[tuple[Tensor, ...], tuple | None]]:
            for s in range(0, n, batch_size):
                yield (
                    tuple(t[s : s + batch_size] for t in refs),
                    slice_args(additional_forward_args, n, s, s + batch_size),
                )

        return n, gen_tensor()
    if isinstance(references, Dataset):
        # a generator of its own: iterating a DataLoader draws a base seed (for workers)
        # from its generator, by default the global one, which fit must not change
        loader: Any = DataLoader(
            references, batch_size=batch_size, shuffle=False, generator=torch.Generator()
        )
        n = len(references) if hasattr(references, "__len__") else None  # type: ignore[arg-type]
    elif isinstance(references, DataLoader):
        loader = references
        try:
            n = len(references.dataset)  # type: ignore[arg-type]
        except TypeError:
            n = None
    else:
        raise TypeError(
            f"{name} must be a Tensor, a tuple of Tensors, a torch Dataset or a "
            f"DataLoader, got {type(references).__name__}"
        )

    def gen_loader() -> Iterator[tuple[tuple[Tensor, ...], tuple | None]]:
        start = 0
        for batch in loader:
            inputs = _format_tensor_into_tuples(_first_element(batch))
            if not all(isinstance(t, Tensor) for t in inputs):
                raise TypeError("references: batches must hold tensors")
            b = inputs[0].shape[0]
            yield inputs, slice_args(additional_forward_args, n, start, start + b)
            start += b

    return n, gen_loader()


def per_example(args: tuple | None, n: int | None) -> list[int]:
    """Positions in ``args`` of the tensors with one row per example (first dimension
    ``n``): Captum's rule for extra arguments; the others are passed whole."""
    return [
        i
        for i, a in enumerate(args or ())
        if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n
    ]


def slice_args(args: tuple | None, n: int | None, start: int, stop: int) -> tuple | None:
    """Rows ``start:stop`` of the extra arguments with one row per example
    (:func:`per_example`); the others unchanged."""
    if args is None:
        return None
    rows = per_example(args, n)
    return tuple(a[start:stop] if i in rows else a for i, a in enumerate(args))


def expand_args(args: tuple | None, b: int) -> tuple | None:
    """The extra arguments of one example (as :func:`slice_args` cut them) for a batch of
    ``b`` points derived from it: tensors of one row repeated ``b`` times; others, the
    tensors passed whole, unchanged (Captum's expansion repeats every tensor, which turned
    a tensor shared by the batch, e.g. one value per class, into ``b`` copies of it)."""
    if args is None:
        return None
    return tuple(
        a.expand(b, *a.shape[1:]).contiguous()
        if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == 1
        else a
        for a in args
    )


def format_inputs(inputs: Any, name: str = "inputs") -> tuple[Tensor, ...]:
    """Captum's tuple format for a tensor or tuple of tensors, validated."""
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, tuple):
        hint = ""
        if isinstance(inputs, (Dataset, DataLoader)):
            hint = (
                " (a Dataset or DataLoader: stack the images to explain into a tensor; to "
                "test many images against a region, features, _ = ri.transform(data), "
                "then region.contains_features(features))"
            )
        raise TypeError(
            f"{name} must be a torch.Tensor or a tuple of tensors, got "
            f"{type(inputs).__name__}{hint}"
        )
    check_inputs(inputs, name)
    return inputs


def check_inputs(inputs: tuple[Tensor, ...], name: str = "inputs") -> None:
    """Validate a Captum-style tuple of input tensors (clear errors, no torch traces)."""
    if len(inputs) == 0:
        raise ValueError(f"{name}: expected at least one tensor")
    for t in inputs:
        if not isinstance(t, Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor or a tuple of tensors, got {type(t).__name__}"
            )
        if t.dim() == 0:
            raise ValueError(f"{name}: tensors need a batch dimension (got a 0-d tensor)")
        if t.is_meta:
            raise ValueError(
                f"{name}: a tensor on the meta device has a shape but no values; move it "
                "to the model's device with the values loaded (e.g. x.to('cpu') on real data)"
            )
        if t.is_floating_point() and not all_finite(t):
            raise ValueError(f"{name} contains NaN or inf values")
    n = inputs[0].shape[0]
    if any(t.shape[0] != n for t in inputs):
        raise ValueError(f"{name}: all tensors must have the same batch size")


def _optimized_module_type() -> type | None:
    frame = sys.modules.get("torch._dynamo.eval_frame")  # imported by torch.compile
    return getattr(frame, "OptimizedModule", None)


def is_compiled(module: Any) -> bool:
    """Whether ``module`` runs a ``torch.compile`` graph: an ``OptimizedModule``
    (``torch.compile(model)``) or a module compiled in place (``model.compile()``)."""
    optimized = _optimized_module_type()
    if optimized is not None and isinstance(module, optimized):
        return True
    return getattr(module, "_compiled_call_impl", None) is not None


def uncompiled(model: Any) -> Any:
    """The module that ``torch.compile(model)`` wrapped (``model`` itself otherwise).

    The package runs its models eagerly: a compiled graph skips the hooks registered on
    a layer after compiling, and the wrapper fires global hooks once more for itself
    (module names would start with ``_orig_mod.``). Both compute the same function.
    """
    optimized = _optimized_module_type()
    while optimized is not None and isinstance(model, optimized):
        model = model._orig_mod
    return model


def check_model(forward_func: Any, layer: Any, head: Any = None) -> None:
    """Check the explainer's constructor arguments.

    Raises
    ------
    TypeError
        ``forward_func`` or ``head`` not callable, ``layer`` not a module.
    ValueError
        ``layer`` not a submodule of ``forward_func`` (when that is a module).
    """
    if not callable(forward_func):
        raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
    if not isinstance(layer, nn.Module):
        raise TypeError(
            f"layer must be a torch.nn.Module, got {type(layer).__name__}; to choose one "
            "automatically use captum_repinterp.find_layer(model, example_input)"
        )
    if isinstance(forward_func, nn.Module) and not any(m is layer for m in forward_func.modules()):
        raise ValueError(
            "layer: the given module is not a submodule of forward_func; pass e.g. "
            "model.features[-1] of the same model instance"
        )
    if head is not None and not callable(head):
        raise TypeError(f"head must be callable or None, got {type(head).__name__}")
