"""The explanation methods compared, behind one small interface.

Every method gives heat maps at the input's size (``N x 1 x H x W``) for images and
target classes. Channel-weight methods (Grad-CAM, Grad-CAM++, Score-CAM, HiResCAM) also
split into *weights* computed on a seed and *maps* drawn from those weights on any
image's layer activations, which is what the reuse protocol needs:

- ``gradcam``: Captum's ``LayerGradCam`` (per image); its weights for reuse are the
  spatial means of the target's gradients at the layer, which is what ``LayerGradCam``
  uses (checked in the tests);
- ``gradcam++``, ``scorecam``: ``pytorch_grad_cam``'s ``get_cam_weights``;
- ``hirescam``: ``pytorch_grad_cam.HiResCAM`` has no channel weights: its map is
  ``sum_k G_k * A_k`` with the full gradient tensor ``G``, so the seed's ``G`` (``C x h x
  w``) is what is reused;
- ``ig``: Captum's ``IntegratedGradients`` (per image only; baseline 0, summed over
  channels).

Layer maps are ReLU-ed (as in Grad-CAM) and upsampled bilinearly with
``LayerAttribution.interpolate``; no min-max scaling (it does not change rankings).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerGradCam
from torch import Tensor, nn

from .metrics import upsample

__all__ = [
    "ChannelWeightMethod",
    "GRADCAM_PACKAGE_METHODS",
    "acts_and_grads",
    "channel_weight_methods",
    "gradcam_package_available",
    "integrated_gradients_maps",
]

GRADCAM_PACKAGE_METHODS = ("gradcam++", "scorecam", "hirescam")


def gradcam_package_available() -> bool:
    """Whether ``pytorch_grad_cam`` (``pip install grad-cam``) can be imported."""
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        return False
    return True


def acts_and_grads(
    model: nn.Module, layer: nn.Module, images: Tensor, targets: Tensor, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Layer activations and gradients of the target logits with respect to them.

    Returns two ``N x C x h x w`` float32 CPU tensors. The model must be in eval mode
    (each image's values then do not depend on its batch).
    """
    acts, grads = [], []
    for s in range(0, images.shape[0], batch_size):
        store: list[Tensor] = []

        def hook(_m: nn.Module, _i: tuple, out: Tensor, store: list[Tensor] = store) -> None:
            store.append(out)

        handle = layer.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                logits = model(images[s : s + batch_size])
                a = store[-1]
                sel = logits.reshape(logits.shape[0], -1).gather(
                    1, targets[s : s + batch_size, None].to(logits.device)
                )
                (g,) = torch.autograd.grad(sel.sum(), a)
        finally:
            handle.remove()
        acts.append(a.detach().float().cpu())
        grads.append(g.detach().float().cpu())
    return torch.cat(acts), torch.cat(grads)


def layer_maps(weights: Tensor, acts: Tensor) -> Tensor:
    """``relu(sum_k w_k * A_k)`` for channel weights ``N x C`` or full ``N x C x h x w``."""
    if weights.dim() == 2:
        weights = weights[:, :, None, None]
    return F.relu((weights * acts).sum(dim=1, keepdim=True))


@dataclass
class ChannelWeightMethod:
    """A CAM method as a pair (seed -> weights, weights x activations -> map).

    Attributes
    ----------
    name : str
        Method name used in the results.
    weights_fn : callable
        ``weights_fn(images, targets, acts, grads) -> Tensor`` (``N x C`` channel weights
        or ``N x C x h x w`` elementwise weights).
    attribute_fn : callable, optional
        Per-image maps at layer size (``images, targets -> N x 1 x h x w``) when the
        method has its own implementation (Captum's ``LayerGradCam``); otherwise the
        maps are ``layer_maps(weights_fn(...), acts)``.
    """

    name: str
    model: nn.Module
    layer: nn.Module
    weights_fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    attribute_fn: Callable[[Tensor, Tensor], Tensor] | None = None

    def weights(self, images: Tensor, targets: Tensor) -> Tensor:
        """The weights each image gives (to be reused on other images)."""
        acts, grads = acts_and_grads(self.model, self.layer, images, targets)
        return self.weights_fn(images, targets, acts, grads)

    def reuse(self, weights: Tensor, acts: Tensor, size: tuple[int, int]) -> Tensor:
        """Maps at input ``size`` of (seed) ``weights`` on other images' activations."""
        return upsample(layer_maps(weights, acts), size)

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        """Each image's own map at input size (``N x 1 x H x W``)."""
        if self.attribute_fn is not None:
            maps = self.attribute_fn(images, targets)
        else:
            acts, grads = acts_and_grads(self.model, self.layer, images, targets)
            maps = layer_maps(self.weights_fn(images, targets, acts, grads), acts)
        return upsample(maps.detach().float().cpu(), tuple(images.shape[-2:]))


def _gradcam_weights(_x: Tensor, _t: Tensor, _a: Tensor, grads: Tensor) -> Tensor:
    return grads.mean(dim=(2, 3))


def _hirescam_weights(_x: Tensor, _t: Tensor, _a: Tensor, grads: Tensor) -> Tensor:
    return grads


def _package_weights(cam: object, layer: nn.Module) -> Callable:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def fn(images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor) -> Tensor:
        tg = [ClassifierOutputTarget(int(t)) for t in targets]
        # Score-CAM prints a tqdm bar per image; keep the output clean
        with contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
            w = cam.get_cam_weights(images, [layer], tg, acts.numpy(), grads.numpy())
        return torch.as_tensor(np.asarray(w), dtype=torch.float32)

    return fn


def channel_weight_methods(
    model: nn.Module, layer: nn.Module, include_package: bool = True
) -> list[ChannelWeightMethod]:
    """Grad-CAM (Captum) and, when ``grad-cam`` is installed, Grad-CAM++, Score-CAM, HiResCAM.

    When ``include_package`` is true but the package is missing, a message is printed and
    only Grad-CAM is returned.
    """
    lgc = LayerGradCam(model, layer)

    def gradcam_attr(images: Tensor, targets: Tensor) -> Tensor:
        return lgc.attribute(images, target=targets.tolist(), relu_attributions=True)

    methods = [ChannelWeightMethod("gradcam", model, layer, _gradcam_weights, gradcam_attr)]
    if not include_package:
        return methods
    if not gradcam_package_available():
        print(
            "grad-cam (pytorch_grad_cam) is not installed: skipping Grad-CAM++, Score-CAM "
            "and HiResCAM (pip install 'captum_repinterp[eval]')"
        )
        return methods
    from pytorch_grad_cam import GradCAMPlusPlus, ScoreCAM

    for name, cls in (("gradcam++", GradCAMPlusPlus), ("scorecam", ScoreCAM)):
        cam = cls(model, [layer])
        cam.activations_and_grads.release()  # we feed activations ourselves
        cam.batch_size = 256
        methods.append(ChannelWeightMethod(name, model, layer, _package_weights(cam, layer)))
    methods.append(ChannelWeightMethod("hirescam", model, layer, _hirescam_weights))
    return methods


def integrated_gradients_maps(
    model: nn.Module, images: Tensor, targets: Tensor, n_steps: int = 32
) -> Tensor:
    """Captum ``IntegratedGradients`` (baseline 0) summed over channels: ``N x 1 x H x W``."""
    ig = IntegratedGradients(model)
    attr = ig.attribute(
        images,
        baselines=0.0,
        target=targets.tolist(),
        n_steps=n_steps,
        internal_batch_size=256,
    )
    return attr.detach().sum(dim=1, keepdim=True).float().cpu()
