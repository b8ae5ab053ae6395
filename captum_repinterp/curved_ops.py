"""Which torch calls bend a head: the tables and the rule the head trace applies.

A call is *curved in* a tensor when its result is not a piecewise-linear function of that
tensor. :func:`curved_in` answers for one call, given a function that tells which sources
(module outputs, see :mod:`captum_repinterp.tracing`) each argument depends on:

- a function in ``CURVED_OPS`` (``sigmoid``, ``exp``, ``layer_norm``, ``cos``, an
  attention block, ...) is curved in every source of its arguments;
- a product (``PRODUCT_OPS``: ``mul``, ``matmul``, a convolution, ...) is curved in the
  sources both factors depend on (a squeeze-and-excitation gate ``f * g(f)``);
- a division (``DIVISION_OPS``) is curved in the sources of its divisor, unless it
  rounds (``rounding_mode``: piecewise constant);
- a piecewise-linear call with a jump (``threshold`` whose ``value`` is not its
  threshold, ``hardshrink``) is counted with them: a boundary found at a jump is no
  linear piece of the logits' difference;
- ``batch_norm`` with batch statistics (``training=True``, also a batch norm without
  running statistics in eval mode) is curved in its input;
- reading a value into Python (``item``, ``float(t)``, ``numpy``) is reported too: what
  the model does with it cannot be followed.

Names are compared after :func:`normalise`: in-place forms (``cos_``, ``__imul__``),
ATen overloads (``tanh.default``), ``torch.special`` names and aliases (``expit``,
``arctan``) map to one name. Results of piecewise-constant calls (``sign``, ``floor``,
comparisons: any integer or boolean result) carry no dependence (:func:`propagates`), so
``f * (f > 0)`` is a ReLU, not a product of two dependent tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = [
    "CURVED_OPS",
    "DIVISION_OPS",
    "FINAL_MONOTONE_OPS",
    "PRODUCT_OPS",
    "curved_in",
    "normalise",
    "propagates",
    "tensors_in",
]

#: Functions (after :func:`normalise`) that are not piecewise linear in their tensor
#: arguments. A softmax, log-softmax or sigmoid that produces the model's output is not
#: counted by the trace (``FINAL_MONOTONE_OPS``).
CURVED_OPS = frozenset(
    {
        # activations and normalisations
        "sigmoid", "tanh", "gelu", "silu", "elu", "selu", "celu", "softmax", "softmin",
        "log_softmax", "softplus", "mish", "hardswish", "logsigmoid", "softsign",
        "tanhshrink", "glu", "gumbel_softmax", "layer_norm", "group_norm",
        "instance_norm", "normalize", "local_response_norm", "rms_norm",
        "scaled_dot_product_attention", "multi_head_attention_forward",
        "lp_pool1d", "lp_pool2d", "lp_pool3d",
        # elementary functions
        "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "xlogy", "xlog1py",
        "erf", "erfc", "erfinv", "sqrt", "rsqrt", "pow", "float_power", "square",
        "reciprocal", "logit", "sinc", "lgamma", "digamma", "polygamma", "mvlgamma",
        "i0", "i0e", "i1", "i1e", "ndtr", "ndtri", "log_ndtr", "entr", "erfcx",
        "cos", "sin", "tan", "acos", "asin", "atan", "atan2", "cosh", "sinh", "asinh",
        "acosh", "atanh", "hypot", "ldexp", "polar", "frexp",
        # reductions that are not linear
        "norm", "vector_norm", "matrix_norm", "frobenius_norm", "nuclear_norm", "dist",
        "pdist", "cdist", "cosine_similarity", "pairwise_distance", "logsumexp",
        "logaddexp", "logaddexp2", "logcumsumexp", "std", "var", "std_mean", "var_mean",
        "cov", "corrcoef", "renorm", "prod", "cumprod",
        # linear algebra of one matrix
        "inv", "pinv", "solve", "det", "slogdet", "logdet", "cholesky", "eigh", "eig",
        "svd", "qr", "lstsq", "matrix_exp", "matrix_power", "multi_dot",
    }
)  # fmt: skip

#: Operations that change neither the predicted class nor the decision boundaries when
#: they produce the model's output: softmax is strictly increasing in each logit with the
#: same normaliser for all classes, so ``softmax(z)_c > softmax(z)_c'`` exactly where
#: ``z_c > z_c'``; log-softmax shifts every logit of a row alike; sigmoid is one
#: strictly increasing function applied to every class alike. Anywhere else they count.
FINAL_MONOTONE_OPS = frozenset({"softmax", "log_softmax", "sigmoid"})

#: Bilinear functions and the positions of their two factors: curved in what both factors
#: depend on (a gate ``f * g(f)``, ``f @ f.T``, a convolution whose weight is computed
#: from the features); with one factor constant they are linear. ``()``: every tensor.
PRODUCT_OPS: dict[str, tuple[int, ...]] = {
    **dict.fromkeys(
        (
            "mul", "__mul__", "__rmul__", "multiply", "matmul", "__matmul__",
            "__rmatmul__", "mm", "bmm", "mv", "dot", "vdot", "inner", "outer", "ger",
            "kron", "tensordot", "vecdot", "cross", "linear", "bilinear", "grid_sample",
            "conv1d", "conv2d", "conv3d",
            "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
        ),
        (0, 1),
    ),
    **dict.fromkeys(("addcmul", "addmm", "addbmm", "baddbmm", "addmv", "addr"), (1, 2)),
    "einsum": (),
}  # fmt: skip

#: Divisions and the position of the divisor (``__rtruediv__(a, b)`` computes ``b / a``,
#: ``__rpow__(a, b)`` computes ``b ** a``: curved in ``a``).
DIVISION_OPS: dict[str, int] = {
    **dict.fromkeys(("div", "__truediv__", "true_divide", "divide"), 1),
    "__rtruediv__": 0,
    "__rdiv__": 0,
    "__rpow__": 0,
    "addcdiv": 2,
}

#: Calls whose result is piecewise constant in their arguments: it carries no dependence.
PIECEWISE_CONSTANT_OPS = frozenset(
    {"sign", "sgn", "signbit", "heaviside", "floor", "ceil", "round", "trunc", "fix"}
)

#: Calls that read a tensor's values into Python, where the trace cannot follow them.
PYTHON_VALUE_OPS = frozenset({"item", "tolist", "numpy", "__float__", "__int__", "__index__"})

#: Other names of the same functions.
_ALIASES = {
    "expit": "sigmoid",
    "arctan": "atan",
    "arctan2": "atan2",
    "arcsin": "asin",
    "arccos": "acos",
    "arctanh": "atanh",
    "arcsinh": "asinh",
    "arccosh": "acosh",
    "psi": "digamma",
    "gammaln": "lgamma",
    "multigammaln": "mvlgamma",
    "__pow__": "pow",
    "absolute": "abs",
    "subtract": "sub",
}

#: Keyword names of the positional operands (``torch.mul(input=a, other=b)``).
_OPERAND_KEYWORDS = ("input", "other", "weight", "tensor1", "tensor2", "mat1", "mat2")


def normalise(name: str) -> str:
    """One name per function: ``"cos_"``, ``"cos.default"``, ``"special_cos"`` ->
    ``"cos"``; ``"__imul__"`` -> ``"__mul__"``; ``"_softmax"`` -> ``"softmax"``;
    ``"linalg_inv"`` -> ``"inv"``; aliases (``"expit"``) -> the common name."""
    name = name.split(".")[0]
    if name.startswith("__i") and name.endswith("__") and name != "__index__":
        name = "__" + name[3:]
    elif not name.startswith("__"):
        name = name.strip("_")
        for prefix in ("special_", "linalg_"):
            if name.startswith(prefix):
                name = name[len(prefix) :]
    return _ALIASES.get(name, name)


def tensors_in(obj: Any) -> list[Tensor]:
    """The tensors in ``obj`` (nested tuples, lists and dict values)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in tensors_in(o)]
    return []


def _operands(name: str, args: tuple, kwargs: dict) -> list[Any]:
    operands = list(args)
    if name == "einsum":
        return tensors_in(operands[1:])
    return operands + [kwargs[k] for k in _OPERAND_KEYWORDS if k in kwargs]


def _arg(args: tuple, kwargs: dict, i: int, key: str) -> Any:
    return args[i] if i < len(args) else kwargs.get(key)


def _jump(name: str, args: tuple, kwargs: dict) -> str:
    """How to name a piecewise-linear call that is not continuous (``""``: it is).

    ``threshold(x, th, value)`` jumps from ``value`` to ``th`` at ``th`` unless the two
    are equal (then it is a shifted ReLU); ``hardshrink(x, lambd)`` jumps from 0 to
    ``+-lambd`` at ``+-lambd``. A boundary found at a jump is not a linear piece of the
    logits' difference: the plane read off there misses it.
    """
    try:
        if name == "threshold":
            th, value = _arg(args, kwargs, 1, "threshold"), _arg(args, kwargs, 2, "value")
            if th is not None and value is not None and float(th) != float(value):
                return f"threshold (a jump from {float(value):g} to {float(th):g})"
        if name == "hardshrink":
            lambd = _arg(args, kwargs, 1, "lambd")
            lambd = 0.5 if lambd is None else float(lambd)
            if lambd != 0:
                return f"hardshrink (jumps at +-{lambd:g})"
    except (TypeError, ValueError, RuntimeError):  # a tensor threshold: not judged
        return ""
    return ""


def curved_in(
    name: str,
    args: tuple,
    kwargs: dict,
    sources: Callable[[Any], frozenset[int]],
) -> tuple[frozenset[int], str]:
    """The sources a call is curved in, and how to name it (``frozenset()``: none).

    Parameters
    ----------
    name : str
        The function's name, normalised (:func:`normalise`).
    args, kwargs
        Its arguments.
    sources : callable
        The sources (an ``int`` per module output) an argument depends on.
    """
    if name in CURVED_OPS:
        return sources((args, kwargs)), name
    if name in PYTHON_VALUE_OPS:
        return sources(args[:1]), f"{name} (a value read into Python, not followed)"
    jump = _jump(name, args, kwargs)
    if jump:
        return sources(args[:1]), jump
    if name == "batch_norm" and bool(_arg(args, kwargs, 5, "training")):
        return sources(args[:1]), "batch_norm (batch statistics)"
    if name in PRODUCT_OPS:
        operands = _operands(name, args, kwargs)
        positions = PRODUCT_OPS[name] or range(len(operands))
        sets = [sources(operands[i]) for i in positions if i < len(operands)]
        twice = frozenset(k for k in frozenset().union(*sets) if sum(k in s for s in sets) > 1)
        return twice, f"{name} (of two tensors that depend on the layer)"
    if name == "lerp":  # start + weight * (end - start): curved in weight and an end
        weight = sources(_arg(args, kwargs, 2, "weight"))
        ends = sources(args[:2])
        return weight & ends, "lerp (with a weight that depends on the layer)"
    if name in DIVISION_OPS and kwargs.get("rounding_mode") is None:
        operands = _operands(name, args, kwargs)
        i = DIVISION_OPS[name]
        divisor = sources(operands[i]) if i < len(operands) else frozenset()
        return divisor, f"{name} (by a tensor that depends on the layer)"
    return frozenset(), ""


def propagates(name: str, kwargs: dict) -> bool:
    """Whether the call's floating-point results depend on what its arguments depend on
    (not for piecewise-constant calls: ``sign``, ``floor``, a rounding division)."""
    if name in PIECEWISE_CONSTANT_OPS:
        return False
    return not (name in DIVISION_OPS and kwargs.get("rounding_mode") is not None)
