"""Is the head piecewise linear? A trace of what the model runs after the split layer.

Representative interpretations read exact decision boundaries off the head only when it
is piecewise linear: ReLU, LeakyReLU, PReLU, max/avg pooling, linear and convolutional
layers, batch norm in eval mode. Sigmoid, Tanh, GELU, SiLU, ELU, Softmax, Softplus, Mish,
Hardswish, layer norm and the like make the decision boundary curved; the sampled
boundaries are then local linear approximations (tangent planes), and the method warns.
A softmax (or sigmoid) that produces the model's output is the exception: it keeps the
predicted class and every boundary ``G_c = G_c'``.

Detection runs the model once on one example and records every module call (global
module hooks) and every torch function call (a ``torch.overrides.TorchFunctionMode``), so
functional calls such as ``F.gelu`` or ``x.sigmoid()`` are seen as well as modules. It
follows which module outputs every floating-point tensor depends on: a call passes the
dependences of its arguments on to its results (not to integer or boolean results, nor
from piecewise-constant calls such as ``sign``), and a module's output depends on its
inputs. A call counts for a layer when it is curved in a tensor that depends on the
layer's output (:mod:`captum_repinterp.curved_ops` says which calls are curved in which
arguments): a sigmoid of the features, a product of two tensors that both depend on
them (a squeeze-and-excitation gate, ``f * f``), a division by one (``f / f.norm()``).
Functions of the parameters alone (weight normalisation, ``FrozenBatchNorm2d``'s
``rsqrt`` of its buffers, ``logit_scale.exp()``) and products with a tensor computed
before the layer only do not count. What runs outside Python's view is not seen: a
scripted (``torch.jit``) function, or a value read into Python with ``item()`` (that one
is reported). All hooks and the mode are removed before returning, also when the model
raises.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_mod
from torch.overrides import TorchFunctionMode

from .curved_ops import (
    CURVED_OPS,
    FINAL_MONOTONE_OPS,
    curved_in,
    normalise,
    propagates,
    tensors_in,
)
from .features import caller_stacklevel

__all__ = [
    "FINAL_MONOTONE_OPS",
    "NON_PIECEWISE_LINEAR_OPS",
    "HeadScan",
    "NonPiecewiseLinearWarning",
    "ProbabilityOutputWarning",
    "nonlinear_ops_after",
    "nonlinear_ops_in",
    "scan_after",
    "scan_head",
    "warn_nonlinear_head",
    "warn_probability_output",
]

logger = logging.getLogger(__name__)

#: Kept under its former name: the functions that are curved in their arguments.
NON_PIECEWISE_LINEAR_OPS = CURVED_OPS


class NonPiecewiseLinearWarning(UserWarning):
    """The head after the chosen layer is not piecewise linear (boundaries approximate)."""


#: The source key of the traced function's own arguments (modules are keyed by ``id``,
#: their outputs by ``id(m)`` and their inputs by ``-id(m)``).
INPUT_KEY = 0


@dataclass
class _Event:
    index: int
    op: str
    module: str | None
    result: Any = None  # kept for FINAL_MONOTONE_OPS only (is it the model's output?)
    keys: frozenset[int] = frozenset()  # the sources the call is curved in


class _Tracer(TorchFunctionMode):
    """Records non-piecewise-linear torch calls and module completions, in order, and
    which module outputs (and inputs) every floating-point tensor depends on."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.counter = 0
        self.ops: list[_Event] = []
        self.stack: list[str] = []
        self.starts: dict[int, list[int]] = {}
        self.ends: dict[int, list[int]] = {}
        self.outputs: dict[int, Any] = {}
        self.modules: dict[int, nn.Module] = {}
        self.depth0: list[nn.Module] = []  # modules called with no module running
        self.result: Any = None
        # tensor id -> (the tensor, kept alive so ids stay unique; its source keys)
        self.sources: dict[int, tuple[Tensor, frozenset[int]]] = {}

    def add_source(self, obj: Any, keys: frozenset[int]) -> None:
        """Mark every tensor in ``obj`` as depending on ``keys`` too."""
        for t in tensors_in(obj):
            self.sources[id(t)] = (t, self._of(t) | keys)

    def _of(self, obj: Any) -> frozenset[int]:
        """The sources the tensors in ``obj`` depend on."""
        keys: frozenset[int] = frozenset()
        for t in tensors_in(obj):
            entry = self.sources.get(id(t))
            if entry is not None:
                keys = keys | entry[1]
        return keys

    def name_of(self, m: nn.Module) -> str:
        return self.names.get(id(m), type(m).__name__)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        self.counter += 1
        result = func(*args, **kwargs)
        keys = self._of((args, kwargs)) if self.sources else frozenset()
        if keys:
            name = normalise(getattr(func, "__name__", ""))
            curved, how = curved_in(name, args, kwargs, self._of)
            if curved:
                module = self.stack[-1] if self.stack else None
                kept = result if name in FINAL_MONOTONE_OPS else None
                self.ops.append(_Event(self.counter, how, module, kept, curved))
            if propagates(name, kwargs):
                floats = [t for t in tensors_in(result) if t.is_floating_point() or t.is_complex()]
                self.add_source(floats, keys)
        return result

    def curved_ops(self, key: int = INPUT_KEY) -> list[_Event]:
        """The calls curved in the tensors of source ``key``, without a final softmax,
        log-softmax or sigmoid producing the output."""
        return [
            e
            for e in self.ops
            if key in e.keys and not (e.result is not None and e.result is self.result)
        ]

    def pre(self, m: nn.Module, args: Any) -> None:
        self.counter += 1
        self.starts.setdefault(id(m), []).append(self.counter)
        self.modules[id(m)] = m
        if not self.stack:
            self.depth0.append(m)
        name = self.name_of(m)
        self.stack.append(f"{name} ({type(m).__name__})" if name else "")
        self.add_source(args, frozenset({-id(m)}))

    def post(self, m: nn.Module, args: Any, out: Any) -> None:
        self.counter += 1
        self.ends.setdefault(id(m), []).append(self.counter)
        self.outputs[id(m)] = out
        # a module's output depends on its inputs (also when its inside is not traced)
        self.add_source(out, self._of(args) | {id(m)})
        if self.stack:
            self.stack.pop()


def _trace(fn: Callable, args: tuple, root: Any) -> _Tracer:
    names = {id(m): n for n, m in root.named_modules()} if isinstance(root, nn.Module) else {}
    tracer = _Tracer(names)
    tracer.add_source(args, frozenset({INPUT_KEY}))
    h1 = _module_mod.register_module_forward_pre_hook(tracer.pre)
    h2 = _module_mod.register_module_forward_hook(tracer.post)
    try:
        with torch.no_grad(), tracer:
            tracer.result = fn(*args)
    finally:
        h1.remove()
        h2.remove()
    return tracer


def _describe(events: list[_Event]) -> list[str]:
    out: list[str] = []
    for e in events:
        text = f"{e.module}: {e.op}" if e.module else e.op
        if text not in out:
            out.append(text)
    return out


@dataclass(frozen=True)
class HeadScan:
    """What a trace found after the split layer.

    Attributes
    ----------
    nonlinear : list of str
        The non-piecewise-linear operations (see :func:`nonlinear_ops_after`).
    output_op : str or None
        ``"softmax"`` or ``"sigmoid"`` when one produces the model's output (the
        boundaries are right, but measured in probabilities), else None.
    """

    nonlinear: list[str]
    output_op: str | None


def _output_op(tracer: _Tracer, after: int = 0) -> str | None:
    """The softmax or sigmoid producing the output (not log-softmax: it keeps the
    logits' differences exactly)."""
    final = [e for e in tracer.ops if e.result is not None and e.result is tracer.result]
    final = [e.op for e in final if e.index > after]
    return final[-1] if final and final[-1] != "log_softmax" else None


def scan_after(
    forward_func: Callable,
    layer: nn.Module,
    inputs: tuple[Tensor, ...],
    additional_forward_args: tuple | None = None,
    attribute_to_layer_input: bool = False,
) -> HeadScan:
    """:func:`nonlinear_ops_after`, and the softmax or sigmoid producing the output."""
    args = inputs if additional_forward_args is None else (*inputs, *additional_forward_args)
    tracer = _trace(forward_func, args, forward_func)
    marks = tracer.starts if attribute_to_layer_input else tracer.ends
    if id(layer) not in marks:
        return HeadScan([], None)
    after = marks[id(layer)][0] if attribute_to_layer_input else marks[id(layer)][-1]
    key = -id(layer) if attribute_to_layer_input else id(layer)
    return HeadScan(_describe(tracer.curved_ops(key)), _output_op(tracer, after))


def scan_head(head: Callable, layer_output: Any) -> HeadScan:
    """:func:`nonlinear_ops_in`, and the softmax or sigmoid producing the output."""
    tracer = _trace(head, (layer_output,), head)
    return HeadScan(_describe(tracer.curved_ops()), _output_op(tracer))


def nonlinear_ops_after(
    forward_func: Callable,
    layer: nn.Module,
    inputs: tuple[Tensor, ...],
    additional_forward_args: tuple | None = None,
    attribute_to_layer_input: bool = False,
) -> list[str]:
    """Non-piecewise-linear operations the model runs after ``layer`` on one example.

    Returns descriptions such as ``"classifier.2 (Hardswish): hardswish"`` (module name
    and type, then the torch function), or just the function name for a functional call
    outside any module; empty when the head is piecewise linear.
    """
    scan = scan_after(
        forward_func, layer, inputs, additional_forward_args, attribute_to_layer_input
    )
    return scan.nonlinear


def nonlinear_ops_in(head: Callable, layer_output: Any) -> list[str]:
    """Non-piecewise-linear operations a user-given ``head`` runs on ``layer_output``."""
    return scan_head(head, layer_output).nonlinear


class ProbabilityOutputWarning(UserWarning):
    """The model outputs probabilities (a final softmax or sigmoid), not logits."""


def warn_probability_output(op: str | None, stacklevel: int | None = None) -> None:
    """Emit one :class:`ProbabilityOutputWarning` when ``op`` (a final softmax or
    sigmoid) produces the model's output; nothing when ``op`` is None."""
    if op is None:
        return
    warnings.warn(
        f"the model's output is a {op}: the regions and their members are those of the "
        "logits (it keeps every boundary), but the boundaries' normals, hence the heat "
        "maps, the members' order and the semantic distances, are measured in "
        f"probabilities (scaled by the {op}'s slope where each boundary was found), not "
        "in logits. Pass the model without its final "
        f"{op} (or with log_softmax) to measure them in logits.",
        ProbabilityOutputWarning,
        stacklevel=caller_stacklevel() if stacklevel is None else stacklevel,
    )


def warn_nonlinear_head(ops: list[str] | tuple[str, ...], stacklevel: int | None = None) -> None:
    """Emit one :class:`NonPiecewiseLinearWarning` listing ``ops`` (nothing if empty),
    pointing at the user's call unless ``stacklevel`` is given."""
    if not ops:
        return
    shown = ", ".join(ops[:6]) + (f", ... ({len(ops)} in all)" if len(ops) > 6 else "")
    warnings.warn(
        "the head after the chosen layer is not piecewise linear "
        f"({shown}); its decision boundaries are curved, so the sampled boundaries are "
        "local linear approximations (tangent planes at the bisection points) and the "
        "regions, members and heat maps are approximate. Choose a layer after which only "
        "ReLU/LeakyReLU/PReLU, pooling, linear/conv and (eval) batch-norm layers run "
        "(captum_repinterp.layers.find_layer does this) for exact boundaries.",
        NonPiecewiseLinearWarning,
        stacklevel=caller_stacklevel() if stacklevel is None else stacklevel,
    )
