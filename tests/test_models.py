"""Tests of ``captum_repinterp.models``: SmallCNN, its training, and MTCNN's ONet / RNet."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from captum_repinterp import models
from captum_repinterp.datasets import load_digits, load_faces, load_mnist5k, split_indices
from captum_repinterp.models import ONet, RNet, SmallCNN, load_onet, load_rnet, train_small_cnn

needs_facenet = pytest.mark.skipif(
    importlib.util.find_spec("facenet_pytorch") is None,
    reason="facenet-pytorch is not installed (pip install --no-deps facenet-pytorch==2.6.0)",
)
needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mlxtend is not installed (pip install --no-deps mlxtend)",
)

PIECEWISE_LINEAR = (nn.Flatten, nn.Linear, nn.ReLU, nn.PReLU, models.Permute)


def _head_is_piecewise_linear(head: nn.Module) -> bool:
    return all(isinstance(m, PIECEWISE_LINEAR) for m in head.children())


# -------------------------------------------------------------------------- SmallCNN
def test_small_cnn_shapes_and_split() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.rand(5, 1, 28, 28)
    feats = model.features(x)
    assert feats.shape == (5, 32, 7, 7)
    assert model.features[-1](model.features[:-1](x)).shape == (5, 32, 7, 7)
    with torch.no_grad():
        assert torch.equal(model.head(model.features(x)), model(x))
    assert model(x).shape == (5, 10)
    assert sum(p.numel() for p in model.parameters()) == 106_954
    assert len(model.features) == 3
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.features[-1])
    assert _head_is_piecewise_linear(model.head)
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_small_cnn_options() -> None:
    model = SmallCNN(in_channels=3, n_classes=4, image_size=16)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 4)
    with pytest.raises(ValueError):
        SmallCNN(image_size=30)
    with pytest.raises(ValueError, match="head"):
        SmallCNN(head="dense")


def test_small_cnn_pooled_head_averages_each_channel() -> None:
    """``head="pooled"``: the logits are the linear layer of each channel's mean (a
    hand computation), so moving the features around within a channel changes nothing."""
    torch.manual_seed(0)
    model = SmallCNN(channels=(4, 8, 6), head="pooled").eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        feats = model.features(x)
        lin = model.head[-1]
        expected = feats.mean(dim=(2, 3)) @ lin.weight.T + lin.bias
        assert torch.allclose(model(x), expected, atol=1e-6)
        assert torch.allclose(model.head(feats.flip(-1)), model.head(feats), atol=1e-6)


@pytest.fixture(scope="module")
def digits_subset() -> tuple[torch.Tensor, torch.Tensor]:
    pytest.importorskip("sklearn")
    x, y = load_digits(size=16)  # small images and few steps keep these tests fast
    return x[:128], y[:128]


def test_training_is_deterministic(digits_subset: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits_subset
    rng_state = torch.get_rng_state()
    a = train_small_cnn(x, y, seed=1, epochs=1, batch_size=32, cache=False)
    assert torch.equal(rng_state, torch.get_rng_state())  # global RNG left untouched
    b = train_small_cnn(x, y, seed=1, epochs=1, batch_size=32, cache=False)
    assert not a.training and not b.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = train_small_cnn(x, y, seed=2, epochs=1, batch_size=32, cache=False)
    assert not torch.equal(sa["head.3.weight"], c.state_dict()["head.3.weight"])
    # training moved the weights away from the initialisation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        init = SmallCNN(image_size=16)
    assert not torch.equal(init.state_dict()["head.3.weight"], sa["head.3.weight"])


def test_training_cache(
    digits_subset: tuple[torch.Tensor, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAPTUM_REPINTERP_CACHE", str(tmp_path))
    x, y = digits_subset
    a = train_small_cnn(x, y, seed=0, epochs=1, batch_size=32)
    files = list((tmp_path / "models").glob("*.pt"))
    assert len(files) == 1

    # a second call must load the file: training is made impossible
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained although a cached model exists")

    monkeypatch.setattr(models.torch.optim, "Adam", no_training)
    b = train_small_cnn(x, y, seed=0, epochs=1, batch_size=32)
    assert not b.training
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    monkeypatch.undo()

    # other seed, hyperparameters or data give other cache entries
    monkeypatch.setenv("CAPTUM_REPINTERP_CACHE", str(tmp_path))
    train_small_cnn(x, y, seed=1, epochs=1, batch_size=32)
    train_small_cnn(x, y, seed=0, epochs=1, batch_size=32, lr=1e-3)
    x2 = x.clone()
    x2[0, 0, 0, 0] += 0.5
    train_small_cnn(x2, y, seed=0, epochs=1, batch_size=32)
    assert len(list((tmp_path / "models").glob("*.pt"))) == 4
    assert not list((tmp_path / "models").glob("*.tmp"))

    # another head or other channels: another entry, and the model built with them
    pooled = train_small_cnn(
        x, y, seed=0, epochs=1, batch_size=32, head="pooled", channels=(4, 8, 8)
    )
    assert (
        isinstance(pooled.head[0], nn.AdaptiveAvgPool2d)
        and pooled.features[-1][0].out_channels == 8
    )
    assert isinstance(a.head[0], nn.Flatten)
    assert len(list((tmp_path / "models").glob("*.pt"))) == 5
    again = train_small_cnn(
        x, y, seed=0, epochs=1, batch_size=32, head="pooled", channels=(4, 8, 8)
    )
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in pooled.state_dict().items())


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.slow
@needs_mlxtend
def test_small_cnn_accuracy_mnist5k() -> None:
    x, y = load_mnist5k()
    train, test = split_indices(len(y), 0.2, seed=0, stratify=y)
    model = train_small_cnn(x[train], y[train], seed=0)
    assert _accuracy(model, x[test], y[test]) >= 0.97


@pytest.mark.slow
def test_small_cnn_accuracy_digits() -> None:
    pytest.importorskip("sklearn")
    x, y = load_digits()
    train, test = split_indices(len(y), 0.2, seed=0, stratify=y)
    model = train_small_cnn(x[train], y[train], seed=0)
    assert _accuracy(model, x[test], y[test]) >= 0.97


# ---------------------------------------------------------------------- ONet and RNet
NETS = [
    pytest.param(load_onet, 48, (128, 3, 3), id="onet"),
    pytest.param(load_rnet, 24, (64, 3, 3), id="rnet"),
]


@needs_facenet
@pytest.mark.parametrize(("loader", "size", "feature_shape"), NETS)
def test_mtcnn_classifies_all_faces(loader, size: int, feature_shape: tuple) -> None:
    pytest.importorskip("skimage")
    imported_before = "facenet_pytorch" in sys.modules
    model = loader()
    if not imported_before:
        assert "facenet_pytorch" not in sys.modules  # only its weight files are read
    assert not model.training
    x, y = load_faces(size)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
        assert torch.equal(model.head(feats), logits)
    assert feats.shape == (200, *feature_shape)
    assert logits.shape == (200, 2)
    assert torch.equal(logits.argmax(1), y)  # all 100 faces and all 100 non-faces
    assert _head_is_piecewise_linear(model.head)
    assert isinstance(model.features[-1][-1], nn.PReLU)


@needs_facenet
@pytest.mark.parametrize(("loader", "size", "feature_shape"), NETS)
def test_mtcnn_matches_facenet_pytorch(loader, size: int, feature_shape: tuple) -> None:
    """Our re-implementation gives facenet-pytorch's face probabilities exactly."""
    try:
        from facenet_pytorch.models import mtcnn
    except Exception as err:  # any failure of the optional reference
        pytest.skip(f"cannot import facenet_pytorch.models.mtcnn: {err!r}")
    reference = (mtcnn.ONet if size == 48 else mtcnn.RNet)(pretrained=True).eval()
    model = loader()
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        expected = reference(x)[-1]
        got = model(x).softmax(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@needs_facenet
@pytest.mark.parametrize("cls", [ONet, RNet])
def test_mtcnn_state_dict_handling(cls: type) -> None:
    name = "onet" if cls is ONet else "rnet"
    original = torch.load(models._facenet_weights(name), weights_only=True)
    model = cls()
    model.load_facenet_state_dict(original)
    # the module's own state dict round-trips with strict loading
    cls().load_state_dict(model.state_dict(), strict=True)
    # the module keeps facenet's layer names, nested (features.block1.conv1.weight, ...)
    short_names = {".".join(k.split(".")[-2:]) for k in model.state_dict()}
    assert short_names == set(original) - set(cls._unused_keys)
    # dropping a classification key is an error
    for key in ("dense5.weight" if cls is ONet else "dense4.weight", "conv1.bias"):
        broken = dict(original)
        del broken[key]
        with pytest.raises(KeyError, match="missing"):
            cls().load_facenet_state_dict(broken)
    with pytest.raises(KeyError, match="unexpected"):
        cls().load_facenet_state_dict({**original, "surprise.weight": torch.zeros(1)})


def test_mtcnn_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: object) -> object:
        return None if name == "facenet_pytorch" else real(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake)
    for loader in (load_onet, load_rnet):
        with pytest.raises(ImportError, match="pip install --no-deps facenet-pytorch==2.6.0"):
            loader()


# ------------------------------------------------------------------------- ResNet-18
def test_train_resnet18_is_deterministic_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torchvision")
    from captum_repinterp.datasets import make_shapes
    from captum_repinterp.models import train_resnet18

    x, y = make_shapes(12, 32, seed=0)
    rng_state = torch.get_rng_state()
    a = train_resnet18(x, y, seed=1, epochs=1, batch_size=6, cache=False, n_classes=4)
    assert torch.equal(rng_state, torch.get_rng_state())
    b = train_resnet18(x, y, seed=1, epochs=1, batch_size=6, cache=False, n_classes=4)
    assert not a.training and a.fc.out_features == 4
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    # the batch-norm statistics moved: the model was trained in train mode
    assert not torch.equal(a.bn1.running_mean, torch.zeros_like(a.bn1.running_mean))

    monkeypatch.setenv("CAPTUM_REPINTERP_CACHE", str(tmp_path))
    c = train_resnet18(x, y, seed=1, epochs=1, batch_size=6, n_classes=4)
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    assert len(list((tmp_path / "models").glob("resnet18-*.pt"))) == 1
    monkeypatch.setattr(models.torch.optim, "Adam", None)  # a retrain would fail
    d = train_resnet18(x, y, seed=1, epochs=1, batch_size=6, n_classes=4)
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in a.state_dict().items())

    with pytest.raises(ValueError, match="3 channels"):
        train_resnet18(x[:, :1], y, cache=False)
    with pytest.raises(ValueError, match="labels"):
        train_resnet18(x, y[:3], cache=False)


# ------------------------------------ training: bad inputs, the cache, a model that learns nothing
def test_train_resnet18_bad_inputs_and_a_last_batch_of_one(monkeypatch):
    """13 images in batches of 6 leave a last batch of one image, on which batch
    normalisation cannot train (it failed after the rest of the epoch); bad labels,
    batch sizes and images get errors naming them; the caller's threads and RNG stay."""
    pytest.importorskip("torchvision")
    from captum_repinterp.datasets import make_shapes
    from captum_repinterp.models import train_resnet18

    x, y = make_shapes(13, 32, seed=0)
    threads, state = torch.get_num_threads(), torch.get_rng_state()
    model = train_resnet18(x, y, epochs=1, batch_size=6, cache=False, n_classes=4)
    assert not model.training and model.fc.out_features == 4
    assert torch.get_num_threads() == threads and torch.equal(state, torch.get_rng_state())
    for kwargs, match in (
        ({"n_classes": 2}, "labels"),
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": -1}, "epochs"),
    ):
        with pytest.raises(ValueError, match=match):
            train_resnet18(x, y, cache=False, **kwargs)
    for images, labels, match in (
        (x, y - 5, "labels"),
        (x, y.float() + 0.5, "labels"),
        (x[:0], y[:0], "images"),
        (x[:1], y[:1], "images"),
        (x * float("nan"), y, "images"),
    ):
        with pytest.raises(ValueError, match=match):
            train_resnet18(images, labels, cache=False)
    with pytest.raises(TypeError, match="images"):
        train_resnet18(x.tolist(), y, cache=False)


def test_train_resnet18_cache_hit_leaves_the_callers_rng(tmp_path, monkeypatch):
    """Loading from the cache builds the model (its random initialisation) without
    advancing the caller's global RNG, as training does."""
    pytest.importorskip("torchvision")
    from captum_repinterp.datasets import make_shapes
    from captum_repinterp.models import train_resnet18

    monkeypatch.setenv("CAPTUM_REPINTERP_CACHE", str(tmp_path))
    x, y = make_shapes(12, 32, seed=0)
    a = train_resnet18(x, y, epochs=1, batch_size=6, n_classes=4)
    state = torch.get_rng_state()
    b = train_resnet18(x, y, epochs=1, batch_size=6, n_classes=4)  # from the cache
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_training_that_learns_nothing_warns():
    from captum_repinterp.models import train_small_cnn

    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 12, 12, generator=g)
    labels = torch.arange(64) % 4
    with pytest.warns(UserWarning, match=r"classifies .* training images correctly"):
        train_small_cnn(images, labels, epochs=0, cache=False)
