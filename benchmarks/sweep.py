"""Layer choice across torchvision's CNN families: ``python benchmarks/sweep.py``.

For each family (``weights=None``, nothing is downloaded) at a small input size:

1. build the model with 10 classes and re-draw its last linear map so that random
   references spread over the classes (weights standard normal, scaled so that the
   centred logits have standard deviation 4; bias centred on the mean logits of the
   references; SqueezeNet's classifier is a 1x1 convolution followed by a ReLU, so its
   bias is centred and raised by two standard deviations to keep the ReLU open);
2. ``find_layer(model, x[:1])`` picks the split layer;
3. ``check_cut`` on four references says whether it is a cut;
4. ``RepresentativeInterpretation(model, layer).fit(references)``, then ``attribute`` on
   the seed images, compared in shape with Captum's ``LayerGradCam(model, layer)`` at the
   predicted class, and ``interpret`` for the purity of each seed's region on the
   references.

The references and seeds are random images (standard normal, a fixed generator). The
table is printed as Markdown; ``--json`` writes the rows too. ``tests/test_torchvision_sweep.py``
runs the same function per family.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from captum.attr import LayerGradCam
from torch import nn

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.cuts import check_cut
from captum_repinterp.layers import NonPiecewiseLinearWarning, find_layer

#: (family, torchvision constructor, keyword arguments, input side in pixels)
FAMILIES: list[tuple[str, str, dict[str, Any], int]] = [
    ("ResNet", "resnet18", {}, 64),
    ("ResNeXt", "resnext50_32x4d", {}, 64),
    ("Wide ResNet", "wide_resnet50_2", {}, 64),
    ("DenseNet", "densenet121", {}, 64),
    ("MobileNet V2", "mobilenet_v2", {}, 64),
    ("MobileNet V3", "mobilenet_v3_small", {}, 64),
    ("EfficientNet", "efficientnet_b0", {}, 64),
    ("RegNet", "regnet_y_400mf", {}, 64),
    ("ShuffleNet V2", "shufflenet_v2_x0_5", {}, 64),
    ("VGG", "vgg11", {}, 64),
    ("VGG-BN", "vgg11_bn", {}, 64),
    ("GoogLeNet", "googlenet", {"aux_logits": False, "init_weights": True}, 64),
    ("SqueezeNet", "squeezenet1_1", {}, 64),
    ("MNASNet", "mnasnet0_5", {}, 64),
    ("ConvNeXt", "convnext_tiny", {}, 64),
]

#: Families whose head after the picked layer is not piecewise linear (the warning is
#: expected): MobileNet V3's classifier uses Hardswish, ConvNeXt's a LayerNorm.
CURVED_HEADS = {"mobilenet_v3_small", "convnext_tiny"}

N_CLASSES = 10


@dataclass
class Row:
    """One line of the table."""

    family: str
    arch: str
    size: int
    layer: str
    layer_shape: tuple[int, ...]
    is_cut: bool
    cut_error: float
    curved_head: bool
    exact: bool
    head_ops: tuple[str, ...]
    classes: int
    purity: float
    purities: tuple[float, ...]
    coverage: float
    shape_ok: bool
    seconds: float


def _last_map(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The last Linear or Conv2d run by the model, and its input on ``x``."""
    order: list[tuple[nn.Module, torch.Tensor]] = []

    def pre(m: nn.Module, args: tuple) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            order.append((m, args[0].detach()))

    handle = nn.modules.module.register_module_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return order[-1]


def spread_classes(model: nn.Module, x: torch.Tensor, seed: int = 0) -> None:
    """Re-draw the model's last linear map so that ``x`` spreads over the classes."""
    last, inp = _last_map(model, x)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(last.weight.shape, generator=gen)
        last.weight.copy_(w)
        last.bias.zero_()
        out = last(inp)  # N x C (Linear) or N x C x h x w (SqueezeNet's 1x1 conv)
        dims = [0] if out.dim() == 2 else [0, 2, 3]
        mean = out.mean(dims)
        std = float((out - mean.reshape(1, -1, *[1] * (out.dim() - 2))).std())
        scale = 4.0 / max(std, 1e-12)
        last.weight.mul_(scale)
        bias = -mean * scale
        if isinstance(last, nn.Conv2d):  # followed by a ReLU: keep it open
            bias = bias + 2 * 4.0
        last.bias.copy_(bias)


def build(arch: str, kwargs: dict[str, Any], seed: int = 0) -> nn.Module:
    import torchvision.models as tvm

    torch.manual_seed(seed)
    return getattr(tvm, arch)(weights=None, num_classes=N_CLASSES, **kwargs).eval()


def run_family(
    family: str,
    arch: str,
    kwargs: dict[str, Any],
    size: int,
    n_references: int = 40,
    n_seeds: int = 2,
    n_boundaries: int = 20,
) -> Row:
    """Build, pick a layer, check the cut, fit, attribute and interpret (one family)."""
    start = time.perf_counter()
    model = build(arch, kwargs)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n_references + n_seeds, 3, size, size, generator=gen)
    refs, seeds = x[:n_references], x[n_references:]
    spread_classes(model, refs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NonPiecewiseLinearWarning)
        name, layer = find_layer(model, seeds[:1], return_name=True)
    curved = any(issubclass(w.category, NonPiecewiseLinearWarning) for w in caught)
    check = check_cut(model, layer, refs[:4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonPiecewiseLinearWarning)
        ri = RepresentativeInterpretation(model, layer).fit(
            refs, batch_size=n_references, progress=False
        )
        regions = ri.interpret(seeds, n_boundaries=n_boundaries)
        attr = ri.attribute(seeds[:1], n_boundaries=n_boundaries, heatmap_layer=None)
        default = ri.attribute(seeds[:1], n_boundaries=n_boundaries)  # where "auto" chose
    regions = regions if isinstance(regions, list) else [regions]
    with torch.no_grad():
        pred = model(seeds[:1]).argmax(1)
    grad_cam = LayerGradCam(model, layer).attribute(seeds[:1], target=pred)
    purities = tuple(float(r.purity) for r in regions)
    layer_shape = tuple(ri.layout_.shapes[0])
    return Row(
        family=family,
        arch=arch,
        size=size,
        layer=name,
        layer_shape=layer_shape,
        is_cut=check.is_cut,
        cut_error=check.max_error / max(check.scale, 1e-30),
        curved_head=curved,
        exact=ri.affine_ is not None,
        head_ops=tuple(ri.head_nonlinear_),
        classes=int(ri.predictions_.unique().numel()),
        purity=sum(purities) / len(purities),
        purities=purities,
        coverage=sum(float(r.coverage) for r in regions) / len(regions),
        shape_ok=tuple(attr.shape) == tuple(grad_cam.shape)
        and tuple(default.shape) in (tuple(grad_cam.shape), (1, 1, *seeds.shape[-2:]))
        and bool(torch.isfinite(attr).all() and torch.isfinite(default).all()),
        seconds=time.perf_counter() - start,
    )


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    head = (
        "| family | model | input | layer picked | layer output | cut | curved head "
        "| regions | classes in refs | purity (mean) | coverage (mean) | shape = LayerGradCam "
        "| time (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r.family} | {r.arch} | {r.size}x{r.size} | `{r.layer}` | "
        f"{'x'.join(map(str, r.layer_shape))} | {'yes' if r.is_cut else 'NO'} | "
        f"{'yes' if r.curved_head else 'no'} | {'exact' if r.exact else 'sampled'} | "
        f"{r.classes} | {r.purity:.2f} | "
        f"{r.coverage:.2f} | {'yes' if r.shape_ok else 'NO'} | {r.seconds:.1f} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="torchvision names to run (default all)")
    parser.add_argument("--references", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--boundaries", type=int, default=20)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    total = time.perf_counter()
    for family, arch, kwargs, size in FAMILIES:
        if args.only and arch not in args.only:
            continue
        rows.append(
            run_family(family, arch, kwargs, size, args.references, args.seeds, args.boundaries)
        )
        print(f"{arch}: {rows[-1].seconds:.1f} s", flush=True)
    print()
    print(table(rows))
    print(f"\n{len(rows)} models, {time.perf_counter() - total:.0f} s in all")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=1)


if __name__ == "__main__":
    main()
