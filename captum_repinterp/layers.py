"""Choosing the layer to split at: it must be a cut, and the head after it piecewise linear.

Representative interpretations read exact decision boundaries off the *head* (the part of
the network after the chosen layer) only when

1. the layer is a *cut*: the model's output depends on its input through the layer
   alone. A layer inside a residual block (before the addition), or one after which
   another per-example input joins (metadata, a second image), is not; the head then
   carries the seed's own bypass values and regions are wrong without any error.
   :func:`check_cut` tests it on pairs of examples (the model run on ``A`` with the
   layer's output replaced by ``B``'s must give ``B``'s output), says what bypasses the
   layer and suggests a module that is a cut;
2. the head is piecewise linear: ReLU, LeakyReLU, PReLU, max/avg pooling, linear and
   convolutional layers, batch norm in eval mode. Sigmoid, Tanh, GELU, SiLU, ELU,
   Softmax, Softplus, Mish, Hardswish, layer norm and the like make the decision boundary
   curved; the sampled boundaries are then local linear approximations (tangent planes),
   and the method warns. A softmax (or sigmoid) that produces the model's output is the
   exception: it keeps the predicted class and every boundary ``G_c = G_c'``.

Detection runs the model once on one example and records, in execution order, every
module call (global module hooks) and every torch function call (a
``torch.overrides.TorchFunctionMode``), so functional calls such as ``F.gelu`` or
``x.sigmoid()`` are seen as well as modules. All hooks and the mode are removed before
returning, also when the model raises.

:func:`find_layer` uses the same trace and the cut check to pick the last convolutional
block that is a cut and whose head is piecewise linear::

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
from .inputs import format_inputs, slice_args

__all__ = [
    "FINAL_MONOTONE_OPS",
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


#: Module types that end a block without containing a convolution themselves (the ReLU
#: after a residual addition, a batch norm after a concatenation). They are candidates
#: when they run after a convolution.
_BLOCK_ENDS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.modules.batchnorm._BatchNorm,
)  # fmt: skip


def layer_candidates(
    model: nn.Module, example_input: Any, additional_forward_args: Any = None
) -> list[LayerCandidate]:
    """Convolutional blocks of ``model``, last to finish first.

    A candidate is a submodule that runs exactly once per forward pass, outputs one
    tensor with a spatial extent larger than 1x1, and is (or contains) a convolution or
    is an activation or batch-norm module running after a convolution (the ReLU after a
    residual addition ends a block). Nested modules with the same output (``layer4`` and
    ``layer4[1]``) are all listed, the outermost first.
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
    if extra is not None:  # per-example extra tensors: the first row, like the inputs
        extra = slice_args(extra, inputs[0].shape[0], 0, 1)
    args = one if extra is None else (*one, *extra)
    with eval_mode(model):
        tracer = _trace(model, args, model)
    curved = tracer.curved_ops()
    conv_ends = [
        tracer.ends[id(m)][0]
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd) and id(m) in tracer.ends
    ]
    first_conv_end = min(conv_ends, default=math.inf)
    out: list[tuple[int, LayerCandidate]] = []
    for name, m in model.named_modules():
        if m is model or id(m) not in tracer.ends or len(tracer.ends[id(m)]) != 1:
            continue
        o = tracer.outputs.get(id(m))
        if not isinstance(o, Tensor) or o.dim() < 3 or math.prod(o.shape[2:]) <= 1:
            continue
        block_end = isinstance(m, _BLOCK_ENDS) and tracer.starts[id(m)][0] > first_conv_end
        if not (_has_conv(m) or block_end):
            continue
        end = tracer.ends[id(m)][0]
        after = tuple(_describe([e for e in curved if e.index > end]))
        out.append((end, LayerCandidate(name, m, tuple(o.shape), after)))
    out.sort(key=lambda p: -p[0])
    return [c for _, c in out]


def find_layer(
    model: nn.Module,
    example_input: Any,
    additional_forward_args: Any = None,
    return_name: bool = False,
) -> nn.Module | tuple[str, nn.Module]:
    """Pick the last convolutional block that is a cut and has a piecewise-linear head.

    A block is a *cut* when the model's output depends on the input through it alone
    (see :func:`check_cut`): a block output of a ResNet (``layer4``), a DenseNet's
    ``features`` or a VGG stage is; a convolution inside a residual block (before the
    addition) or a branch that another input joins later is not.

    Parameters
    ----------
    model : nn.Module
        The classifier (run in eval mode; flags restored).
    example_input : Tensor or tuple of Tensor
        Batch-first input(s) shaped as the model expects. The cut check uses up to four
        of its examples; when there is only one, a second is made from it
        deterministically (see :func:`cut_check_examples`).
    additional_forward_args : any, optional
        Extra arguments of the model's forward (per-example tensors are paired like the
        inputs, so an extra input that joins after a block rules that block out).
    return_name : bool
        Return ``(name, module)`` instead of the module.

    Returns
    -------
    nn.Module or (str, nn.Module)
        The chosen block (the outermost module with that output, e.g. ``layer4`` of a
        ResNet, ``features`` of a VGG or DenseNet). The choice is logged at INFO level on
        the ``captum_repinterp.layers`` logger. When no cut has a piecewise-linear head
        (e.g. MobileNetV3, whose classifier uses Hardswish), the last cut is returned
        with a :class:`NonPiecewiseLinearWarning`. A softmax or sigmoid that produces the
        model's output does not count as curved: it keeps the predicted class and the
        decision boundaries.

    Raises
    ------
    ValueError
        When the model has no convolutional block with a spatial output.
    NotACutError
        (a ValueError) When no convolutional block is a cut, e.g. when a second
        per-example input joins after the last block. The message says what bypasses the
        last block and names a later module that is a cut, if any. When the model's
        output is not reproducible (random operations in eval mode) the check cannot
        decide; the last block is then returned with a :class:`NotACutWarning`.
    """
    from .cuts import CutCheck, NotACutError, check_cut, cut_check_examples, warn_or_raise_not_cut

    cands = layer_candidates(model, example_input, additional_forward_args)
    if not cands:
        raise ValueError(
            "model: found no convolutional block (a module with a convolution, called "
            "once, with a spatial output) to split at; pass the layer explicitly"
        )
    inputs, extra = cut_check_examples(example_input, additional_forward_args)
    checks: dict[int, CutCheck] = {}

    def cut(c: LayerCandidate) -> CutCheck:
        if id(c.module) not in checks:
            checks[id(c.module)] = check_cut(model, c.module, inputs, extra, suggest=False)
        return checks[id(c.module)]

    exact = [c for c in cands if not c.nonlinear_after]
    curved = [c for c in cands if c.nonlinear_after]
    chosen = next((c for c in exact if cut(c).is_cut), None)
    if chosen is None:
        chosen = next((c for c in curved if cut(c).is_cut), None)
        if chosen is not None:
            warn_nonlinear_head(chosen.nonlinear_after, stacklevel=2)
    if chosen is None:
        last = (exact or cands)[0]
        check = check_cut(model, last.module, inputs, extra)
        if check.conclusive:
            raise NotACutError(
                "find_layer: no convolutional block of the model is a cut, so no layer "
                f"gives exact regions with the model's own head. For the last block: "
                f"{check.message}"
            )
        warn_or_raise_not_cut(check, stacklevel=2)
        chosen = last
        if last.nonlinear_after:
            warn_nonlinear_head(last.nonlinear_after, stacklevel=2)
    logger.info(
        "find_layer: picked %r (%s, output %s)%s",
        chosen.name,
        type(chosen.module).__name__,
        chosen.output_shape,
        "" if not chosen.nonlinear_after else " although its head is not piecewise linear",
    )
    return (chosen.name, chosen.module) if return_name else chosen.module
