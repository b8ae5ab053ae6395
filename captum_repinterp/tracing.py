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
``x.sigmoid()`` are seen as well as modules. It also follows which module outputs every
floating-point tensor depends on (a call passes the dependences of its arguments on to
its floating-point results; comparisons and other integer or boolean results pass none),
so that curved operations made of piecewise-linear parts are found too: a product of two
tensors that both depend on the layer's output (a gate such as a squeeze-and-excitation
block, ``f * f``, a matrix product of two of them), a division by one (``f / f.norm()``),
and functions such as ``norm``, ``logsumexp`` or ``cos`` of one
(``DEPENDENT_CURVED_OPS``). Functions of the parameters alone, and products with a
tensor computed before the layer only, are not counted. All hooks and the mode are
removed before returning, also when the model raises.
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
    "DEPENDENT_CURVED_OPS",
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


#: Functions that are curved in their tensor argument, counted only when it depends on the
#: layer's output (a norm of the parameters, as in weight normalisation, is not counted).
DEPENDENT_CURVED_OPS = frozenset(
    {
        "norm",
        "vector_norm",
        "linalg_vector_norm",
        "matrix_norm",
        "frobenius_norm",
        "nuclear_norm",
        "rms_norm",
        "logsumexp",
        "log1p",
        "log2",
        "log10",
        "expm1",
        "exp2",
        "xlogy",
        "cos",
        "sin",
        "tan",
        "acos",
        "asin",
        "atan",
        "atan2",
        "cosh",
        "sinh",
        "asinh",
        "acosh",
        "atanh",
        "std",
        "var",
        "std_mean",
        "var_mean",
        "prod",
        "cumprod",
        "cosine_similarity",
        "pairwise_distance",
        "cdist",
        "lgamma",
        "digamma",
        "erfc",
        "erfinv",
        "sinc",
        "logit",
    }
)

#: Bilinear functions and the positions of their two factors: curved when both factors
#: depend on the layer's output (a gate ``f * g(f)``, ``f @ f.T``, a convolution whose
#: weight is computed from it); with one factor constant they are linear.
PRODUCT_OPS: dict[str, tuple[int, ...]] = {
    **dict.fromkeys(
        (
            "mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply",
            "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "dot", "vdot", "inner",
            "outer", "ger", "kron", "tensordot", "linear", "bilinear", "grid_sample",
            "conv1d", "conv2d", "conv3d",
            "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
        ),
        (0, 1),
    ),
    **dict.fromkeys(
        ("addcmul", "addcmul_", "addmm", "addbmm", "baddbmm", "addmv", "addr"), (1, 2)
    ),
    "einsum": (),  # every tensor operand
}  # fmt: skip

#: Divisions and the position of the divisor: curved when the divisor depends on the
#: layer's output (``__rtruediv__(a, b)`` computes ``b / a``).
DIVISION_OPS: dict[str, int] = {
    **dict.fromkeys(
        ("div", "div_", "__truediv__", "__itruediv__", "true_divide", "divide"), 1
    ),
    "__rtruediv__": 0,
    "__rdiv__": 0,
    "addcdiv": 2,
    "addcdiv_": 2,
}  # fmt: skip

#: Keyword names of the positional operands above (``torch.mul(input=a, other=b)``).
_OPERAND_KEYWORDS = ("input", "other", "weight", "tensor1", "tensor2", "mat1", "mat2")


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors in ``obj`` (nested tuples, lists and dict values)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _operands(op: str, args: tuple, kwargs: dict) -> list[Any]:
    """The positional operands of ``op``, keyword operands appended in order."""
    operands = list(args)
    if op == "einsum":
        return _tensors(operands[1:])
    operands += [kwargs[k] for k in _OPERAND_KEYWORDS if k in kwargs]
    return operands


class NonPiecewiseLinearWarning(UserWarning):
    """The head after the chosen layer is not piecewise linear (boundaries approximate)."""


#: Operations that change neither the predicted class nor the decision boundaries when
#: they are the last operation producing the output: softmax is strictly increasing in
#: each logit with the same normaliser for all classes, so ``softmax(z)_c > softmax(z)_c'``
#: exactly where ``z_c > z_c'``; sigmoid is one strictly increasing function applied to
#: every class alike. Anywhere else they count as curved.
FINAL_MONOTONE_OPS = frozenset({"softmax", "_softmax", "sigmoid"})


#: The source key of the traced function's own arguments (modules are keyed by ``id``,
#: their outputs by ``id(m)`` and their inputs by ``-id(m)``).
INPUT_KEY = 0


@dataclass
class _Event:
    index: int
    op: str
    module: str | None
    result: Any = None  # kept for FINAL_MONOTONE_OPS only (is it the model's output?)
    # for a call curved only in its dependent arguments: the sources it is curved in
    keys: frozenset[int] | None = None

    def counts_for(self, key: int, after: int) -> bool:
        """Whether this event is curved in the tensors of source ``key`` (a listed
        operation: whether it runs after index ``after``)."""
        return self.index > after if self.keys is None else key in self.keys


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

    def add_source(self, obj: Any, key: int) -> None:
        """Mark every tensor in ``obj`` as depending on source ``key``."""
        for t in _tensors(obj):
            self.sources[id(t)] = (t, self._of(t) | {key})

    def _of(self, obj: Any) -> frozenset[int]:
        keys: frozenset[int] = frozenset()
        for t in _tensors(obj):
            entry = self.sources.get(id(t))
            if entry is not None:
                keys = keys | entry[1]
        return keys

    def _curved_keys(self, op: str, args: tuple, kwargs: dict, keys: frozenset[int]) -> tuple:
        """The sources this call is curved in, and how (``(frozenset(), "")``: none)."""
        if op in DEPENDENT_CURVED_OPS:
            return keys, op
        if op in PRODUCT_OPS:
            operands = _operands(op, args, kwargs)
            picked = operands if op == "einsum" else [
                operands[i] for i in PRODUCT_OPS[op] if i < len(operands)
            ]  # fmt: skip
            sets = [self._of(o) for o in picked]
            twice = frozenset(k for k in keys if sum(k in ks for ks in sets) >= 2)
            return twice, f"{op} (of two tensors that depend on the layer)"
        if op in DIVISION_OPS:
            operands = _operands(op, args, kwargs)
            i = DIVISION_OPS[op]
            divisor = self._of(operands[i]) if i < len(operands) else frozenset()
            return divisor, f"{op} (by a tensor that depends on the layer)"
        return frozenset(), ""

    def name_of(self, m: nn.Module) -> str:
        return self.names.get(id(m), type(m).__name__)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        self.counter += 1
        op = getattr(func, "__name__", "")
        result = func(*args, **kwargs)
        module = self.stack[-1] if self.stack else None
        keys = self._of((args, kwargs)) if self.sources else frozenset()
        if op in NON_PIECEWISE_LINEAR_OPS:
            kept = result if op in FINAL_MONOTONE_OPS else None
            self.ops.append(_Event(self.counter, op, module, kept))
        elif keys:
            curved, how = self._curved_keys(op, args, kwargs, keys)
            if curved:
                self.ops.append(_Event(self.counter, how, module, keys=curved))
        if keys:
            for t in _tensors(result):
                if t.is_floating_point() or t.is_complex():
                    self.sources[id(t)] = (t, self._of(t) | keys)
        return result

    def curved_ops(self, key: int = INPUT_KEY, after: int = 0) -> list[_Event]:
        """The events curved in the tensors of source ``key`` (listed operations: run
        after index ``after``), without a final softmax/sigmoid producing the output."""
        return [
            e
            for e in self.ops
            if e.counts_for(key, after) and not (e.result is not None and e.result is self.result)
        ]

    def pre(self, m: nn.Module, args: Any) -> None:
        self.counter += 1
        self.starts.setdefault(id(m), []).append(self.counter)
        self.modules[id(m)] = m
        if not self.stack:
            self.depth0.append(m)
        name = self.name_of(m)
        self.stack.append(f"{name} ({type(m).__name__})" if name else "")
        self.add_source(args, -id(m))

    def post(self, m: nn.Module, args: Any, out: Any) -> None:
        self.counter += 1
        self.ends.setdefault(id(m), []).append(self.counter)
        self.outputs[id(m)] = out
        self.add_source(out, id(m))
        if self.stack:
            self.stack.pop()


def _trace(fn: Callable, args: tuple, root: Any) -> _Tracer:
    names = {id(m): n for n, m in root.named_modules()} if isinstance(root, nn.Module) else {}
    tracer = _Tracer(names)
    tracer.add_source(args, INPUT_KEY)
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
    final = [e for e in tracer.ops if e.result is not None and e.result is tracer.result]
    final = [e for e in final if e.index > after]
    return None if not final else final[-1].op.strip("_")


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
    return HeadScan(_describe(tracer.curved_ops(key, after)), _output_op(tracer, after))


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
