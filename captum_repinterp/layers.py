"""Choosing the layer to split at, and checking that the head after it is piecewise linear.

Representative interpretations read exact decision boundaries off the *head* (the part of
the network after the chosen layer) only when that head is piecewise linear: ReLU,
LeakyReLU, PReLU, max/avg pooling, linear and convolutional layers, batch norm in eval
mode. Sigmoid, Tanh, GELU, SiLU, ELU, Softmax, Softplus, Mish, Hardswish, layer norm and
the like make the decision boundary curved; the sampled boundaries are then local linear
approximations (tangent planes), and the method warns.

Detection runs the model once on one example and records, in execution order, every
module call (global module hooks) and every torch function call (a
``torch.overrides.TorchFunctionMode``), so functional calls such as ``F.gelu`` or
``x.sigmoid()`` are seen as well as modules. All hooks and the mode are removed before
returning, also when the model raises.

:func:`find_layer` uses the same trace to pick the last convolutional block whose head is
piecewise linear::

    >>> layer = find_layer(model, images[:1])      # e.g. model.layer4 of a ResNet
    >>> ri = RepresentativeInterpretation(model, layer).fit(references)
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_mod
from torch.overrides import TorchFunctionMode

from .features import eval_mode, model_device
from .inputs import format_inputs

__all__ = [
    "NON_PIECEWISE_LINEAR_OPS",
    "NonPiecewiseLinearWarning",
    "LayerCandidate",
    "layer_candidates",
    "find_layer",
    "nonlinear_ops_after",
    "nonlinear_ops_in",
    "warn_nonlinear_head",
]

logger = logging.getLogger(__name__)

#: Names of torch functions (and Tensor methods) that are not piecewise linear in their
#: tensor argument. ``log_softmax`` is absent on purpose: it shifts all logits of a row by
#: the same amount, so differences of logits (the boundaries) are unchanged.
NON_PIECEWISE_LINEAR_OPS = frozenset(
    {
        "sigmoid", "sigmoid_", "tanh", "tanh_", "gelu", "silu", "silu_", "elu", "elu_",
        "selu", "selu_", "celu", "celu_", "softmax", "_softmax", "softmin", "softplus",
        "mish", "mish_", "hardswish", "hardswish_", "logsigmoid", "softsign", "tanhshrink",
        "glu", "exp", "exp_", "log", "log_", "erf", "sqrt", "rsqrt", "pow", "pow_",
        "__pow__", "square", "layer_norm", "group_norm", "instance_norm", "normalize",
        "local_response_norm", "reciprocal", "scaled_dot_product_attention",
    }
)


class NonPiecewiseLinearWarning(UserWarning):
    """The head after the chosen layer is not piecewise linear (boundaries approximate)."""


@dataclass
class _Event:
    index: int
    op: str
    module: str | None


class _Tracer(TorchFunctionMode):
    """Records non-piecewise-linear torch calls and module completions, in order."""

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

    def name_of(self, m: nn.Module) -> str:
        return self.names.get(id(m), type(m).__name__)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        self.counter += 1
        op = getattr(func, "__name__", "")
        if op in NON_PIECEWISE_LINEAR_OPS:
            self.ops.append(_Event(self.counter, op, self.stack[-1] if self.stack else None))
        return func(*args, **kwargs)

    def pre(self, m: nn.Module, args: Any) -> None:
        self.counter += 1
        self.starts.setdefault(id(m), []).append(self.counter)
        self.modules[id(m)] = m
        name = self.name_of(m)
        self.stack.append(f"{name} ({type(m).__name__})" if name else "")

    def post(self, m: nn.Module, args: Any, out: Any) -> None:
        self.counter += 1
        self.ends.setdefault(id(m), []).append(self.counter)
        self.outputs[id(m)] = out
        if self.stack:
            self.stack.pop()


def _trace(fn: Callable, args: tuple, root: Any) -> _Tracer:
    names = (
        {id(m): n for n, m in root.named_modules()}
        if isinstance(root, nn.Module)
        else {}
    )
    tracer = _Tracer(names)
    h1 = _module_mod.register_module_forward_pre_hook(tracer.pre)
    h2 = _module_mod.register_module_forward_hook(tracer.post)
    try:
        with torch.no_grad(), tracer:
            fn(*args)
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
    args = inputs if additional_forward_args is None else (*inputs, *additional_forward_args)
    tracer = _trace(forward_func, args, forward_func)
    marks = tracer.starts if attribute_to_layer_input else tracer.ends
    if id(layer) not in marks:
        return []
    after = marks[id(layer)][0] if attribute_to_layer_input else marks[id(layer)][-1]
    return _describe([e for e in tracer.ops if e.index > after])


def nonlinear_ops_in(head: Callable, layer_output: Any) -> list[str]:
    """Non-piecewise-linear operations a user-given ``head`` runs on ``layer_output``."""
    tracer = _trace(head, (layer_output,), head)
    return _describe(tracer.ops)


def warn_nonlinear_head(ops: list[str] | tuple[str, ...], stacklevel: int = 3) -> None:
    """Emit one :class:`NonPiecewiseLinearWarning` listing ``ops`` (nothing if empty)."""
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
        stacklevel=stacklevel,
    )


@dataclass(frozen=True)
class LayerCandidate:
    """A convolutional block that could be the split layer.

    Attributes
    ----------
    name : str
        Its qualified name in the model (``model.get_submodule(name)``).
    module : nn.Module
        The module.
    output_shape : tuple of int
        Shape of its output for the example (batch of one).
    nonlinear_after : tuple of str
        Non-piecewise-linear operations run after it (empty: exact boundaries).
    """

    name: str
    module: nn.Module
    output_shape: tuple[int, ...]
    nonlinear_after: tuple[str, ...]


def _has_conv(m: nn.Module) -> bool:
    return any(isinstance(s, nn.modules.conv._ConvNd) for s in m.modules())


def layer_candidates(
    model: nn.Module, example_input: Any, additional_forward_args: Any = None
) -> list[LayerCandidate]:
    """Convolutional blocks of ``model``, last to finish first.

    A candidate is a submodule that is (or contains) a convolution, runs exactly once per
    forward pass and outputs one tensor with a spatial extent larger than 1x1. Nested
    modules with the same output (``layer4`` and ``layer4[1]``) are all listed, the
    outermost first.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = format_inputs(example_input, "example_input")
    one = tuple(t[:1].detach() for t in inputs)
    device = model_device(model, model)
    if device is not None:
        one = tuple(t.to(device) for t in one)
    extra = additional_forward_args
    if extra is not None and not isinstance(extra, tuple):
        extra = (extra,)
    args = one if extra is None else (*one, *extra)
    with eval_mode(model):
        tracer = _trace(model, args, model)
    out: list[tuple[int, LayerCandidate]] = []
    for name, m in model.named_modules():
        if m is model or id(m) not in tracer.ends or len(tracer.ends[id(m)]) != 1:
            continue
        o = tracer.outputs.get(id(m))
        if not isinstance(o, Tensor) or o.dim() < 3 or math.prod(o.shape[2:]) <= 1:
            continue
        if not _has_conv(m):
            continue
        end = tracer.ends[id(m)][0]
        after = tuple(_describe([e for e in tracer.ops if e.index > end]))
        out.append((end, LayerCandidate(name, m, tuple(o.shape), after)))
    out.sort(key=lambda p: -p[0])
    return [c for _, c in out]


def find_layer(
    model: nn.Module,
    example_input: Any,
    additional_forward_args: Any = None,
    return_name: bool = False,
) -> nn.Module | tuple[str, nn.Module]:
    """Pick the last convolutional block whose head is piecewise linear.

    Parameters
    ----------
    model : nn.Module
        The classifier (run once, in eval mode, on the first example; flags restored).
    example_input : Tensor or tuple of Tensor
        Batch-first input(s) shaped as the model expects.
    additional_forward_args : any, optional
        Extra arguments of the model's forward.
    return_name : bool
        Return ``(name, module)`` instead of the module.

    Returns
    -------
    nn.Module or (str, nn.Module)
        The chosen block (the outermost module with that output, e.g. ``layer4`` of a
        ResNet, ``features`` of a VGG or DenseNet). The choice is logged at INFO level on
        the ``captum_repinterp.layers`` logger. When no block has a piecewise-linear head
        (e.g. MobileNetV3, whose classifier uses Hardswish), the last block is returned
        with a :class:`NonPiecewiseLinearWarning`.

    Raises
    ------
    ValueError
        When the model has no convolutional block with a spatial output.
    """
    cands = layer_candidates(model, example_input, additional_forward_args)
    if not cands:
        raise ValueError(
            "model: found no convolutional block (a module with a convolution, called "
            "once, with a spatial output) to split at; pass the layer explicitly"
        )
    exact = [c for c in cands if not c.nonlinear_after]
    chosen = exact[0] if exact else cands[0]
    if not exact:
        warn_nonlinear_head(chosen.nonlinear_after, stacklevel=2)
    logger.info(
        "find_layer: picked %r (%s, output %s)%s",
        chosen.name,
        type(chosen.module).__name__,
        chosen.output_shape,
        "" if exact else " although its head is not piecewise linear",
    )
    return (chosen.name, chosen.module) if return_name else chosen.module
