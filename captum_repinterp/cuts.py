"""Is the split layer a cut of the computation? The check behind exact regions.

Representative interpretations treat the head (the model after the split layer) as a
function of the layer's output alone. That holds when every path from the input to the
output passes through the layer: the layer is a *cut*. :func:`check_cut` tests it on pairs
of examples (the model run on ``A`` with the layer's output replaced by ``B``'s must give
the model's output on ``B``), names what bypasses the layer and suggests a module that is
a cut. ``fit`` runs it on the first references; :func:`~captum_repinterp.layers.find_layer`
returns cuts only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .features import caller_stacklevel, eval_mode, model_device, not_scores
from .inputs import format_inputs, per_example, uncompiled
from .tracing import _trace, _Tracer

__all__ = [
    "CutCheck",
    "NotACutError",
    "NotACutWarning",
    "check_cut",
    "cut_check_examples",
    "default_cut_tolerance",
    "warn_or_raise_not_cut",
]


def cut_check_examples(
    example_input: Any, additional_forward_args: Any = None, n: int = 4
) -> tuple[tuple[Tensor, ...], Any]:
    """Up to ``n`` examples for :func:`check_cut`; a second one made when there is one.

    With a batch of one, the second example is a seeded noise copy of the first for
    floating-point tensors (``x + std(x) * noise``, ``noise`` standard normal from a
    generator seeded with 0; ``std(x)`` replaced by 1 for a constant tensor) and its
    horizontal flip (``x.flip(-1)``) for integer or bool tensors. Per-example tensors of
    ``additional_forward_args`` (first dimension 1) get a second row the same way, so an
    extra input that enters after the layer shows up in the check.

    Returns
    -------
    (inputs, additional_forward_args)
        A tuple of tensors with at least two examples, and the extra arguments to match.
    """
    inputs = format_inputs(example_input, "example_input")
    extra = additional_forward_args
    if extra is not None and not isinstance(extra, tuple):
        extra = (extra,)
    size = inputs[0].shape[0]
    if size >= 2:
        keep = torch.arange(min(size, n))
        ex = None if extra is None else _take(extra, keep, per_example(extra, size))
        return tuple(t[keep] for t in inputs), ex
    gen = torch.Generator().manual_seed(0)

    def second(t: Tensor) -> Tensor:
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=gen)
            s = float(t.float().std()) if t.numel() > 1 else 0.0
            other = t + (noise * (s if s > 0 else 1.0)).to(t)
        else:
            other = t.flip(-1) if t.dim() > 1 else t
        return torch.cat([t, other])

    ex = (
        None
        if extra is None
        else tuple(second(a) if i in per_example(extra, 1) else a for i, a in enumerate(extra))
    )
    return tuple(second(t) for t in inputs), ex


# ---------------------------------------------------------------------------- cut check


class NotACutWarning(UserWarning):
    """The output does not depend on the input through the chosen layer alone."""


class NotACutError(ValueError):
    """The chosen layer is not a cut of the model: regions would be silently wrong."""


@dataclass(frozen=True)
class CutCheck:
    """Result of :func:`check_cut`.

    Attributes
    ----------
    is_cut : bool
        Whether, on every checked pair ``(A, B)``, the model run on ``A`` with the layer's
        output replaced by ``B``'s gave ``B``'s output (with ``head``: whether
        ``head(layer output of B)`` gave ``B``'s output), within ``tolerance``.
    max_error : float
        Largest absolute difference of an output value over the pairs.
    scale : float
        Largest absolute output value on the checked examples.
    tolerance : float
        ``atol + rtol * scale``.
    noise : float
        Largest difference between two plain runs of the model on the same examples (in
        different batch positions). Above ``tolerance`` the model's output is not
        reproducible (random operations in eval mode, batch-dependent layers) and the
        check cannot decide: ``conclusive`` is False.
    conclusive : bool
        ``noise <= tolerance``.
    layer : str
        The layer's qualified name in the model (its type when no name is known).
    bypass : tuple of str
        What reaches the output without going through the layer, e.g. ``"inputs"``,
        ``"inputs[1]"``, ``"additional_forward_args[0]"``; ``"head"`` when the given
        head differs from the model although the layer is a cut; ``"unknown"`` when no
        single input explains the difference. Empty for a cut.
    suggestion : str or None
        The name of a module that is a cut on the same pairs: the nearest enclosing
        module (by name), else the first later module in execution order. ``None`` when
        none was found (or for a cut).
    n_pairs : int
        Number of pairs checked.
    message : str
        A sentence for the user (empty for a cut).
    """

    is_cut: bool
    max_error: float
    scale: float
    tolerance: float
    noise: float
    conclusive: bool
    layer: str
    bypass: tuple[str, ...] = ()
    suggestion: str | None = None
    n_pairs: int = 0
    message: str = ""


def default_cut_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` used by :func:`check_cut` for outputs of ``dtype``.

    ``rtol = max(1e-5, 4 * eps)`` (``1e-5`` for float32, ``3.9e-3`` for float16,
    ``3.1e-2`` for bfloat16) and ``atol = rtol / 100``. A replaced layer output reaches the
    rest of the model bit for bit, so at a cut the two runs differ by rounding noise at
    most (in practice not at all: same values, same batch positions, same kernels); what
    bypasses a layer changes the output by a sizeable share of its scale (about 13% of
    the largest logit for a random-weight ResNet-18's ``layer4[0].conv2``).
    """
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps
    rtol = max(1e-5, 4 * eps)
    return rtol, rtol * 1e-2


def _split_values(value: Any) -> tuple[tuple[Tensor, ...], type | None]:
    """A layer's output as a tuple of tensors and the container type (None: one tensor)."""
    if isinstance(value, Tensor):
        return (value,), None
    if isinstance(value, (tuple, list)) and all(isinstance(t, Tensor) for t in value):
        return tuple(value), type(value)
    raise TypeError(
        f"layer: the layer produced a {type(value).__name__}, not a tensor or a tuple of tensors"
    )


def _rebuild(kind: type, values: tuple) -> Any:
    """A tuple, list or named tuple of ``kind`` holding ``values``."""
    return kind(*values) if hasattr(kind, "_fields") else kind(values)


def _run_replaced(
    forward_func: Callable,
    layer: nn.Module,
    args: tuple,
    to_input: bool,
    replace: tuple[Tensor, ...] | None = None,
) -> tuple[tuple[Tensor, ...], type | None, Any]:
    """Run ``forward_func(*args)``; record (and optionally replace) the layer's tensors.

    Returns the layer's tensors as seen (detached clones), their container type (None
    for one tensor) and the output.
    """
    seen: list[tuple[Tensor, ...]] = []
    kinds: list[type | None] = []

    def fwd_hook(module: nn.Module, inp: Any, out: Any) -> Any:
        tensors, kind = _split_values(out)
        kinds.append(kind)
        seen.append(tuple(t.detach().clone() for t in tensors))
        if replace is None:
            return None
        new = tuple(t.clone() for t in replace)
        return new[0] if kind is None else _rebuild(kind, new)

    def pre_hook(module: nn.Module, inp: tuple) -> Any:
        tensors, _ = _split_values(inp)
        kinds.append(tuple if len(tensors) > 1 else None)
        seen.append(tuple(t.detach().clone() for t in tensors))
        return None if replace is None else tuple(t.clone() for t in replace)

    handle = (
        layer.register_forward_pre_hook(pre_hook)
        if to_input
        else layer.register_forward_hook(fwd_hook)
    )
    try:
        output = forward_func(*args)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ValueError(
            "layer: the given layer was not called during the forward pass"
            if not seen
            else f"layer: the given layer is called {len(seen)} times in one forward "
            "pass; choose a module that is used once"
        )
    return seen[0], kinds[0], output


def _flat_output(output: Any, n: int) -> Tensor:
    if not isinstance(output, Tensor):
        raise TypeError(not_scores(output))
    if output.dim() == 0 or output.shape[0] != n:
        raise ValueError(
            "forward_func must return one row of scores per example, got shape "
            f"{tuple(output.shape)} for {n} examples"
        )
    return output.detach().reshape(n, -1)


def _take(values: tuple, index: Tensor, positions: list[int] | None = None) -> tuple:
    """Rows ``index`` of the tensors at ``positions`` (all when None); others unchanged."""
    pos = range(len(values)) if positions is None else positions
    return tuple(v[index] if i in pos else v for i, v in enumerate(values))


def _max_diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    d = (a.double() - b.double()).abs()
    return float(d.max()) if d.numel() else 0.0


def _root_and_names(forward_func: Callable, tracer: _Tracer | None) -> nn.Module | None:
    """The module whose names are used: the model, a bound method's module, or the
    single module a plain function calls at the top level."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    if tracer is not None:
        tops = {id(m): m for m in tracer.depth0}
        if len(tops) == 1:
            return next(iter(tops.values()))
    return None


def _name_in(root: nn.Module | None, module: nn.Module) -> str | None:
    if root is None:
        return None
    for name, m in root.named_modules():
        if m is module:
            return name or None
    return None


def _bypass_message(layer_name: str, bypass: tuple[str, ...], n_args: int) -> str:
    parts = []
    ins = [b for b in bypass if b.startswith("inputs")]
    extra = [b for b in bypass if b.startswith("additional_forward_args")]
    if ins:
        which = "the model's inputs" if ins == ["inputs"] else ", ".join(ins)
        parts.append(
            f"{which} reach the output around the layer (a skip connection or residual "
            "addition after it, or its output combined with an earlier activation)"
        )
    if extra:
        parts.append(
            f"{', '.join(extra)} enter the model after the layer (an extra per-example "
            "input such as metadata or a second image joins later)"
        )
    if "head" in bypass:
        parts.append(
            "the given head does not compute what the model computes after the layer "
            "(head(layer output of B) differs from the model's output on B)"
        )
    if "unknown" in bypass:
        parts.append(
            "the output is not a function of the layer's output alone (no single input "
            "explains the difference)"
        )
    return "; ".join(parts)


def check_cut(
    forward_func: Callable,
    layer: nn.Module,
    inputs: Any,
    additional_forward_args: Any = None,
    attribute_to_layer_input: bool = False,
    head: Callable | None = None,
    n_pairs: int = 4,
    rtol: float | None = None,
    atol: float | None = None,
    suggest: bool = True,
) -> CutCheck:
    """Check that the model's output depends on its input through ``layer`` alone.

    Representative interpretations treat the part of the model after ``layer`` (the
    head) as a function of the layer's output. That holds when every path from the
    input to the output passes through the layer: the layer is a *cut*. A layer inside a
    residual block (before the addition), a layer after which another per-example input
    enters (metadata, a second image), or one whose output is later combined with an
    earlier activation is not; the regions, members and purities computed there are
    then wrong without any error.

    The check: for pairs ``(A, B)`` of examples from ``inputs`` (``B`` is the next example
    after ``A``, cyclically, among the first ``max(2, n_pairs)``), the model is run on
    ``A`` with the layer's output replaced by its output on ``B`` (a forward hook, or a
    forward pre-hook with ``attribute_to_layer_input``) and compared with the model's
    output on ``B``. With ``head``, ``head(layer output of B)`` is compared with the
    model's output on ``B`` instead. When the check fails, further runs find what
    bypasses the layer: each input tensor of ``A`` and each per-example tensor of
    ``additional_forward_args`` of ``A`` is put back alone into an otherwise-``B`` run.

    The model runs in eval mode (every module's flag restored after) under
    ``torch.no_grad()``; hooks are removed in ``finally``.

    Parameters
    ----------
    forward_func : callable or nn.Module
        The model, returning one row of scores per example.
    layer : nn.Module
        The layer to split at, called once per forward pass.
    inputs : Tensor or tuple of Tensor
        At least two examples, batch first (different from each other: identical
        examples cannot show a bypass).
    additional_forward_args : any, optional
        Extra arguments of ``forward_func``, as in Captum; tensors whose first dimension
        is the number of examples are per-example and are swapped with them.
    attribute_to_layer_input : bool
        Check the layer's input instead of its output.
    head : callable, optional
        A user head ``head(layer_output) -> scores`` to check instead of the model's
        own computation after the layer.
    n_pairs : int
        Number of pairs (at least 2 examples are used; at most the batch size).
    rtol, atol : float, optional
        Tolerance ``atol + rtol * scale`` on the largest absolute difference of an output
        value, ``scale`` the largest absolute output value. Default:
        :func:`default_cut_tolerance` of the output's dtype.
    suggest : bool
        When the layer is not a cut, look for a module that is (enclosing modules first,
        then later modules in execution order; at most 12 more checks).

    Returns
    -------
    CutCheck

    Raises
    ------
    ValueError
        Fewer than two examples, a layer that is not called exactly once, an output
        without one row per example.
    TypeError
        Arguments of the wrong type.

    Examples
    --------
    >>> check = check_cut(model, model.layer4[0].conv2, images[:8])
    >>> check.is_cut, check.bypass, check.suggestion
    (False, ('inputs',), 'layer4.0')
    """
    if not callable(forward_func):
        raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be a torch.nn.Module, got {type(layer).__name__}")
    if head is not None and not callable(head):
        raise TypeError(f"head must be callable or None, got {type(head).__name__}")
    if not isinstance(attribute_to_layer_input, bool):
        raise TypeError("attribute_to_layer_input must be a bool")
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise ValueError(f"n_pairs must be a positive int, got {n_pairs!r}")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and (not isinstance(v, (int, float)) or v < 0 or math.isnan(v)):
            raise ValueError(f"{name} must be a non-negative number or None, got {v!r}")
    forward_func = uncompiled(forward_func)
    inputs = format_inputs(inputs, "inputs")
    n_all = inputs[0].shape[0]
    if n_all < 2:
        raise ValueError(f"inputs: the cut check needs at least two examples, got {n_all}")
    extra: tuple = ()
    if additional_forward_args is not None:
        extra = (
            tuple(additional_forward_args)
            if isinstance(additional_forward_args, tuple)
            else (additional_forward_args,)
        )
    m = min(n_all, max(2, n_pairs))
    first = torch.arange(m)
    per_ex = per_example(extra, n_all)
    device = model_device(forward_func, layer)
    xs = tuple(t[first] for t in inputs)
    ex = _take(extra, first, per_ex)
    if device is not None:
        xs = tuple(t.to(device) for t in xs)
        ex = tuple(a.to(device) if i in per_ex else a for i, a in enumerate(ex))
    nxt = torch.roll(torch.arange(m), -1).to(xs[0].device)  # B of pair i is example i+1

    roots = tuple(r for r in (forward_func, layer, head) if isinstance(r, nn.Module))
    with eval_mode(*roots), torch.no_grad():
        return _check(
            forward_func,
            layer,
            xs,
            ex,
            per_ex,
            nxt,
            attribute_to_layer_input,
            head,
            rtol,
            atol,
            suggest,
        )


def _check(
    forward_func: Callable,
    layer: nn.Module,
    xs: tuple[Tensor, ...],
    ex: tuple,
    per_ex: list[int],
    nxt: Tensor,
    to_input: bool,
    head: Callable | None,
    rtol: float | None,
    atol: float | None,
    suggest: bool,
    layer_name: str | None = None,
    quick: bool = False,
) -> CutCheck:
    m = xs[0].shape[0]
    psi_a, kind, out_a = _run_replaced(forward_func, layer, (*xs, *ex), to_input)
    out_a = _flat_output(out_a, m)
    xs_b = _take(xs, nxt)
    ex_b = _take(ex, nxt, per_ex)
    psi_b = _take(psi_a, nxt)
    out_b = _flat_output(forward_func(*xs_b, *ex_b), m)
    noise = _max_diff(out_b, out_a[nxt])
    scale = float(torch.cat([out_a.abs().flatten(), out_b.abs().flatten()]).max())
    d_rtol, d_atol = default_cut_tolerance(out_b.dtype)
    tol = (d_atol if atol is None else atol) + (d_rtol if rtol is None else rtol) * scale

    def replaced(x_in: tuple, e_in: tuple) -> Tensor:
        _, _, out = _run_replaced(forward_func, layer, (*x_in, *e_in), to_input, psi_b)
        return _flat_output(out, m)

    if head is not None:
        given = psi_b[0] if kind is None else _rebuild(kind, psi_b)
        out_h = head(given)
        if not isinstance(out_h, Tensor):
            raise TypeError(f"head must return a tensor, got {type(out_h).__name__}")
        error = _max_diff(out_h.detach().reshape(m, -1), out_b)
    else:
        error = _max_diff(replaced(xs, ex), out_b)

    root = None
    if layer_name is None:
        root = _root_and_names(forward_func, None)
        layer_name = _name_in(root, layer) or type(layer).__name__
    conclusive = noise <= tol
    if error <= tol or quick:
        return CutCheck(error <= tol, error, scale, tol, noise, conclusive, layer_name, n_pairs=m)

    # what bypasses the layer: put back one of A's tensors at a time into a B run
    bypass: list[str] = []
    model_error = error if head is None else _max_diff(replaced(xs, ex), out_b)
    if model_error <= tol:
        bypass.append("head")
    else:
        for i in range(len(xs)):
            mixed = tuple(xs[j] if j == i else xs_b[j] for j in range(len(xs)))
            if _max_diff(replaced(mixed, ex_b), out_b) > tol:
                bypass.append("inputs" if len(xs) == 1 else f"inputs[{i}]")
        for i in per_ex:
            mixed_e = tuple(ex[j] if j == i else ex_b[j] for j in range(len(ex)))
            if _max_diff(replaced(xs_b, mixed_e), out_b) > tol:
                name = (
                    "additional_forward_args" if len(ex) == 1 else f"additional_forward_args[{i}]"
                )
                bypass.append(name)
        if not bypass:
            bypass.append("unknown")

    suggestion = None
    if suggest and model_error > tol:
        suggestion = _suggest(forward_func, layer, xs, ex, per_ex, nxt, to_input, rtol, atol)
    msg = (
        f"layer {layer_name!r} is not a cut of the model: "
        f"{_bypass_message(layer_name, tuple(bypass), len(ex))}. Changing the layer's "
        f"output from one example's to another's changed the output by up to {error:.3g} "
        f"(scale {scale:.3g}, tolerance {tol:.3g}), so regions computed at this layer "
        "would mix the seed's bypass values into every boundary and their members, "
        "purity and heat maps would be wrong."
    )
    if suggestion is not None:
        msg += (
            f" Split at {suggestion!r} instead, which is a cut on the same examples (its "
            "head may still be curved, e.g. SiLU or squeeze-and-excitation in later "
            "blocks: find_layer(model, inputs) picks the last cut whose head is piecewise "
            "linear)."
        )
    elif "head" not in bypass:
        msg += " Split at the output of the enclosing block (after the addition or the join)."
    if not conclusive:
        msg += (
            f" Note: two plain runs of the model on the same examples already differ by "
            f"{noise:.3g} (random operations in eval mode or batch-dependent layers), so "
            "this check is not conclusive."
        )
    return CutCheck(
        False,
        error,
        scale,
        tol,
        noise,
        conclusive,
        layer_name,
        tuple(bypass),
        suggestion,
        m,
        msg,
    )


_MAX_SUGGESTION_CHECKS = 12


def _suggest(
    forward_func: Callable,
    layer: nn.Module,
    xs: tuple[Tensor, ...],
    ex: tuple,
    per_ex: list[int],
    nxt: Tensor,
    to_input: bool,
    rtol: float | None,
    atol: float | None,
) -> str | None:
    """The nearest enclosing module that is a cut, else the first later one."""
    tracer = _trace(forward_func, (*xs, *ex), forward_func)
    root = _root_and_names(forward_func, tracer)
    if root is None:
        return None
    names = {id(mod): name for name, mod in root.named_modules()}
    layer_name = names.get(id(layer))
    if layer_name is None or id(layer) not in tracer.starts:
        return None
    once = {
        i
        for i, ends in tracer.ends.items()
        if len(ends) == 1 and len(tracer.starts.get(i, ())) == 1
    }

    def usable(mod: nn.Module) -> bool:
        out = tracer.outputs.get(id(mod))
        if id(mod) not in once or mod is root or out is tracer.result:
            return False
        try:
            _split_values(out)
        except TypeError:
            return False
        return True

    ancestors = []
    parts = layer_name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        mod = root.get_submodule(".".join(parts[:k]))
        if usable(mod):
            ancestors.append(mod)
    start = tracer.starts[id(layer)][0]
    end = tracer.ends[id(layer)][-1]
    later = [
        mod
        for mod in tracer.modules.values()
        if usable(mod)
        and tracer.starts[id(mod)][0] > (start if to_input else end)
        and all(mod is not a for a in ancestors)
    ]
    later.sort(key=lambda mod: tracer.ends[id(mod)][0])
    if to_input and usable(layer):
        later.insert(0, layer)
    for mod in (ancestors + later)[:_MAX_SUGGESTION_CHECKS]:
        check = _check(
            forward_func,
            mod,
            xs,
            ex,
            per_ex,
            nxt,
            False,
            None,
            rtol,
            atol,
            False,
            layer_name=names.get(id(mod), ""),
            quick=True,
        )
        if check.is_cut and check.conclusive:
            return names.get(id(mod))
    return None


def warn_or_raise_not_cut(
    check: CutCheck, error: bool = True, stacklevel: int | None = None
) -> None:
    """Act on a :class:`CutCheck`: nothing for a cut, else raise or warn.

    Parameters
    ----------
    check : CutCheck
        From :func:`check_cut`.
    error : bool
        Raise :class:`NotACutError` (a ValueError) when the check is conclusive and
        fails. When False, or when the check is not conclusive (the model's output is not
        reproducible), a :class:`NotACutWarning` is given instead.
    stacklevel : int, optional
        Passed to :func:`warnings.warn` (default: the first frame outside this
        package, the user's call).
    """
    if not isinstance(check, CutCheck):
        raise TypeError(f"check must be a CutCheck, got {type(check).__name__}")
    if check.is_cut:
        return
    if error and check.conclusive:
        raise NotACutError(check.message)
    if stacklevel is None:
        stacklevel = caller_stacklevel()
    warnings.warn(check.message, NotACutWarning, stacklevel=stacklevel)
