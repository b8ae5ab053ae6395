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

__all__ = [
    "LayerLayout",
    "HookHead",
    "UserHead",
    "eval_mode",
    "forward_with_layer",
    "extract_features",
    "iter_reference_batches",
    "model_device",
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
        """Concatenate per-tensor outputs into a ``B x D`` matrix."""
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
    saved: list[tuple[nn.Module, bool]] = []
    seen: set[int] = set()
    for root in roots:
        if isinstance(root, nn.Module):
            for m in root.modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    saved.append((m, m.training))
    was_training = any(flag for _, flag in saved)
    try:
        for m, _ in saved:
            m.training = False
        yield was_training
    finally:
        for m, flag in saved:
            m.training = flag


def model_device(forward_func: Callable, layer: nn.Module) -> torch.device | None:
    """Device of the model's parameters (``None`` when it has none to look at)."""
    for root in (forward_func, layer):
        if isinstance(root, nn.Module):
            for p in root.parameters():
                return p.device
            for b in root.buffers():
                return b.device
    return None


def forward_with_layer(
    forward_func: Callable,
    layer: nn.Module,
    inputs: tuple[Tensor, ...],
    additional_forward_args: tuple | None,
    attribute_to_layer_input: bool = False,
    replace: Tensor | None = None,
    layout: LayerLayout | None = None,
) -> tuple[tuple[Tensor, ...], bool, Tensor]:
    """Run the model once with a hook on ``layer``.

    Without ``replace`` the hook records (clones of) the layer's tensors. With ``replace``
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

    def fwd_hook(module: nn.Module, inp: Any, out: Any) -> Any:
        tensors, was_tuple = _as_tuple(out)
        seen.append((tuple(t.detach().clone() for t in tensors), was_tuple))
        if replace is not None:
            return _replacement(tensors, was_tuple, type(out))
        return None

    def pre_hook(module: nn.Module, args: tuple) -> Any:
        tensors, was_tuple = _as_tuple(args)
        # forward_pre_hook always receives a tuple of positional args
        was_tuple = len(tensors) > 1
        seen.append((tuple(t.detach().clone() for t in tensors), was_tuple))
        if replace is not None:
            return tuple(p.clone() for p in layout.unflatten(replace))  # type: ignore[union-attr]
        return None

    if attribute_to_layer_input:
        handle = layer.register_forward_pre_hook(pre_hook)
    else:
        handle = layer.register_forward_hook(fwd_hook)
    try:
        args = inputs if additional_forward_args is None else (*inputs, *additional_forward_args)
        output = forward_func(*args)
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

    The part of the model before the layer is run on ``inputs`` (one example, expanded to
    the batch of points); the layer's output is replaced by the points. When the model
    uses its input again after the layer (a skip connection around the layer), the head
    is the one *at that input*, which is what the method needs for that seed.
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

    def __call__(self, psi: Tensor) -> Tensor:
        b = psi.shape[0]
        inputs = tuple(t.expand(b, *t.shape[1:]).contiguous() for t in self.inputs)
        extra = _expand_additional_forward_args(self.additional_forward_args, b)
        _, _, out = forward_with_layer(
            self.forward_func,
            self.layer,
            inputs,
            extra,
            self.attribute_to_layer_input,
            replace=psi,
            layout=self.layout,
        )
        return _flatten_logits(out, b)


class UserHead:
    """Wraps a user-given ``head(layer_output) -> logits`` to take ``B x D`` features."""

    def __init__(self, head: Callable, layout: LayerLayout) -> None:
        self.head = head
        self.layout = layout

    def __call__(self, psi: Tensor) -> Tensor:
        parts = self.layout.unflatten(psi)
        out = self.head(parts if self.layout.is_tuple else parts[0])
        if not isinstance(out, Tensor):
            raise TypeError(f"head must return a tensor, got {type(out).__name__}")
        return _flatten_logits(out, psi.shape[0])


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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(references, (Tensor, tuple)):
        refs = _format_tensor_into_tuples(references)
        if len(refs) == 0 or not all(isinstance(t, Tensor) for t in refs):
            raise TypeError("references: expected a tensor or a tuple of tensors")
        if any(t.dim() == 0 for t in refs):
            raise ValueError("references: tensors need a batch dimension")
        n = refs[0].shape[0]
        if any(t.shape[0] != n for t in refs):
            raise ValueError("references: all tensors must have the same batch size")

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
            "references must be a Tensor, a tuple of Tensors, a torch Dataset or a "
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
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf values")
    n = inputs[0].shape[0]
    if any(t.shape[0] != n for t in inputs):
        raise ValueError(f"{name}: all tensors must have the same batch size")


def extract_features(
    forward_func: Callable,
    layer: nn.Module,
    references: Any,
    batch_size: int = 128,
    additional_forward_args: Any = None,
    attribute_to_layer_input: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor, LayerLayout]:
    """Layer features and predicted classes of every reference.

    Returns
    -------
    features : Tensor
        ``N x D`` float32 on the CPU.
    predictions : Tensor
        ``N`` int64: the argmax of the (flattened) model output.
    layout : LayerLayout
        Shapes of the layer's tensors.
    """
    extra = _format_additional_forward_args(additional_forward_args)
    n, batches = iter_reference_batches(references, batch_size, extra)
    feats: list[Tensor] = []
    preds: list[Tensor] = []
    layout: LayerLayout | None = None
    total = None if n is None else math.ceil(n / batch_size)
    with torch.no_grad():
        for inputs, args in tqdm(
            batches, total=total, desc="fit: reference features", disable=not progress
        ):
            check_inputs(inputs, "references")
            if device is not None:
                inputs = tuple(t.to(device) for t in inputs)
            tensors, was_tuple, out = forward_with_layer(
                forward_func, layer, inputs, args, attribute_to_layer_input
            )
            b = inputs[0].shape[0]
            this_layout = LayerLayout.from_outputs(tensors, was_tuple)
            if layout is None:
                layout = this_layout
            elif this_layout != layout:
                raise ValueError(
                    "references: the layer's output shape changes between batches "
                    f"({layout.shapes} vs {this_layout.shapes}); use inputs of one size"
                )
            feats.append(layout.flatten(tensors).to("cpu", torch.float32))
            preds.append(_flatten_logits(out, b).argmax(dim=1).cpu())
    if layout is None or sum(f.shape[0] for f in feats) == 0:
        raise ValueError("references: the reference set is empty")
    features = torch.cat(feats)
    if not torch.isfinite(features).all():
        warnings.warn(
            "fit: some reference features are NaN or inf; they are kept but can never "
            "be members of a region",
            RuntimeWarning,
            stacklevel=3,
        )
    return features, torch.cat(preds), layout
