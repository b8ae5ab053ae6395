"""Choosing the layer to split at: it must be a cut, and the head after it piecewise linear.

Representative interpretations read exact decision boundaries off the *head* (the part of
the network after the chosen layer) only when the layer is a *cut* (the model's output
depends on its input through the layer alone, see :mod:`captum_repinterp.cuts`) and the
head is piecewise linear (see :mod:`captum_repinterp.tracing`, whose names this module
re-exports). :func:`find_layer` uses the trace and the cut check to pick the last
convolutional block that is a cut and whose head is piecewise linear::

    >>> layer = find_layer(model, images[:1])      # e.g. model.layer4 of a ResNet
    >>> ri = RepresentativeInterpretation(model, layer).fit(references)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .cuts import CutCheck, NotACutError, check_cut, cut_check_examples, warn_or_raise_not_cut
from .features import eval_mode, model_device
from .inputs import format_inputs, slice_args, translate_forward_error, uncompiled
from .tracing import (
    FINAL_MONOTONE_OPS,
    NON_PIECEWISE_LINEAR_OPS,
    NonPiecewiseLinearWarning,
    _describe,
    _trace,
    nonlinear_ops_after,
    nonlinear_ops_in,
    warn_nonlinear_head,
)

logger = logging.getLogger(__name__)

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
    model = uncompiled(model)
    inputs = format_inputs(example_input, "example_input")
    if inputs[0].shape[0] == 0:
        raise ValueError("example_input: the batch is empty; give one example (images[:1])")
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
        try:
            tracer = _trace(model, args, model)
        except Exception as exc:
            translated = translate_forward_error(exc, one, "example_input", None)
            if translated is None:
                raise
            if isinstance(translated, ValueError) and inputs[0].dim() == 3:
                raise ValueError(
                    f"example_input: got a tensor of shape {tuple(inputs[0].shape)}, read "
                    f"as a batch of {inputs[0].shape[0]} examples of shape "
                    f"{tuple(inputs[0].shape[1:])}, and the model failed on them; for one "
                    "image add the batch dimension first (x[None] or images[:1]). "
                    f"{translated}"
                ) from exc
            raise translated from exc
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
        after = tuple(_describe(tracer.curved_ops(id(m))))
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
    model = uncompiled(model)
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
            warn_nonlinear_head(chosen.nonlinear_after)
    if chosen is None:
        last = (exact or cands)[0]
        check = check_cut(model, last.module, inputs, extra)
        if check.conclusive:
            raise NotACutError(
                "find_layer: no convolutional block of the model is a cut, so no layer "
                f"gives exact regions with the model's own head. For the last block: "
                f"{check.message}"
            )
        warn_or_raise_not_cut(check)
        chosen = last
        if last.nonlinear_after:
            warn_nonlinear_head(last.nonlinear_after)
    logger.info(
        "find_layer: picked %r (%s, output %s)%s",
        chosen.name,
        type(chosen.module).__name__,
        chosen.output_shape,
        "" if not chosen.nonlinear_after else " although its head is not piecewise linear",
    )
    return (chosen.name, chosen.module) if return_name else chosen.module
