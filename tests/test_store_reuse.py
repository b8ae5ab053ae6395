"""A finished store reused by a second ``fit`` gives what the first fit gave (head=None)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from captum_repinterp import NonPiecewiseLinearWarning, RepresentativeInterpretation


class TanhNet(nn.Module):
    """A conv trunk and a head with a Tanh: the head is not piecewise linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.fc1 = nn.Linear(4 * 6 * 6, 8)
        self.fc2 = nn.Linear(8, 3)
        with torch.no_grad():  # large logits, so that random images spread over the classes
            self.fc2.weight.mul_(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.features(x).flatten(1))))


class LinearHeadNet(TanhNet):
    """The same without the Tanh: the head starts with an affine map (projection)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.features(x).flatten(1))))


def _fit(model: nn.Module, x: torch.Tensor, store) -> tuple[RepresentativeInterpretation, list]:
    ri = RepresentativeInterpretation(model, model.features)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ri.fit(x, batch_size=16, progress=False, store=store)
    return ri, [w for w in caught if issubclass(w.category, NonPiecewiseLinearWarning)]


def test_second_fit_on_a_finished_store_warns_and_checks_like_the_first(tmp_path):
    x = torch.randn(60, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    model = TanhNet().eval()
    first, warned_first = _fit(model, x, tmp_path / "s")
    second, warned_second = _fit(model, x, tmp_path / "s")
    assert len(warned_first) == 1 and len(warned_second) == 1
    assert second.head_nonlinear_ == first.head_nonlinear_ != ()
    assert second.input_spec_ == first.input_spec_ == (((1, 6, 6), torch.float32),)
    # a missing batch dimension gets the clear message, not a model failure
    with pytest.raises(ValueError, match="add the batch dimension first"):
        second.attribute(x[0])


def test_second_fit_on_a_finished_store_keeps_the_projection(tmp_path):
    """The second fit writes projected.npy anew; it rewrote the file in place, under the
    first explainer's memory map (a read during the rewrite could fault). It now writes
    a new file and moves it into place: the first explainer keeps its own."""
    x = torch.randn(60, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    model = LinearHeadNet().eval()
    first, _ = _fit(model, x, tmp_path / "s")
    inode = (tmp_path / "s" / "projected.npy").stat().st_ino
    kept = first.projection_.projected.clone()
    second, _ = _fit(model, x, tmp_path / "s")
    assert (tmp_path / "s" / "projected.npy").stat().st_ino != inode
    assert not list((tmp_path / "s").glob("*.tmp.npy"))
    assert torch.equal(first.projection_.projected, kept)
    assert first.projection_ is not None and second.projection_ is not None
    assert torch.equal(first.projection_.projected, second.projection_.projected)
    a, b = first.interpret(x[:3]), second.interpret(x[:3])
    for r1, r2 in zip(a, b):
        assert torch.equal(r1.members, r2.members) and torch.equal(r1.weight, r2.weight)


# ---------------------------------------------------- a loader that reads some rows of its dataset
@pytest.mark.parametrize("sampling", ["drop_last", "list_sampler", "subset_random"])
def test_a_finished_store_of_a_loader_reading_some_rows_is_reused(
    tiny, one_thread, tmp_path, sampling
):
    """A DataLoader that reads fewer rows than its dataset holds (drop_last=True, or a
    sampler of some indices): fit again with the same loader and store reuses the
    store (it said "already holds a finished fit of 256 references; pass append=True
    to add these", comparing with len(dataset)). A random sampler reads another order
    the second time: refused as other references."""
    model, x = tiny
    ds = torch.utils.data.TensorDataset(x[:100], torch.zeros(100, dtype=torch.long))
    kw = {
        "drop_last": dict(batch_size=32, drop_last=True),
        "list_sampler": dict(batch_size=16, sampler=list(range(99, 19, -1))),
        "subset_random": dict(
            batch_size=16,
            sampler=torch.utils.data.SubsetRandomSampler(
                range(20, 100), generator=torch.Generator().manual_seed(0)
            ),
        ),
    }[sampling]
    loader = torch.utils.data.DataLoader(ds, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the samplers' "not in order" warning
        first = RepresentativeInterpretation(model, model.features).fit(
            loader, progress=False, store=tmp_path
        )
        assert first.features_.shape[0] == (96 if sampling == "drop_last" else 80)
        rows_run = []
        hook = model.register_forward_hook(lambda m, i, o: rows_run.append(i[0].shape[0]))
        try:
            if sampling == "subset_random":
                with pytest.raises(ValueError, match="store: .*other references"):
                    RepresentativeInterpretation(model, model.features).fit(
                        loader, progress=False, store=tmp_path
                    )
                return
            again = RepresentativeInterpretation(model, model.features).fit(
                loader, progress=False, store=tmp_path
            )
        finally:
            hook.remove()
    assert torch.equal(torch.as_tensor(again.features_), torch.as_tensor(first.features_))
    # the first rows checked (batches of up to four and single images), nothing
    # recomputed: a refit runs all 80-96 rows
    assert sum(rows_run) < 40
