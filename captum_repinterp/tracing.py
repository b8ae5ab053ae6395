"""Is the head piecewise linear? A trace of what the model runs after the split layer.

Representative interpretations read exact decision boundaries off the head only when it
is piecewise linear: ReLU, LeakyReLU, PReLU, max/avg pooling, linear and convolutional
layers, batch norm in eval mode. Sigmoid, Tanh, GELU, SiLU, ELU, Softmax, Softplus, Mish,
Hardswish, layer norm and the like make the decision boundary curved; the sampled
boundaries are then local linear approximations (tangent planes), and the method warns.
A softmax (or sigmoid) that produces the model's output is the exception: it keeps the
predicted class and every boundary ``G_c = G_c'``.

Detection runs the model once on one example and records, in execution order, every
module call (global module hooks) and every torch function call (a
``torch.overrides.TorchFunctionMode``), so functional calls such as ``F.gelu`` or
``x.sigmoid()`` are seen as well as modules. All hooks and the mode are removed before
returning, also when the model raises.
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

from .features import caller_stacklevel

__all__ = [
    "FINAL_MONOTONE_OPS",
    "NON_PIECEWISE_LINEAR_OPS",
    "NonPiecewiseLinearWarning",
    "nonlinear_ops_after",
    "nonlinear_ops_in",
    "warn_nonlinear_head",
]

logger = logging.getLogger(__name__)

#: Names of torch functions (and Tensor methods) that are not piecewise linear in their
#: tensor argument. ``log_softmax`` is absent on purpose: it shifts all logits of a row by
#: the same amount, so differences of logits (the boundaries) are unchanged. A softmax or
#: sigmoid producing the model's output is not counted either (``FINAL_MONOTONE_OPS``).
NON_PIECEWISE_LINEAR_OPS = frozenset(
    {
        "sigmoid",
        "sigmoid_",
        "tanh",
        "tanh_",
        "gelu",
        "silu",
        "silu_",
        "elu",
        "elu_",
        "selu",
        "selu_",
        "celu",
        "celu_",
        "softmax",
        "_softmax",
        "softmin",
        "softplus",
        "mish",
        "mish_",
        "hardswish",
        "hardswish_",
        "logsigmoid",
        "softsign",
        "tanhshrink",
        "glu",
        "exp",
        "exp_",
        "log",
        "log_",
        "erf",
        "sqrt",
        "rsqrt",
        "pow",
        "pow_",
        "__pow__",
        "square",
        "layer_norm",
        "group_norm",
        "instance_norm",
        "normalize",
        "local_response_norm",
        "reciprocal",
        "scaled_dot_product_attention",
    }
)


class NonPiecewiseLinearWarning(UserWarning):
    """The head after the chosen layer is not piecewise linear (boundaries approximate)."""


#: Operations that change neither the predicted class nor the decision boundaries when
#: they are the last operation producing the output: softmax is strictly increasing in
#: each logit with the same normaliser for all classes, so ``softmax(z)_c > softmax(z)_c'``
#: exactly where ``z_c > z_c'``; sigmoid is one strictly increasing function applied to
#: every class alike. Anywhere else they count as curved.
FINAL_MONOTONE_OPS = frozenset({"softmax", "_softmax", "sigmoid"})


@dataclass
class _Event:
    index: int
    op: str
    module: str | None
    result: Any = None  # kept for FINAL_MONOTONE_OPS only (is it the model's output?)


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
        self.depth0: list[nn.Module] = []  # modules called with no module running
        self.result: Any = None

    def name_of(self, m: nn.Module) -> str:
        return self.names.get(id(m), type(m).__name__)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        self.counter += 1
        op = getattr(func, "__name__", "")
        result = func(*args, **kwargs)
        if op in NON_PIECEWISE_LINEAR_OPS:
            kept = result if op in FINAL_MONOTONE_OPS else None
            self.ops.append(_Event(self.counter, op, self.stack[-1] if self.stack else None, kept))
        return result

    def curved_ops(self) -> list[_Event]:
        """The recorded events, without a final softmax/sigmoid producing the output."""
        return [e for e in self.ops if not (e.result is not None and e.result is self.result)]

    def pre(self, m: nn.Module, args: Any) -> None:
        self.counter += 1
        self.starts.setdefault(id(m), []).append(self.counter)
        self.modules[id(m)] = m
        if not self.stack:
            self.depth0.append(m)
        name = self.name_of(m)
        self.stack.append(f"{name} ({type(m).__name__})" if name else "")

    def post(self, m: nn.Module, args: Any, out: Any) -> None:
        self.counter += 1
        self.ends.setdefault(id(m), []).append(self.counter)
        self.outputs[id(m)] = out
        if self.stack:
            self.stack.pop()


def _trace(fn: Callable, args: tuple, root: Any) -> _Tracer:
    names = {id(m): n for n, m in root.named_modules()} if isinstance(root, nn.Module) else {}
    tracer = _Tracer(names)
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
    return _describe([e for e in tracer.curved_ops() if e.index > after])


def nonlinear_ops_in(head: Callable, layer_output: Any) -> list[str]:
    """Non-piecewise-linear operations a user-given ``head`` runs on ``layer_output``."""
    tracer = _trace(head, (layer_output,), head)
    return _describe(tracer.curved_ops())


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
