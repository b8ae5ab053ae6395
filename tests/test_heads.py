"""The default head does not run the trunk again, and gives the plain run's logits."""

import pytest
import torch
from torch import nn

from captum_repinterp.features import LayerLayout, forward_with_layer
from captum_repinterp.heads import HookHead
from captum_repinterp.reader import LayerReader


class CountingConv(nn.Conv2d):
    runs = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).runs += 1
        return super().forward(x)


class SharedReluNet(nn.Module):
    """One ReLU module used before and after the layer, a skip path around the layer,
    and arithmetic outside modules."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(CountingConv(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.relu = nn.ReLU()
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.layer = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.relu(self.stem(x)) * 1.5
        y = self.relu(self.layer(self.relu(self.mid(s))) + s)
        return self.fc(y.mean((2, 3)))


def _plain(model, layer, x, layout, psi):
    out = []
    for row in psi:
        _, _, o = forward_with_layer(model, layer, (x,), None, replace=row[None], layout=layout)
        out.append(o)
    return torch.cat(out)


def _shared_relu_net():
    """The net (seeded), one image, its layer tensors and their layout."""
    torch.manual_seed(0)
    model = SharedReluNet().eval()
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        acts, was_tuple, _ = forward_with_layer(model, model.layer, (x,), None)
    return model, x, acts, LayerLayout.from_outputs(acts, was_tuple)


def test_trunk_is_not_run_again_and_logits_are_exact() -> None:
    model, x, acts, layout = _shared_relu_net()
    psi = acts[0].reshape(1, -1) + 0.3 * torch.randn(6, layout.dim)
    head = HookHead(model, model.layer, (x,), None, layout)
    with torch.no_grad():
        head(psi)  # first call: records the trunk and checks it
        assert head.trunk is not None
        CountingConv.runs = 0
        fast = head(psi)
        assert CountingConv.runs == 0  # the stem did not run
        expected = _plain(model, model.layer, x, layout, psi)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)
    # gradients flow to the points
    p = psi[:2].clone().requires_grad_(True)
    head(p)[:, 0].sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    # the model's modules are restored afterwards
    assert "forward" not in model.stem.__dict__ and "forward" not in model.relu.__dict__
    CountingConv.runs = 0
    model(x)
    assert CountingConv.runs == 1


def test_plain_function_model_runs_the_trunk() -> None:
    model, x, acts, layout = _shared_relu_net()
    head = HookHead(lambda t: model(t), model.layer, (x,), None, layout)
    with torch.no_grad():
        out = head(acts[0].reshape(1, -1).repeat(3, 1))
    assert head.trunk is None
    torch.testing.assert_close(out, model(x).expand(3, -1))


def test_read_records_the_trunk_the_head_then_uses() -> None:
    """The seed's read is the head's recording run: the stem does not run again for the
    head, and its values are those of a head that recorded the trunk itself."""
    model, x, acts, layout = _shared_relu_net()
    psi = acts[0].reshape(1, -1) + 0.3 * torch.randn(6, layout.dim)
    with torch.no_grad():
        HookHead(model, model.layer, (x,), None, layout)(psi)  # the checks, once
        reader = LayerReader(model, model.layer, layout, None)
        trunks: list = []
        read_acts, read_out = reader.read((x,), None, trunks=trunks)
        assert len(trunks) == 1
        assert torch.equal(read_acts[0], acts[0]) and torch.equal(read_out, model(x))
        CountingConv.runs = 0
        head = reader.head_for((x,), None, trunk=trunks[0])
        fast = [head(psi[:1]), head(psi)]
        assert CountingConv.runs == 0 and head.trunk is trunks[0]
        own = HookHead(model, model.layer, (x,), None, layout)
        expected = [own(psi[:1]), own(psi)]
        assert CountingConv.runs == 1  # its own recording run
    assert all(torch.equal(a, b) for a, b in zip(fast, expected))
    assert "forward" not in model.stem.__dict__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_failing_recorded_read_leaves_no_hook() -> None:
    model, x, acts, layout = _shared_relu_net()
    with torch.no_grad():
        HookHead(model, model.layer, (x,), None, layout)(acts[0].reshape(1, -1))
    model.fc.register_forward_pre_hook(_raise)  # the model fails after the layer
    reader = LayerReader(model, model.layer, layout, None)
    with pytest.raises((RuntimeError, ValueError)):
        reader.read((x,), None, trunks=[])
    model.fc._forward_pre_hooks.clear()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _raise(module: nn.Module, args: tuple) -> None:
    raise RuntimeError("boom")


def test_read_records_no_trunk_where_the_head_would_not_use_it() -> None:
    model, x, acts, layout = _shared_relu_net()
    other = SharedReluNet().eval()  # a model whose checks were never run
    x2 = torch.cat([x, x + 0.1])
    with torch.no_grad():
        HookHead(model, model.layer, (x,), None, layout)(acts[0].reshape(1, -1))
        for reader, inputs in [
            (LayerReader(model, model.layer, layout, None), (x2,)),  # two examples
            (LayerReader(other, other.layer, layout, None), (x,)),  # undecided
            (LayerReader(model, model.layer, layout, None, head=model.fc), (x,)),  # user head
            (LayerReader(lambda t: model(t), model.layer, layout, None), (x,)),  # a function
        ]:
            trunks: list = []
            reader.read(inputs, None, trunks=trunks)
            assert trunks == []


class InPlaceAfterLayerNet(nn.Module):
    """The layer is an in-place ReLU (its output is the stem's tensor) and the model
    writes into the layer's output after it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(self.stem(x))
        y.mul_(2.0)
        return self.fc(y.mean((2, 3)))


def test_the_read_records_what_the_head_records() -> None:
    """Nothing after the layer writes into the recorded outputs during the read: the
    trunk it keeps is the one the head's own recording run keeps."""
    torch.manual_seed(0)
    model = InPlaceAfterLayerNet().eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        acts, was_tuple, _ = forward_with_layer(model, model.layer, (x,), None)
        layout = LayerLayout.from_outputs(acts, was_tuple)
        psi = acts[0].reshape(1, -1)
        own = HookHead(model, model.layer, (x,), None, layout)
        own(psi)
        trunks: list = []
        _, out = LayerReader(model, model.layer, layout, None).read((x,), None, trunks=trunks)
        assert torch.equal(out, model(x))
    (trunk,) = trunks
    assert trunk.modules.keys() == own.trunk.modules.keys()
    for key, outs in own.trunk.outputs.items():
        assert all(torch.equal(a, b) for a, b in zip(outs, trunk.outputs[key]))


class SameTensorTwice(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = x.relu()
        return r, r


class AliasedLayerNet(nn.Module):
    """The layer's tensors alias each other (one tensor returned twice) and the model
    writes into one of them after the layer, which the other one sees."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer = SameTensorTwice()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.layer(self.stem(x))
        a.mul_(2.0)
        return self.fc(torch.cat([a, b], 1).mean((2, 3)))


class InPlaceSkipNet(InPlaceAfterLayerNet):
    """The layer is an in-place ReLU of the stem's tensor, which the model uses again
    after writing into the layer's output (not a cut: fitted with a warning)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = self.layer(s)
        y.mul_(-1.0)
        return self.fc((y + 2.0 * s).mean((2, 3)) + s.mean((2, 3)))


@pytest.mark.parametrize("net", [AliasedLayerNet, InPlaceSkipNet])
def test_a_recorded_read_gives_the_models_own_output(net: type) -> None:
    """Recording the trunk does not change what the model computes after the layer: the
    read's output is the model's (the seed's logits and predicted class), also when the
    layer's output aliases a tensor the model uses after it; the trunk is the head's."""
    torch.manual_seed(0)
    model = net().eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        acts, was_tuple, _ = forward_with_layer(model, model.layer, (x,), None)
        layout = LayerLayout.from_outputs(acts, was_tuple)
        own = HookHead(model, model.layer, (x,), None, layout)
        own(layout.flatten(acts))
        assert own.trunk is not None
        trunks: list = []
        read_acts, out = LayerReader(model, model.layer, layout, None).read(
            (x,), None, trunks=trunks
        )
        assert len(trunks) == 1
        assert torch.equal(out, model(x))
        assert all(torch.equal(a, b) for a, b in zip(read_acts, acts))
    (trunk,) = trunks
    assert trunk.modules.keys() == own.trunk.modules.keys()
    for key, outs in own.trunk.outputs.items():
        assert len(outs) == len(trunk.outputs[key])
        for a, b in zip(outs, trunk.outputs[key]):
            a, b = _as_tuple(a), _as_tuple(b)
            assert len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


def _as_tuple(out: object) -> tuple:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)
