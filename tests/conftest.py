"""Shared fixtures and helpers: a temporary cache, a tiny CNN with a piecewise-linear head
and its images (and its explainer fitted at the last block), a small pooled CNN fitted at
its pool, ``fit`` with chosen warnings hidden, an exploding wrapper and an interrupted fit."""

import contextlib
import os
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session", autouse=True)
def temporary_cache(tmp_path_factory):
    """Point the package's cache (decoded MNIST-5k, trained CNNs) at a temporary folder.

    Session-scoped: each model is trained once per test session, never written to the
    user's home. Set ``CAPTUM_REPINTERP_TEST_CACHE`` to a folder to keep the cache
    between sessions (faster local runs).
    """
    keep = os.environ.get("CAPTUM_REPINTERP_TEST_CACHE")
    path = keep or str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPTUM_REPINTERP_CACHE", path)
        yield path


class TinyCNN(nn.Module):
    def __init__(self, in_ch: int = 1, n_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(in_ch, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 6 * 6, 24), nn.ReLU(), nn.Linear(24, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Scale(nn.Module):
    """Multiplies by a constant: a cut that changes only the features' units."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


@pytest.fixture(scope="session")
def tiny() -> tuple[TinyCNN, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    gen = torch.Generator().manual_seed(1)
    # images with class-dependent structure so that predictions are diverse
    base = torch.randn(4, 1, 12, 12, generator=gen)
    labels = torch.arange(300) % 4
    x = base[labels] + 0.7 * torch.randn(300, 1, 12, 12, generator=gen)
    # make the head's prediction diverse by re-fitting the last layer to the labels
    with torch.no_grad():
        h = model.head[:3](model.features(x))
        sol = torch.linalg.lstsq(
            torch.cat([h, torch.ones(300, 1)], 1), nn.functional.one_hot(labels, 4).float()
        ).solution
        model.head[3].weight.copy_(sol[:-1].T)
        model.head[3].bias.copy_(sol[-1])
    return model, x


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Boom(nn.Module):
    """Wraps a model; raises inside forward once armed (after the layer has run)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.armed = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.inner(z)
        if self.armed:
            raise RuntimeError("boom")
        return out


@pytest.fixture(scope="session")
def boom_cls() -> type[Boom]:
    """The exploding wrapper class, for side-effect tests."""
    return Boom


class Interrupted(RuntimeError):
    """Raised by :func:`interrupt_on_call` (a fit stopped part-way)."""


@contextlib.contextmanager
def interrupt_on_call(module: nn.Module, n: int) -> Iterator[None]:
    """Raise :class:`Interrupted` at the end of ``module``'s ``n``-th forward call inside
    the block (an interrupted fit); the hook is removed on leaving it."""
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1
        if calls[0] == n:
            raise Interrupted

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def fit(model, layer, references, ignore_warnings=None, **kwargs):
    """``RepresentativeInterpretation(model, layer).fit(references, progress=False, **kwargs)``.

    ``ignore_warnings``: a warning category (``UserWarning``, ``Warning`` for all) not
    shown while the explainer is built and fitted; None shows every warning.
    """
    from captum_repinterp import RepresentativeInterpretation

    if ignore_warnings is None:
        return RepresentativeInterpretation(model, layer).fit(references, progress=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ignore_warnings)
        return RepresentativeInterpretation(model, layer).fit(references, progress=False, **kwargs)


@pytest.fixture(scope="module")
def last_block_fit(tiny, one_thread):
    """The tiny CNN's explainer split at its last block, fitted on the first 200 images:
    ``(ri, model, x)``."""
    from captum_repinterp import RepresentativeInterpretation

    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    return ri, model, x


class PoolNet(nn.Module):
    """conv -> ReLU -> max-pool (split) -> linear head (or one hidden ReLU layer)."""

    def __init__(self, hidden: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        layers: list[nn.Module] = [nn.Flatten()]
        if hidden:
            layers += [nn.Linear(48, hidden), nn.ReLU(), nn.Linear(hidden, 3)]
        else:
            layers += [nn.Linear(48, 3)]
        self.head = nn.Sequential(*layers)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


@pytest.fixture(scope="module")
def relu_fit():
    """A :class:`PoolNet` with one hidden ReLU layer in its head, its 150 images and the
    explainer split at its pool, fitted on the first 120: ``(model, x, ri)``."""
    torch.manual_seed(0)
    model = PoolNet(hidden=5).eval()
    x = torch.randn(150, 1, 8, 8)
    return model, x, fit(model, model.pool, x[:120], ignore_warnings=Warning)


def refit_last_linear(last: nn.Linear, hidden: torch.Tensor) -> None:
    """Refit ``last`` by least squares on ``hidden`` (``n x d``, the inputs it gets for
    ``n`` images of the tiny set) to the labels ``i % C`` (the images have class
    structure), so that a random model's predictions cover the classes."""
    labels = torch.arange(hidden.shape[0]) % last.out_features
    with torch.no_grad():
        sol = torch.linalg.lstsq(
            torch.cat([hidden, torch.ones(len(hidden), 1)], 1),
            nn.functional.one_hot(labels, last.out_features).float(),
        ).solution
        last.weight.copy_(sol[:-1].T)
        last.bias.copy_(sol[-1])
