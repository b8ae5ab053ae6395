"""CNNs for tests, tutorials and benchmarks that run offline on a CPU.

Every model is split as ``forward(x) = head(features(x))``, where ``features[-1]`` is
the last convolutional block (the layer that is interpreted) and ``head`` is piecewise
linear (ReLU / PReLU and linear layers only), as representative interpretations need.

* :class:`SmallCNN`, trained on the fly by :func:`train_small_cnn` in seconds, with the
  trained weights cached under ``cache_dir() / "models"``.
* torchvision's ResNet-18 (``weights=None``), trained by :func:`train_resnet18` on
  colour images such as :func:`~captum_repinterp.datasets.make_shapes` in minutes, cached
  the same way (its head, ``layer4`` to the logits, is piecewise linear too).
* :class:`ONet` and :class:`RNet`, re-implementations of the face / non-face networks of
  MTCNN (K. Zhang, Z. Zhang, Z. Li and Y. Qiao, "Joint Face Detection and Alignment
  using Multitask Cascaded Convolutional Networks", IEEE Signal Processing Letters, 2016),
  loaded by :func:`load_onet` and :func:`load_rnet` with the pretrained weights shipped in
  the ``facenet-pytorch`` wheel (https://github.com/timesler/facenet-pytorch, MIT licence,
  Copyright (c) 2019 Timothy Esler; weights converted from D. Sandberg's facenet port of
  the original MTCNN).  The layer layout follows facenet-pytorch's ``models/mtcnn.py``;
  the package itself is never imported, only its ``data/onet.pt`` and ``data/rnet.pt``
  state dicts are read (``pip install --no-deps facenet-pytorch==2.6.0``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_int
from .datasets import _atomic_write, cache_dir
from .store import tensor_sha1

__all__ = [
    "ONet",
    "RNet",
    "SmallCNN",
    "load_onet",
    "load_rnet",
    "train_resnet18",
    "train_small_cnn",
]


# --------------------------------------------------------------------------- SmallCNN
class SmallCNN(nn.Module):
    """A small CNN for 28x28 digit images, ``forward(x) = head(features(x))``.

    Architecture (for a ``1 x 28 x 28`` input; 106,954 parameters with the defaults)::

        features[0]: Conv2d(in, 8, 3, padding=1) - ReLU - MaxPool2d(2)     -> 8 x 14 x 14
        features[1]: Conv2d(8, 16, 3, padding=1) - ReLU - MaxPool2d(2)     -> 16 x 7 x 7
        features[2]: Conv2d(16, 32, 3, padding=1) - ReLU  (no pooling)     -> 32 x 7 x 7
        head:        Flatten - Linear(32 * 7 * 7, 64) - ReLU - Linear(64, n_classes)

    With ``head="pooled"`` the head is global average pooling and one linear layer,
    ``AdaptiveAvgPool2d(1) - Flatten - Linear(32, n_classes)``, the head of the torchvision
    classifiers (ResNets, DenseNets, EfficientNets).

    The narrow early blocks keep training fast on a CPU (most of the cost is in the
    convolutions at full resolution), while the interpreted layer ``features[-1]`` still
    has 32 channels.  The head is piecewise linear, so ``model.features[-1]`` can be
    interpreted with ``model.head`` as the rest of the network.  No ReLU is in-place.

    Parameters
    ----------
    in_channels : int, default 1
        Number of input channels.
    n_classes : int, default 10
        Number of output logits.
    image_size : int, default 28
        Side of the (square) input images; must be divisible by 4.
    channels : tuple of int, default (8, 16, 32)
        Output channels of the three convolutional blocks.
    hidden : int, default 64
        Width of the hidden linear layer of the head.
    head : {"flatten", "pooled"}, default "flatten"
        The head: flatten and two linear layers, or global average pooling and one.

    Raises
    ------
    ValueError
        If ``image_size`` is not divisible by 4 or ``head`` is not one of the two.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 10,
        image_size: int = 28,
        channels: tuple[int, int, int] = (8, 16, 32),
        hidden: int = 64,
        head: str = "flatten",
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        if head not in ("flatten", "pooled"):
            raise ValueError(f'head must be "flatten" or "pooled", got {head!r}')
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU()),
        )
        side = image_size // 4
        if head == "pooled":
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, n_classes)
            )
            return
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits, ``head(features(x))``."""
        return self.head(self.features(x))


def _random_shift(images: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by its own random integer offset in ``[-max_shift, max_shift]``
    along each axis, filling with zeros."""
    if max_shift <= 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)
    rows = torch.arange(h)[None, :] + offsets[0][:, None]
    cols = torch.arange(w)[None, :] + offsets[1][:, None]
    return padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def train_small_cnn(
    images: Tensor,
    labels: Tensor,
    seed: int = 0,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 3e-3,
    cache: bool = True,
    n_classes: int | None = None,
    max_shift: int = 1,
    channels: tuple[int, int, int] = (8, 16, 32),
    head: str = "flatten",
) -> SmallCNN:
    """Train a :class:`SmallCNN` deterministically on the CPU (or load it from the cache).

    Weights are initialised with ``torch.manual_seed(seed)`` inside
    ``torch.random.fork_rng`` (the caller's global RNG is left untouched) and batches
    are shuffled (and augmented with random shifts of up to ``max_shift`` pixels) by a
    ``torch.Generator`` seeded with ``seed``; Adam with a one-cycle learning-rate
    schedule.  The number of torch threads is left as it is.  Two calls with the same
    arguments give bitwise-identical weights on the same machine and thread count.

    Parameters
    ----------
    images : torch.Tensor
        ``N x C x H x W`` float images (``H == W``, divisible by 4).
    labels : torch.Tensor
        ``N`` integer labels in ``0 .. n_classes - 1``.
    seed : int, default 0
        Seed of the initialisation and of the batch order.
    epochs : int, default 8
        Passes over the data.
    batch_size : int, default 64
        Mini-batch size.
    lr : float, default 3e-3
        Peak learning rate of the one-cycle schedule.
    cache : bool, default True
        Load the state dict from ``cache_dir() / "models"`` if a model with the same seed,
        hyperparameters and data (SHA-1 of the tensors' bytes) was trained before, and
        save it there after training.
    n_classes : int, optional
        Number of classes; ``labels.max() + 1`` by default.
    max_shift : int, default 1
        Training images are translated by a random integer offset in
        ``[-max_shift, max_shift]`` pixels along each axis (0 switches this off).
    channels : tuple of int, default (8, 16, 32)
        Output channels of the three convolutional blocks (:class:`SmallCNN`).
    head : {"flatten", "pooled"}, default "flatten"
        The head (:class:`SmallCNN`).

    Returns
    -------
    SmallCNN
        The trained model, on the CPU and in eval mode.
    """
    images, labels, n_classes = _check_training_data(images, labels, n_classes)
    config = {
        "arch": "SmallCNN-v1",  # change this tag when the architecture or training changes
        "in_channels": int(images.shape[1]),
        "n_classes": int(n_classes),
        "image_size": int(images.shape[-1]),
    }

    if tuple(channels) != (8, 16, 32) or head != "flatten":
        # only in the key when not the defaults, so the cached default models keep theirs
        config["channels"] = [int(c) for c in channels]
        config["head"] = str(head)

    def build() -> SmallCNN:
        return SmallCNN(
            config["in_channels"],
            config["n_classes"],
            config["image_size"],
            channels=tuple(channels),
            head=head,
        )

    return _train_cached(
        "smallcnn", config, images, labels, build, cache,
        seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, max_shift=max_shift,
    )  # fmt: skip


def _train_cached(
    prefix: str,
    config: dict,
    images: Tensor,
    labels: Tensor,
    build: Callable[[], nn.Module],
    cache: bool,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    max_shift: int,
) -> nn.Module:
    """Load the model of ``config`` (the architecture's keys) and the data from the
    cache, or train and cache it.

    The key is the SHA-1 of ``config`` with the training hyperparameters added and of the
    tensors' bytes; the weights are initialised under ``torch.manual_seed(seed)`` (the
    caller's RNG is left untouched), and trained on one thread with Adam and a one-cycle
    schedule.
    """
    check_int(batch_size, "batch_size")
    check_int(epochs, "epochs", minimum=0)
    config = {
        **config,
        "seed": int(seed),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "max_shift": int(max_shift),
        "optimizer": "adam-onecycle",
        # one thread: float sums (and so the weights) do not depend on the machine's cores
        "threads": 1,
    }
    path = None
    if cache:
        key_src = json.dumps(config, sort_keys=True) + tensor_sha1(images) + tensor_sha1(labels)
        key = hashlib.sha1(key_src.encode()).hexdigest()[:20]
        path = cache_dir() / "models" / f"{prefix}-{key}.pt"
        if path.is_file():
            with torch.random.fork_rng(devices=[]):  # the caller's RNG is left untouched
                model = build()
            try:
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                return model.eval()
            except (RuntimeError, OSError, EOFError, ValueError):
                pass  # corrupt or stale file: retrain and overwrite

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(images)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch)
    )
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_epochs(model, images, labels, epochs, batch_size, max_shift, gen, opt, sched)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    _warn_if_untrained(model, images, labels, prefix)

    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = model.state_dict()
        _atomic_write(path, lambda f: torch.save(state, f))
    return model


def _warn_if_untrained(model: nn.Module, images: Tensor, labels: Tensor, name: str) -> float:
    """The trained model's accuracy on its training images; a ``UserWarning`` when it is
    less than a quarter of the way from the majority class's share to 1 (a model that
    has learnt little: too few images or epochs)."""
    with torch.no_grad():
        pred = torch.cat([model(images[i : i + 256]).argmax(1) for i in range(0, len(images), 256)])
    accuracy = float((pred == labels).float().mean())
    majority = float(labels.bincount().max()) / len(labels)
    if accuracy < majority + 0.25 * (1 - majority):
        warnings.warn(
            f"the trained {name} classifies {accuracy:.1%} of its own training "
            f"images correctly (the largest class is {majority:.1%} of them): it has "
            "learnt little; train on more images or for more epochs",
            UserWarning,
            stacklevel=4,  # the user's call of train_small_cnn / train_resnet18
        )
    return accuracy


def _check_training_data(
    images: Tensor, labels: Tensor, n_classes: int | None
) -> tuple[Tensor, Tensor, int]:
    """The images (float32), labels (int64) and number of classes of a training call.

    Raises
    ------
    TypeError, ValueError
        Naming the argument: not tensors, shapes or lengths that do not fit, no images,
        non-finite images, labels that are not integers in ``0 .. n_classes - 1``.
    """
    for name, t in (("images", images), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise ValueError("labels must be integer class indices")
    images = images.detach().to("cpu", torch.float32).contiguous()
    labels = labels.detach().to("cpu", torch.int64).reshape(-1).contiguous()
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be N x C x H x H, got shape {tuple(images.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("images: no images to train on")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images must be finite (no NaN or inf)")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ValueError(f"labels must be class indices >= 0, got {lo}")
    n_classes = check_int(hi + 1 if n_classes is None else n_classes, "n_classes")
    if hi >= n_classes:
        raise ValueError(f"labels must be in 0 .. {n_classes - 1} (n_classes), got {lo} .. {hi}")
    return images, labels, n_classes


def train_resnet18(
    images: Tensor,
    labels: Tensor,
    seed: int = 0,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 1e-3,
    cache: bool = True,
    n_classes: int | None = None,
    max_shift: int = 2,
) -> nn.Module:
    """Train torchvision's ResNet-18 (``weights=None``) deterministically on the CPU, or
    load it from the cache.

    The same procedure as :func:`train_small_cnn` (seeded initialisation inside
    ``torch.random.fork_rng``, seeded batch order and random shifts, Adam with a
    one-cycle schedule, one thread, cached under ``cache_dir() / "models"``). Nothing is
    downloaded. K. He, X. Zhang, S. Ren and J. Sun, "Deep Residual Learning for Image
    Recognition", CVPR 2016, arXiv:1512.03385.

    Parameters
    ----------
    images : torch.Tensor
        ``N x 3 x H x W`` float images (``H == W``).
    labels : torch.Tensor
        ``N`` integer labels in ``0 .. n_classes - 1``.
    seed, epochs, batch_size, lr, cache, n_classes, max_shift
        As in :func:`train_small_cnn` (defaults: 3 epochs, peak learning rate 1e-3,
        shifts of up to 2 pixels).

    Returns
    -------
    torchvision.models.ResNet
        The trained model, on the CPU and in eval mode.

    Raises
    ------
    ValueError
        If ``images`` is not ``N x 3 x H x H`` (at least 2 images, finite), the lengths
        differ, or a label is not in ``0 .. n_classes - 1``. A last mini-batch of one
        image is skipped (batch normalisation cannot train on it; the image is in other
        epochs' batches).
    ImportError
        If torchvision is not installed (``pip install captum-repinterp[vision]``).
    """
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(
            "train_resnet18 needs torchvision: pip install captum-repinterp[vision]"
        ) from err
    images, labels, n_classes = _check_training_data(images, labels, n_classes)
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 channels, got shape {tuple(images.shape)}")
    if len(images) < 2:
        raise ValueError("images: batch normalisation needs at least 2 images to train on")
    config = {
        "arch": "torchvision-resnet18-v1",
        "torchvision": torchvision.__version__.split("+")[0],
        "n_classes": int(n_classes),
        "image_size": int(images.shape[-1]),
    }

    def build() -> nn.Module:
        return torchvision.models.resnet18(weights=None, num_classes=int(n_classes))

    return _train_cached(
        "resnet18", config, images, labels, build, cache,
        seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, max_shift=max_shift,
    )  # fmt: skip


# ------------------------------------------------------------------------ MTCNN nets
class Permute(nn.Module):
    """Permute the dimensions of a tensor (a module, so that it can sit in a Sequential)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x.permute(*dims)``."""
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


def _block(*named: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(named))


def _mtcnn_head(in_features: int, hidden: int, dense: str, prelu: str, out: str) -> nn.Sequential:
    # The converted Caffe/TensorFlow weights expect the conv output flattened in
    # (N, W, H, C) order: facenet-pytorch does ``x.permute(0, 3, 2, 1)`` before ``view``.
    return _block(
        ("permute", Permute(0, 3, 2, 1)),
        ("flatten", nn.Flatten()),
        (dense, nn.Linear(in_features, hidden)),
        (prelu, nn.PReLU(hidden)),
        (out, nn.Linear(hidden, 2)),
    )


class _MTCNNNet(nn.Module):
    """Shared code of :class:`ONet` and :class:`RNet`."""

    #: Keys of the facenet-pytorch state dict that belong to the dropped outputs.
    _unused_keys: tuple[str, ...] = ()

    features: nn.Sequential
    head: nn.Sequential

    def forward(self, x: Tensor) -> Tensor:
        """Return the 2 face-classification logits (index 1 = face), no softmax."""
        return self.head(self.features(x))

    def _facenet_key_map(self) -> dict[str, str]:
        """Map facenet-pytorch key names (``conv1.weight``) to this module's names."""
        return {".".join(k.split(".")[-2:]): k for k in self.state_dict()}

    def load_facenet_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a facenet-pytorch state dict (original key names such as ``conv1.weight``).

        The keys of the bounding-box and landmark outputs are ignored; every key this
        module needs must be present (strict loading of the kept keys), and unknown keys
        raise an error too.

        Parameters
        ----------
        state_dict : Mapping[str, torch.Tensor]
            The state dict of facenet-pytorch's ``ONet`` / ``RNet``; a state dict with
            this module's own key names is accepted as well.
        """
        own = self.state_dict()
        key_map = self._facenet_key_map()
        renamed: dict[str, Tensor] = {}
        unknown = []
        for key, value in state_dict.items():
            if key in own:
                renamed[key] = value
            elif key in key_map:
                renamed[key_map[key]] = value
            elif key not in self._unused_keys:
                unknown.append(key)
        if unknown:
            raise KeyError(f"unexpected keys in the {type(self).__name__} state dict: {unknown}")
        missing = [k for k in own if k not in renamed]
        if missing:
            raise KeyError(f"keys missing from the {type(self).__name__} state dict: {missing}")
        self.load_state_dict(renamed, strict=True)


class ONet(_MTCNNNet):
    """MTCNN's output network (48x48 RGB input), classification branch only.

    ``features`` (for a ``3 x 48 x 48`` input)::

        block1: conv1 Conv2d(3, 32, 3) - prelu1 - pool1 MaxPool2d(3, 2, ceil)  -> 32 x 23 x 23
        block2: conv2 Conv2d(32, 64, 3) - prelu2 - pool2 MaxPool2d(3, 2, ceil) -> 64 x 10 x 10
        block3: conv3 Conv2d(64, 64, 3) - prelu3 - pool3 MaxPool2d(2, 2, ceil) -> 64 x 4 x 4
        block4: conv4 Conv2d(64, 128, 2) - prelu4                               -> 128 x 3 x 3

    ``head``: permute ``(0, 3, 2, 1)`` - flatten - dense5 Linear(1152, 256) - prelu5 -
    dense6_1 Linear(256, 2).  The output is the pair of logits (index 1 = face); the
    bounding-box (``dense6_2``) and landmark (``dense6_3``) outputs are dropped.
    Inputs are scaled as ``(x * 255 - 127.5) * 0.0078125`` for ``x`` in ``[0, 1]``.
    Layer names are those of facenet-pytorch, nested as ``features.block1.conv1`` and
    ``head.dense5``.  Use :func:`load_onet` for the pretrained network.
    """

    _unused_keys = (
        "dense6_2.weight",
        "dense6_2.bias",
        "dense6_3.weight",
        "dense6_3.bias",
    )

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                block1=_block(
                    ("conv1", nn.Conv2d(3, 32, 3)),
                    ("prelu1", nn.PReLU(32)),
                    ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
                ),
                block2=_block(
                    ("conv2", nn.Conv2d(32, 64, 3)),
                    ("prelu2", nn.PReLU(64)),
                    ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
                ),
                block3=_block(
                    ("conv3", nn.Conv2d(64, 64, 3)),
                    ("prelu3", nn.PReLU(64)),
                    ("pool3", nn.MaxPool2d(2, 2, ceil_mode=True)),
                ),
                block4=_block(("conv4", nn.Conv2d(64, 128, 2)), ("prelu4", nn.PReLU(128))),
            )
        )
        self.head = _mtcnn_head(1152, 256, "dense5", "prelu5", "dense6_1")


class RNet(_MTCNNNet):
    """MTCNN's refinement network (24x24 RGB input), classification branch only.

    ``features`` (for a ``3 x 24 x 24`` input)::

        block1: conv1 Conv2d(3, 28, 3) - prelu1 - pool1 MaxPool2d(3, 2, ceil)  -> 28 x 11 x 11
        block2: conv2 Conv2d(28, 48, 3) - prelu2 - pool2 MaxPool2d(3, 2, ceil) -> 48 x 4 x 4
        block3: conv3 Conv2d(48, 64, 2) - prelu3                                -> 64 x 3 x 3

    ``head``: permute ``(0, 3, 2, 1)`` - flatten - dense4 Linear(576, 128) - prelu4 -
    dense5_1 Linear(128, 2).  The output is the pair of logits (index 1 = face); the
    bounding-box output (``dense5_2``) is dropped.  Inputs are scaled as for
    :class:`ONet`.  Use :func:`load_rnet` for the pretrained network.
    """

    _unused_keys = ("dense5_2.weight", "dense5_2.bias")

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                block1=_block(
                    ("conv1", nn.Conv2d(3, 28, 3)),
                    ("prelu1", nn.PReLU(28)),
                    ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
                ),
                block2=_block(
                    ("conv2", nn.Conv2d(28, 48, 3)),
                    ("prelu2", nn.PReLU(48)),
                    ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
                ),
                block3=_block(("conv3", nn.Conv2d(48, 64, 2)), ("prelu3", nn.PReLU(64))),
            )
        )
        self.head = _mtcnn_head(576, 128, "dense4", "prelu4", "dense5_1")


def _facenet_weights(name: str) -> Path:
    install = "pip install --no-deps facenet-pytorch==2.6.0"
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The pretrained MTCNN weights come from the optional package 'facenet-pytorch', "
            f"which is not installed. Install it with `{install}`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"facenet-pytorch is installed but its weight file {path} is missing; "
            f"reinstall it with `{install} --force-reinstall`."
        )
    return path


def load_onet() -> ONet:
    """Build :class:`ONet` with facenet-pytorch's pretrained weights, in eval mode.

    Returns
    -------
    ONet
        The pretrained network (``facenet_pytorch/data/onet.pt``), on the CPU.

    Raises
    ------
    ImportError
        If facenet-pytorch is not installed.
    FileNotFoundError
        If its weight file is missing.
    """
    model = ONet()
    state = torch.load(_facenet_weights("onet"), map_location="cpu", weights_only=True)
    model.load_facenet_state_dict(state)
    return model.eval()


def load_rnet() -> RNet:
    """Build :class:`RNet` with facenet-pytorch's pretrained weights, in eval mode.

    Returns
    -------
    RNet
        The pretrained network (``facenet_pytorch/data/rnet.pt``), on the CPU.

    Raises
    ------
    ImportError
        If facenet-pytorch is not installed.
    FileNotFoundError
        If its weight file is missing.
    """
    model = RNet()
    state = torch.load(_facenet_weights("rnet"), map_location="cpu", weights_only=True)
    model.load_facenet_state_dict(state)
    return model.eval()


def _train_epochs(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    epochs: int,
    batch_size: int,
    max_shift: int,
    gen: torch.Generator,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    n = len(images)
    has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) == 1 and has_batch_norm:
                continue  # batch norm cannot train on one image (seen in other epochs)
            batch = _random_shift(images[idx], max_shift, gen)
            loss = F.cross_entropy(model(batch), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
