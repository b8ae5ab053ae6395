"""Stage 1: layer features ``psi(x)`` and the head ``G: psi -> logits``.

The network is split at a layer. ``psi`` is that layer's output (or input) flattened to
``D`` numbers per example; the head maps ``psi`` back to the model's output, flattened to
``C`` numbers per example (the classes). Everything downstream (sampler, solver,
interpretation) sees only ``N x D`` feature matrices and a head callable.

The head is either given by the user (``head(layer_output) -> logits``) or derived from the
model: the model is run on the seed's input with the layer's output replaced, through a
forward hook, by the points where the head is evaluated. Hooks are removed in ``finally``
blocks, and the model's train/eval flags are restored by :func:`eval_mode`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ._captum_compat import (
    _expand_additional_forward_args,
    _format_additional_forward_args,
    _format_tensor_into_tuples,
)
from ._checks import check_int

__all__ = [
    "LayerLayout",
    "HookHead",
    "UserHead",
    "eval_mode",
    "forward_with_layer",
    "extract_features",
    "feature_batches",
    "iter_reference_batches",
    "model_device",
    "InputSpec",
    "input_spec",
    "check_against_references",
    "translate_forward_error",
]


@dataclass(frozen=True)
class LayerLayout:
    """Shapes of the tensors a layer produces, without the batch dimension.

    Parameters
    ----------
    shapes : tuple of tuple of int
        One shape per tensor the layer outputs (one entry for an ordinary layer).
    is_tuple : bool
        Whether the layer returns a tuple (or list) of tensors.
    """

    shapes: tuple[tuple[int, ...], ...]
    is_tuple: bool

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def dim(self) -> int:
        """Number of features ``D`` per example."""
        return sum(self.sizes)

    @classmethod
    def from_outputs(cls, outputs: tuple[Tensor, ...], is_tuple: bool) -> LayerLayout:
        return cls(tuple(tuple(t.shape[1:]) for t in outputs), is_tuple)

    def flatten(self, outputs: Sequence[Tensor]) -> Tensor:
        """Concatenate per-tensor outputs into a ``B x D`` matrix (a view of a single
        contiguous output: no copy)."""
        if len(outputs) == 1:
            return outputs[0].reshape(outputs[0].shape[0], -1)
        return torch.cat([t.reshape(t.shape[0], -1) for t in outputs], dim=1)

    def unflatten(self, psi: Tensor) -> tuple[Tensor, ...]:
        """Split a ``B x D`` matrix back into the layer's tensors."""
        parts = torch.split(psi, self.sizes, dim=1)
        return tuple(p.reshape(psi.shape[0], *s) for p, s in zip(parts, self.shapes))


@contextmanager
def eval_mode(*roots: Any) -> Iterator[bool]:
    """Put every ``nn.Module`` among ``roots`` in eval mode; restore each flag after.

    Yields whether any module was in training mode. Flags are restored module by module
    (not with ``.train()``, which would overwrite submodules set differently on purpose).
    """
    # only the modules in training mode are touched (setting an attribute on a module
    # goes through nn.Module.__setattr__, which is slow enough to matter per seed)
    saved: list[nn.Module] = []
    seen: set[int] = set()
    for root in roots:
        if isinstance(root, nn.Module):
            for m in root.modules():
                if m.training and id(m) not in seen:
                    seen.add(id(m))
                    saved.append(m)
    try:
        for m in saved:
            m.training = False
        yield bool(saved)
    finally:
        for m in saved:
            m.training = True


def model_device(forward_func: Callable, layer: nn.Module) -> torch.device | None:
    """Device of the model's parameters (``None`` when it has none to look at)."""
    for root in (forward_func, layer):
        if isinstance(root, nn.Module):
            for p in root.parameters():
                return p.device
            for b in root.buffers():
                return b.device
    return None


InputSpec = tuple[tuple[tuple[int, ...], torch.dtype], ...]
"""Per-example shape and dtype of each input tensor (what the model ran on in ``fit``)."""


def input_spec(inputs: Sequence[Tensor]) -> InputSpec:
    """Per-example shapes and dtypes of a tuple of batch-first tensors."""
    return tuple((tuple(t.shape[1:]), t.dtype) for t in inputs)


def _detached_copy(t: Any) -> Any:
    return t.detach().clone() if isinstance(t, Tensor) else t


class _ReusedCopies:
    """Copies of the layer's tensors into buffers kept from one batch to the next.

    Large per-batch temporaries leave glibc's heap a little more fragmented every batch
    (its aligned blocks do not always fit the holes the previous batch left): a fit of
    100k references grew the process by up to 0.9x the feature matrix in freed blocks
    it could not reuse. The copies are contiguous and the next batch overwrites them,
    so a consumer copies what it keeps before asking for the next batch.
    """

    def __init__(self) -> None:
        self.buffers: dict[int, Tensor] = {}
        self.position = 0

    def start_batch(self) -> None:
        self.position = 0

    def __call__(self, t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        key, self.position = self.position, self.position + 1
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype or buf.device != t.device:
            buf = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
            self.buffers[key] = buf
        out = buf[: t.numel()].view(t.shape)
        out.copy_(t.detach())
        return out


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
    floats, anything else a ValueError describing the batch. Out-of-memory errors are
    never translated.
    """
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return None
    said = f"forward_func raised {type(exc).__name__}: {exc}"
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


def forward_with_layer(
    forward_func: Callable,
    layer: nn.Module,
    inputs: tuple[Tensor, ...],
    additional_forward_args: tuple | None,
    attribute_to_layer_input: bool = False,
    replace: Tensor | None = None,
    layout: LayerLayout | None = None,
    name: str | None = None,
    expected: InputSpec | None = None,
    copy: Callable[[Any], Any] = _detached_copy,
) -> tuple[tuple[Tensor, ...], bool, Tensor]:
    """Run the model once with a hook on ``layer``.

    With ``name`` (``"inputs"`` or ``"references"``), an exception raised by the model is
    translated by :func:`translate_forward_error` into a ValueError/TypeError naming that
    argument (chained with ``from``) when the tensors differ from ``expected`` (the
    references' per-example shapes and dtypes) or, without ``expected``, always.

    Without ``replace`` the hook records copies of the layer's tensors, made by ``copy``
    (default: a detached clone). With ``replace``
    (``B x D``) the layer's tensors are replaced by ``layout.unflatten(replace)``, so the
    model's output is the head evaluated at those points; gradients flow back to
    ``replace``.

    Returns
    -------
    (layer_tensors, is_tuple, output)
        The layer's tensors (as seen, before replacement), whether the layer produced a
        tuple, and the model's output.
    """
    seen: list[tuple[tuple[Tensor, ...], bool]] = []

    def _as_tuple(value: Any) -> tuple[tuple[Tensor, ...], bool]:
        if isinstance(value, (tuple, list)):
            return tuple(value), True
        return (value,), False

    def _replacement(original: tuple[Tensor, ...], was_tuple: bool, kind: type) -> Any:
        assert layout is not None and replace is not None
        parts = tuple(p.clone() for p in layout.unflatten(replace))
        if len(parts) != len(original):
            raise ValueError(
                f"layer: expected {len(parts)} tensors at the layer, got {len(original)}"
            )
        if was_tuple:
            return kind(parts)
        return parts[0]

    own_errors: list[BaseException] = []

    def fwd_hook(module: nn.Module, inp: Any, out: Any) -> Any:
        tensors, was_tuple = _as_tuple(out)
        seen.append((tuple(copy(t) for t in tensors), was_tuple))
        if replace is not None:
            try:
                return _replacement(tensors, was_tuple, type(out))
            except Exception as exc:
                own_errors.append(exc)
                raise
        return None

    def pre_hook(module: nn.Module, args: tuple) -> Any:
        tensors, was_tuple = _as_tuple(args)
        # forward_pre_hook always receives a tuple of positional args
        was_tuple = len(tensors) > 1
        seen.append((tuple(copy(t) for t in tensors), was_tuple))
        if replace is not None:
            return tuple(p.clone() for p in layout.unflatten(replace))  # type: ignore[union-attr]
        return None

    if attribute_to_layer_input:
        handle = layer.register_forward_pre_hook(pre_hook)
    else:
        handle = layer.register_forward_hook(fwd_hook)
    try:
        args = inputs if additional_forward_args is None else (*inputs, *additional_forward_args)
        try:
            output = forward_func(*args)
        except Exception as exc:
            if name is None or any(exc is e for e in own_errors):
                raise
            translated = translate_forward_error(exc, inputs, name, expected)
            if translated is None:
                raise
            raise translated from exc
    finally:
        handle.remove()
    if not seen:
        raise ValueError(
            "layer: the given layer was not called during the forward pass; pass a module "
            "that is part of forward_func's computation"
        )
    if len(seen) > 1:
        raise ValueError(
            f"layer: the given layer is called {len(seen)} times in one forward pass; "
            "choose a module that is used once (e.g. a dedicated nn.ReLU instance)"
        )
    tensors, was_tuple = seen[0]
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"layer: the layer produced a {type(t).__name__}, not tensors")
    if not isinstance(output, Tensor):
        raise TypeError(
            f"forward_func must return a tensor of scores, got {type(output).__name__}"
        )
    return tensors, was_tuple, output


def _flatten_logits(output: Tensor, batch: int) -> Tensor:
    if output.dim() < 2 or output.shape[0] != batch:
        raise ValueError(
            "forward_func must return one row of class scores per example "
            f"(shape batch x classes), got shape {tuple(output.shape)} for batch {batch}"
        )
    return output.reshape(batch, -1)


class HookHead:
    """The head ``psi -> logits`` derived from the model by replacing the layer's output.

    The part of the model before the layer is run on ``inputs`` (one example); the
    layer's output is replaced by the batch of points. When the model uses its input
    again after the layer (a skip connection around the layer), the head is the one *at
    that input*, which is what the method needs for that seed.

    Speed: the part before the layer is run on the single example and only the layer's
    output carries the batch (the rest of the model broadcasts or never looks at the
    input again). Whether that gives the same logits as running the model on the
    example repeated ``B`` times is checked on the first call with ``B > 1``; if it does
    not (or fails), every call runs the repeated batch.
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        inputs: tuple[Tensor, ...],
        additional_forward_args: tuple | None,
        layout: LayerLayout,
        attribute_to_layer_input: bool = False,
    ) -> None:
        if any(t.shape[0] != 1 for t in inputs):
            raise ValueError("HookHead needs the inputs of exactly one example")
        self.forward_func = forward_func
        self.layer = layer
        self.inputs = inputs
        self.additional_forward_args = additional_forward_args
        self.layout = layout
        self.attribute_to_layer_input = attribute_to_layer_input
        self.broadcast: bool | None = None  # decided on the first call with B > 1

    def _run(self, psi: Tensor, repeat: bool, rows: int | None = None) -> Tensor:
        b = psi.shape[0]
        inputs, extra = self.inputs, self.additional_forward_args
        if repeat:
            inputs = tuple(t.expand(b, *t.shape[1:]).contiguous() for t in inputs)
            extra = _expand_additional_forward_args(extra, b)
        _, _, out = forward_with_layer(
            self.forward_func,
            self.layer,
            inputs,
            extra,
            self.attribute_to_layer_input,
            replace=psi,
            layout=self.layout,
        )
        return _flatten_logits(out, b if rows is None else rows)

    def __call__(self, psi: Tensor, rows: int | None = None) -> Tensor:
        """Logits ``B x C`` at features ``psi`` (``B x D``).

        ``rows``: the number of output rows to expect when it differs from ``B`` (a
        hook further down replaces a tensor by a batch, see ``ProjectedHead``).
        """
        if rows is not None:
            return self._run(psi, repeat=True, rows=rows)
        if psi.shape[0] == 1 or self.broadcast is False:
            return self._run(psi, repeat=True)
        if self.broadcast:
            return self._run(psi, repeat=False)
        full = self._run(psi, repeat=True)
        try:
            with torch.no_grad():
                fast = self._run(psi.detach(), repeat=False)
            self.broadcast = fast.shape == full.shape and torch.allclose(
                fast, full.detach(), rtol=1e-5, atol=1e-6
            )
        except (RuntimeError, ValueError):
            self.broadcast = False
        return full


class UserHead:
    """Wraps a user-given ``head(layer_output) -> logits`` to take ``B x D`` features."""

    def __init__(self, head: Callable, layout: LayerLayout) -> None:
        self.head = head
        self.layout = layout

    def __call__(self, psi: Tensor, rows: int | None = None) -> Tensor:
        """Logits ``B x C`` at features ``psi``; ``rows`` as in :class:`HookHead`."""
        parts = self.layout.unflatten(psi)
        out = self.head(parts if self.layout.is_tuple else parts[0])
        if not isinstance(out, Tensor):
            raise TypeError(f"head must return a tensor, got {type(out).__name__}")
        return _flatten_logits(out, psi.shape[0] if rows is None else rows)


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
        raise TypeError(
            "references: dict batches are not supported; yield (inputs, ...) tuples"
        )
    raise TypeError(f"references: cannot read inputs from a {type(item).__name__}")


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
    check_int(batch_size, "batch_size")
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
                    _slice_args(additional_forward_args, n, s, s + batch_size),
                )

        return n, gen_tensor()
    if isinstance(references, Dataset):
        loader: Any = DataLoader(references, batch_size=batch_size, shuffle=False)
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
            yield inputs, _slice_args(additional_forward_args, n, start, start + b)
            start += b

    return n, gen_loader()


def _slice_args(args: tuple | None, n: int | None, start: int, stop: int) -> tuple | None:
    if args is None:
        return None
    return tuple(
        a[start:stop] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n else a
        for a in args
    )


def format_inputs(inputs: Any, name: str = "inputs") -> tuple[Tensor, ...]:
    """Captum's tuple format for a tensor or tuple of tensors, validated."""
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, tuple):
        raise TypeError(
            f"{name} must be a torch.Tensor or a tuple of tensors, got {type(inputs).__name__}"
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
        if t.is_floating_point() and not all_finite(t):
            raise ValueError(f"{name} contains NaN or inf values")
    n = inputs[0].shape[0]
    if any(t.shape[0] != n for t in inputs):
        raise ValueError(f"{name}: all tensors must have the same batch size")


def feature_batches(
    forward_func: Callable,
    layer: nn.Module,
    references: Any,
    batch_size: int = 128,
    additional_forward_args: Any = None,
    attribute_to_layer_input: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
    name: str = "references",
    expected: InputSpec | None = None,
    info: dict | None = None,
    desc: str = "fit: reference features",
) -> tuple[int | None, Callable[[int], Iterator[tuple[Tensor, Tensor, LayerLayout]]]]:
    """The one batch loop over references: validate, run the model, read the layer.

    ``name`` is the argument named in errors; ``expected`` the per-example input shapes
    and dtypes to compare with when the model fails (default: the first batch's); when
    ``info`` is a dict, it receives the first batch's :func:`input_spec` and its first
    example (``"example"``, ``"example_args"``).

    Returns
    -------
    (n, run)
        The number of references when known in advance, and ``run(skip=0)``, which yields
        ``(rows, predictions, layout)`` per batch: the layer's features (``B x D``, on
        the model's device), the argmax of the model's flattened output (``B`` int64, CPU)
        and the layer's layout. The first ``skip`` references are passed over without
        running the model (to resume an interrupted fit). ``rows`` lives in a buffer
        that the next batch overwrites: copy what you keep before the next one.
    """
    extra = _format_additional_forward_args(additional_forward_args)
    n, batches = iter_reference_batches(references, batch_size, extra, name)
    total = None if n is None else math.ceil(n / batch_size)

    def run(skip: int = 0) -> Iterator[tuple[Tensor, Tensor, LayerLayout]]:
        spec_expected = expected
        layout: LayerLayout | None = None
        start = 0
        copies = _ReusedCopies()
        with torch.no_grad():
            for inputs, args in tqdm(batches, total=total, desc=desc, disable=not progress):
                b = int(inputs[0].shape[0])
                if info is not None and "input_spec" not in info and b > 0:
                    info["input_spec"] = input_spec(inputs)
                    first = tuple(t[:1] for t in inputs)
                    info["example"] = tuple(t.to(device) for t in first) if device else first
                    info["example_args"] = _slice_args(args, b, 0, 1)
                stop = start + b
                if stop <= skip:
                    start = stop
                    continue
                if start < skip:  # resume inside a batch
                    k = skip - start
                    inputs = tuple(t[k:] for t in inputs)
                    args = _slice_args(args, b, k, b)
                start = stop
                check_inputs(inputs, name)
                check_against_references(inputs, spec_expected, name)
                spec = input_spec(inputs)
                if device is not None:
                    inputs = tuple(t.to(device) for t in inputs)
                copies.start_batch()
                tensors, was_tuple, out = forward_with_layer(
                    forward_func,
                    layer,
                    inputs,
                    args,
                    attribute_to_layer_input,
                    name=name,
                    expected=spec_expected,
                    copy=copies,
                )
                if spec_expected is None:
                    spec_expected = spec
                this_layout = LayerLayout.from_outputs(tensors, was_tuple)
                if layout is None:
                    layout = this_layout
                elif this_layout != layout:
                    raise ValueError(
                        f"{name}: the layer's output shape changes between batches "
                        f"({layout.shapes} vs {this_layout.shapes}); use inputs of one size"
                    )
                rows = layout.flatten(tensors)
                yield rows, _flatten_logits(out, rows.shape[0]).argmax(dim=1).cpu(), layout

    return n, run


def extract_features(
    forward_func: Callable,
    layer: nn.Module,
    references: Any,
    batch_size: int = 128,
    additional_forward_args: Any = None,
    attribute_to_layer_input: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
    name: str = "references",
    expected: InputSpec | None = None,
    info: dict | None = None,
) -> tuple[Tensor, Tensor, LayerLayout]:
    """Layer features and predicted classes of every reference, in RAM.

    Arguments as in :func:`feature_batches`.

    Returns
    -------
    features : Tensor
        ``N x D`` float32 on the CPU.
    predictions : Tensor
        ``N`` int64: the argmax of the (flattened) model output.
    layout : LayerLayout
        Shapes of the layer's tensors.
    """
    n, run = feature_batches(
        forward_func,
        layer,
        references,
        batch_size,
        additional_forward_args,
        attribute_to_layer_input,
        device,
        progress,
        name,
        expected,
        info,
    )
    feats: list[Tensor] = []
    preds: list[Tensor] = []
    buffer: Tensor | None = None
    filled = 0
    layout: LayerLayout | None = None
    for rows, batch_preds, layout in run():
        b = rows.shape[0]
        if n is not None and filled + b <= n:
            # known size: write into one preallocated matrix (peak RAM ~ 1x features)
            if buffer is None:
                buffer = torch.empty(n, layout.dim, dtype=torch.float32)
            buffer[filled : filled + b] = rows
        else:
            if buffer is not None:  # more rows than announced: fall back to a list
                feats.append(buffer[:filled])
                buffer, n = None, None
            # a copy: ``rows`` is overwritten by the next batch
            feats.append(rows.to("cpu", torch.float32, copy=True))
        filled += b
        preds.append(batch_preds)
    if layout is None or filled == 0:
        raise ValueError(f"{name}: the reference set is empty (no examples)")
    features = buffer[:filled] if buffer is not None else torch.cat(feats)
    if not all_finite(features):
        warnings.warn(
            "fit: some reference features are NaN or inf; they are kept but can never "
            "be members of a region",
            RuntimeWarning,
            stacklevel=3,
        )
    return features, torch.cat(preds), layout
