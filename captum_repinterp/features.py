"""Stage 1: layer features ``psi(x)`` of a batch of inputs.

The network is split at a layer. ``psi`` is that layer's output (or input) flattened to
``D`` numbers per example (:class:`LayerLayout`); everything downstream (sampler, solver,
interpretation) sees only ``N x D`` feature matrices and a head callable (see
:mod:`captum_repinterp.heads`). :func:`forward_with_layer` runs the model once with a hook
on the layer, removed in a ``finally`` block; :func:`eval_mode` puts the model in eval mode
for a call and restores every module's flag; :func:`feature_batches` is the one batch loop
over a reference set.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import captum
import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ._captum_compat import _format_additional_forward_args
from ._checks import check_finite_outputs
from .inputs import (
    InputSpec,
    check_against_references,
    check_inputs,
    input_spec,
    is_compiled,
    iter_reference_batches,
    per_example,
    slice_args,
    translate_forward_error,
)

__all__ = [
    "Example",
    "LayerLayout",
    "caller_stacklevel",
    "eval_mode",
    "extract_features",
    "feature_batches",
    "flatten_logits",
    "forward_with_layer",
    "model_device",
    "module_name",
    "not_scores",
    "warn_training",
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
            return outputs[0].reshape(outputs[0].shape[0], math.prod(outputs[0].shape[1:]))
        return torch.cat([t.reshape(t.shape[0], math.prod(t.shape[1:])) for t in outputs], dim=1)

    def unflatten(self, psi: Tensor) -> tuple[Tensor, ...]:
        """Split a ``B x D`` matrix back into the layer's tensors."""
        parts = torch.split(psi, self.sizes, dim=1)
        return tuple(p.reshape(psi.shape[0], *s) for p, s in zip(parts, self.shapes))

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable description (see :meth:`from_json`)."""
        return {"shapes": [list(s) for s in self.shapes], "is_tuple": bool(self.is_tuple)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LayerLayout:
        """The layout :meth:`to_json` described."""
        return cls(tuple(tuple(int(v) for v in s) for s in obj["shapes"]), bool(obj["is_tuple"]))


@contextmanager
def eval_mode(*roots: Any, warn: bool = False) -> Iterator[bool]:
    """Run the enclosed calls in eval mode; restore every module's flag after.

    Every ``nn.Module`` among ``roots`` (and its submodules) is put in eval mode. When a
    root is a plain callable (a function or lambda around a model), the modules it runs
    cannot be listed in advance: a global forward pre-hook puts each module in eval mode
    right before it runs, for the duration of the block, so batch-norm statistics never
    change and dropout is off. Flags are restored module by module (not with
    ``.train()``, which would overwrite submodules set differently on purpose). Autocast
    is off inside the block (the model runs in its own dtypes, as it did in ``fit``). A
    compiled module (:func:`is_compiled`) runs eagerly inside the block: its compiled
    graph would skip the hooks the package registers on its layers.

    Parameters
    ----------
    *roots : nn.Module or callable
        The model(s), layer(s) and head(s) the block runs.
    warn : bool
        Give the training-mode warning (:func:`warn_training`) when a module had to be
        switched.

    Yields
    ------
    bool
        Whether any module among the module roots was in training mode.
    """
    # only the modules in training mode are touched (setting an attribute on a module
    # goes through nn.Module.__setattr__, which is slow enough to matter per seed)
    saved: list[nn.Module] = []
    seen: set[int] = set()
    compiled = False
    for root in roots:
        if isinstance(root, nn.Module):
            for m in root.modules():
                compiled = compiled or is_compiled(m)
                if m.training and id(m) not in seen:
                    seen.add(id(m))
                    saved.append(m)
    switched: list[nn.Module] = []

    def to_eval(module: nn.Module, args: Any) -> None:
        if module.training:
            module.training = False
            switched.append(module)

    plain = any(callable(r) and not isinstance(r, nn.Module) for r in roots)
    handle = register_module_forward_pre_hook(to_eval) if plain else None
    # a compiled graph runs without the hooks registered after compiling: run eagerly
    # (torch.compiler.set_stance came with torch 2.6)
    stance = getattr(torch.compiler, "set_stance", None)
    eager = stance("force_eager") if compiled and stance else contextlib.nullcontext()
    where = _training_part(roots, saved) if warn else None  # before switching
    try:
        for m in saved:
            m.training = False
        if warn and _behaves_differently(saved):
            warn_training(where=where)
        with eager, _no_autocast():
            yield bool(saved)
    finally:
        if handle is not None:
            handle.remove()
        for m in (*saved, *switched):
            m.training = True
    if warn and _behaves_differently(switched) and not _behaves_differently(saved):
        warn_training()


def in_eval_mode(
    roots_of: Callable[..., Iterable[Any]],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: run the function with the modules ``roots_of(*args, **kwargs)`` names
    (None entries skipped) in eval mode, for an entry point that runs many stages: one
    training-mode warning per call, pointing at the caller (the stages then find the
    model in eval mode), every module's mode restored after."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            roots = [r for r in roots_of(*args, **kwargs) if r is not None]
            with eval_mode(*roots, warn=True):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def _behaves_differently(modules: list[nn.Module]) -> bool:
    """Whether a module among ``modules`` (found in training mode) may compute otherwise
    in eval mode: any but the plain containers, whose forward never reads the flag. A
    slice ``model.head[:-1]`` or an ``nn.DataParallel`` wrapper is a new container in
    training mode around modules in eval mode, and gave a training-mode warning
    although nothing changed."""
    return any(not _plain_container(m) for m in modules)


def _plain_container(module: nn.Module) -> bool:
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return True
    for kind in (nn.Sequential, nn.DataParallel):
        if isinstance(module, kind) and type(module).forward is kind.forward:
            return True
    return False


@contextmanager
def grad_mode_at(layer: nn.Module, at_input: bool = False) -> Iterator[list[bool]]:
    """Record, each time ``layer`` runs inside the block, whether gradients are on there
    (``torch.is_grad_enabled()`` at its input or output): all False for a model whose
    forward runs the layer under ``torch.no_grad()``. The hook is removed on leaving."""
    states: list[bool] = []

    def record(*_: Any) -> None:
        states.append(torch.is_grad_enabled())

    if at_input:
        handle = layer.register_forward_pre_hook(record)
    else:
        handle = layer.register_forward_hook(record)
    try:
        yield states
    finally:
        handle.remove()


#: The error for a model whose forward runs the layer with gradients off.
LAYER_WITHOUT_GRADIENTS = (
    "layer: forward_func runs the layer with gradients off (torch.no_grad() or "
    "torch.inference_mode() around it inside the model's forward, as for a frozen "
    "backbone), so the head's gradient at the layer, which the boundary search and the "
    "maps need, cannot be taken; split at a layer that runs with gradients on, or pass "
    "head= (the part of the model after the layer, as a callable) to "
    "RepresentativeInterpretation"
)

#: Device types whose autocast :func:`_no_autocast` switches off for a call.
_AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu")


def _no_autocast() -> contextlib.ExitStack:
    """A block with autocast off on every device type where the caller switched it on.

    Under ``torch.autocast`` the model would run in bfloat16 / float16, not in the
    dtypes it was fitted in: the boundary search (bisection to ``2 ** -20``), the
    memberships and the maps would silently differ from those of the same call outside
    the block. The caller's autocast state is restored on leaving.
    """
    stack = contextlib.ExitStack()
    for device_type in _AUTOCAST_DEVICES:
        try:
            enabled = torch.is_autocast_enabled(device_type)
        except RuntimeError:  # a device type this build of torch does not know
            continue
        if enabled:
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


#: Frames a warning should not point at: this package's, and the context managers and
#: Captum's usage-logging wrapper between it and the user's call.
_NOT_THE_CALLER = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep
    for m in (captum, sys.modules[__package__])
) + (os.path.abspath(contextlib.__file__),)


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the caller of this function that
    makes the warning point at the first frame outside this package (the user's line),
    however deep in the package the warning is given."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _NOT_THE_CALLER
    ):
        frame, level = frame.f_back, level + 1
    return level


def _training_part(roots: tuple[Any, ...], saved: list[nn.Module]) -> str | None:
    """Which part of the model was in training mode, for the warning: None for the whole
    model, else the qualified names of the outermost modules in training mode (up to 3)."""
    model = next((r for r in roots if isinstance(r, nn.Module)), None)
    if model is None or model.training or not saved:
        return None
    training = {id(m) for m in saved}
    names = []
    for name, module in model.named_modules():  # parents come before their children
        if id(module) in training and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    if not names:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"modules of the model are in training mode ({shown})"


def warn_training(stacklevel: int | None = None, where: str | None = None) -> None:
    """The warning given when a call finds the model in training mode (pointing at the
    user's call unless ``stacklevel`` is given); ``where`` names the part of the model
    in training mode when it is not the whole model."""
    warnings.warn(
        f"{where or 'the model is in training mode'}; RepresentativeInterpretation runs "
        "every module it calls in eval mode for the duration of the call (dropout off, batch-norm "
        "running statistics, which are never updated) and restores each module's mode "
        "afterwards",
        UserWarning,
        stacklevel=caller_stacklevel() if stacklevel is None else stacklevel,
    )


def model_device(forward_func: Callable, layer: nn.Module) -> torch.device | None:
    """Device of the model's parameters (``None`` when it has none to look at)."""
    for root in (forward_func, layer):
        if isinstance(root, nn.Module):
            for p in root.parameters():
                return p.device
            for b in root.buffers():
                return b.device
    return None


def module_name(model: Any, module: Any) -> str | None:
    """``module``'s qualified name in ``model`` (``"layer4"``, ``"features.7"``; ``""``
    for ``model`` itself), or None when ``model`` is no ``nn.Module`` or does not hold
    it."""
    if not isinstance(model, nn.Module):
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


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
    # gradients to ``replace`` are wanted: the model must not switch them off at the layer
    wants_grad = replace is not None and replace.requires_grad and torch.is_grad_enabled()

    def check_grad_at_layer() -> None:
        if wants_grad and not torch.is_grad_enabled():
            exc = ValueError(LAYER_WITHOUT_GRADIENTS)
            own_errors.append(exc)
            raise exc

    def fwd_hook(module: nn.Module, inp: Any, out: Any) -> Any:
        tensors, was_tuple = _as_tuple(out)
        seen.append((tuple(copy(t) for t in tensors), was_tuple))
        if replace is not None:
            check_grad_at_layer()
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
            check_grad_at_layer()
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
    if attribute_to_layer_input:
        _check_layer_inputs(tensors)
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"layer: the layer produced a {type(t).__name__}, not tensors")
    if not isinstance(output, Tensor):
        raise TypeError(not_scores(output))
    if replace is None:
        _check_rows(inputs, tensors, output, additional_forward_args)
    return tensors, was_tuple, output


def _check_layer_inputs(args: tuple) -> None:
    """With ``attribute_to_layer_input=True`` the layer's positional arguments are its
    features: there must be some, and all tensors (a forward pre-hook does not see
    keyword arguments)."""
    if not args:
        raise ValueError(
            "layer: attribute_to_layer_input=True, but the layer was called without "
            "positional arguments (keyword arguments cannot be read or replaced); split "
            "at the output of the module that computes its input, or call the layer "
            "with its input as a positional argument"
        )
    for a in args:
        if not isinstance(a, Tensor):
            raise TypeError(
                "layer: attribute_to_layer_input=True, but the layer's positional "
                f"arguments include a {type(a).__name__}, not only tensors; split at the "
                "output of the module that computes its input instead"
            )


def _check_rows(
    inputs: tuple[Tensor, ...],
    tensors: tuple[Tensor, ...],
    output: Tensor,
    additional_forward_args: tuple | None,
) -> None:
    """The layer and the model give one row per example (else a batched extra argument
    of another length was broadcast against the inputs)."""
    b = inputs[0].shape[0]
    rows = [t.shape[0] for t in (*tensors, output) if t.dim() > 0]
    if all(r == b for r in rows):
        return
    arg_rows = sorted(
        {
            a.shape[0]
            for a in additional_forward_args or ()
            if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] not in (1, b)
        }
    )  # the lengths of extra tensors that were passed whole, broadcast against the inputs
    if arg_rows:
        raise ValueError(
            f"additional_forward_args: a tensor of {arg_rows} rows did not match the "
            "examples of inputs, so it was passed whole (images are run one at a time or "
            f"in batches: here {b} example(s), and the layer and the model gave "
            f"{sorted(set(rows))} rows); give a per-example tensor one row per example of "
            "inputs (the same rows, in the same order)"
        )
    raise ValueError(
        f"forward_func: for {b} example(s) the layer and the model gave "
        f"{sorted(set(rows))} rows; they must keep the batch dimension (one row per example)"
    )


def not_scores(output: Any) -> str:
    """The message for a model that does not return a tensor of class scores."""
    return (
        f"forward_func must return a tensor of class scores, got {type(output).__name__}; "
        "wrap the model in an nn.Module whose forward returns them (for example the "
        "logits entry of a dict or the first element of a tuple)"
    )


def flatten_logits(output: Tensor, batch: int) -> Tensor:
    if output.dim() < 2 or output.shape[0] != batch:
        raise ValueError(
            "forward_func must return one row of class scores per example "
            f"(shape batch x classes), got shape {tuple(output.shape)} for batch {batch}"
        )
    return output.reshape(batch, -1)


@dataclass(frozen=True)
class Example:
    """The first reference, as the model ran on it: what tracing the head needs.

    Attributes
    ----------
    spec : InputSpec
        Per-example shapes and dtypes of the reference inputs.
    inputs : tuple of Tensor
        The first reference (batch of one), on the model's device.
    additional_forward_args : tuple or None
        Its extra arguments of ``forward_func`` (sliced to one example).
    batch, batch_args : tuple of Tensor, tuple or None
        The first (up to four) references and their extra arguments, on the model's
        device: what the cut check runs on.
    per_example : tuple of int
        Positions in ``batch_args`` of the tensors that had one row per reference in the
        first batch (cut to ``batch``'s rows); the others are passed whole.
    """

    spec: InputSpec
    inputs: tuple[Tensor, ...]
    additional_forward_args: tuple | None
    batch: tuple[Tensor, ...] = ()
    batch_args: tuple | None = None
    per_example: tuple[int, ...] = ()

    def check_batch(self) -> tuple[tuple[Tensor, ...], tuple | None]:
        """:attr:`batch` and :attr:`batch_args` cut to a number of rows that no extra
        tensor passed whole has (4, else 3, else 2): the cut check tells per-example
        tensors by their length, and took a tensor shared by the batch with as many
        entries as the rows (e.g. one value for each of 4 classes) for a per-example one,
        then warned that it entered the model after the layer."""
        m = self.batch[0].shape[0] if self.batch else 0
        args = self.batch_args or ()
        shared = {
            int(a.shape[0])
            for i, a in enumerate(args)
            if isinstance(a, Tensor) and a.dim() > 0 and i not in self.per_example
        }
        k = next((j for j in range(m, 1, -1) if j not in shared), m)
        if k == m:
            return self.batch, self.batch_args
        cut = tuple(a[:k] if i in self.per_example else a for i, a in enumerate(args))
        return tuple(t[:k] for t in self.batch), cut


Batches = Callable[[int], Iterator[tuple[Tensor, Tensor, LayerLayout]]]


def check_inputs_kept(inputs: tuple[Tensor, ...], kept: tuple[Tensor, ...]) -> None:
    """Refuse a model that changed its input tensors in place (``kept``: their copies
    from before the call), after putting the values back.

    A model whose forward runs ``x.div_(255)``, ``x.sub_(mean)`` or an in-place
    activation on its input changes the caller's images, and every later pass on the
    same tensor (the search runs the seed many times) would see other inputs.

    Raises
    ------
    ValueError
        Naming ``forward_func``.
    """
    changed = [i for i, (t, k) in enumerate(zip(inputs, kept)) if not torch.equal(t, k)]
    if not changed:
        return
    with torch.no_grad():
        for i in changed:
            inputs[i].copy_(kept[i])
    which = "its input" if len(inputs) == 1 else f"its input tensor(s) {changed}"
    raise ValueError(
        f"forward_func changed {which} in place (e.g. x.div_(255), x.sub_(mean) or an "
        "in-place activation on the input): your images would be changed, and each later "
        "pass on the same image would see other values. Make the model's first "
        "operations out of place, or pass forward_func=lambda x: model(x.clone()) (and "
        "the layer as before)"
    )


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
    desc: str = "fit: reference features",
) -> tuple[int | None, Example, Batches]:
    """The one batch loop over references: validate, run the model, read the layer.

    The first batch is read (not run) at once and checked, so that the reference set's
    input spec and first example are known before any model call, also when the caller
    then runs nothing (a finished on-disk store).

    Parameters
    ----------
    name : str
        The argument named in errors.
    expected : InputSpec, optional
        Per-example input shapes and dtypes to compare with when the model fails
        (default: the first batch's).

    Returns
    -------
    (n, example, run)
        The number of references when known in advance, the first reference
        (:class:`Example`), and ``run(skip=0)``, which yields ``(rows, predictions,
        layout)`` per batch: the layer's features (``B x D``, on the model's device), the
        argmax of the model's flattened output (``B`` int64, CPU) and the layer's layout.
        The first ``skip`` references are passed over without running the model (to
        resume an interrupted fit). ``rows`` lives in a buffer that the next batch
        overwrites: copy what you keep before the next one. ``run`` can be iterated once.

    Raises
    ------
    ValueError, TypeError
        Naming ``name``: an empty reference set, tensors without a batch dimension or
        with NaN/inf, batches the model fails on.
    """
    extra = _format_additional_forward_args(additional_forward_args)
    n, batches = iter_reference_batches(references, batch_size, extra, name)
    total = None if n is None else math.ceil(n / batch_size)
    if isinstance(references, DataLoader):  # it keeps its own batches
        try:
            total = len(references)
        except TypeError:
            total = None
    batches = (b for b in batches if int(b[0][0].shape[0]) > 0)
    first = next(batches, None)
    if first is None:
        what = "the reference set is empty" if name == "references" else "empty"
        raise ValueError(f"{name}: {what} (no examples)")
    check_inputs(first[0], name)
    check_against_references(first[0], expected, name)
    b = int(first[0][0].shape[0])
    on_device = (lambda ts: tuple(t.to(device) for t in ts)) if device is not None else tuple
    example = Example(
        input_spec(first[0]),
        on_device(t[:1] for t in first[0]),
        slice_args(first[1], b, 0, 1),
        on_device(t[:4] for t in first[0]),
        slice_args(first[1], b, 0, 4),
        tuple(per_example(first[1], b)),
    )

    def run(skip: int = 0) -> Iterator[tuple[Tensor, Tensor, LayerLayout]]:
        spec_expected = expected
        layout: LayerLayout | None = None
        start = 0
        copies = _ReusedCopies()
        stream = itertools.chain([first], batches)
        with torch.no_grad():
            for inputs, args in tqdm(stream, total=total, desc=desc, disable=not progress):
                b = int(inputs[0].shape[0])
                stop = start + b
                if stop <= skip:
                    start = stop
                    continue
                if start < skip:  # resume inside a batch
                    k = skip - start
                    inputs = tuple(t[k:] for t in inputs)
                    args = slice_args(args, b, k, b)
                start = stop
                check_inputs(inputs, name)
                check_against_references(inputs, spec_expected, name)
                spec = input_spec(inputs)
                if device is not None:
                    inputs = tuple(t.to(device) for t in inputs)
                copies.start_batch()
                kept = tuple(t.clone() for t in inputs) if layout is None else None
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
                if kept is not None:  # the first batch run
                    check_inputs_kept(inputs, kept)
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
                logits = flatten_logits(out, rows.shape[0])
                row0 = stop - rows.shape[0]  # the batch's first example
                if logits.shape[1] < 2:
                    raise ValueError(
                        "forward_func returns one score per example; representative "
                        "interpretations need one score per class (at least two), e.g. "
                        "torch.cat([torch.zeros_like(z), z], dim=1) for a binary "
                        "model's logit z"
                    )
                check_finite_outputs(logits, name, first=row0)
                yield rows, logits.argmax(dim=1).cpu(), layout

    return n, example, run


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
) -> tuple[Tensor, Tensor, LayerLayout, Example]:
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
    example : Example
        The first reference.
    """
    n, example, run = feature_batches(
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
    assert layout is not None  # the first batch is never empty
    features = buffer[:filled] if buffer is not None else torch.cat(feats)
    return features, torch.cat(preds), layout, example
