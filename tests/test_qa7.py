"""The channel-members default, the split layer named as ``heatmap_layer``, and a split at
the input of a head's leading Linear layer."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.heatmap import HEATMAP_RULES


def _spread(model: nn.Module, fc: nn.Linear, x: torch.Tensor) -> None:
    """Re-draw a final Linear so that random inputs spread over its classes."""
    seen = []
    handle = fc.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(x)
        handle.remove()
        fc.weight.mul_(20.0)
        fc.bias.copy_(-(seen[0] @ fc.weight.T).mean(0))


@pytest.mark.parametrize("to_input", [False, True])
def test_split_layer_as_heatmap_layer_is_the_split_layer_for_every_rule(tiny, to_input):
    """``heatmap_layer=ri.layer`` draws each rule's own map at the split layer, as None
    does, for every registered rule (``"channel"`` and the others drawn only at the
    split layer included)."""
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    ri.fit(x[:240], batch_size=64, progress=False, attribute_to_layer_input=to_input)
    seeds = x[244:246]
    for rule in HEATMAP_RULES:
        at_none = ri.attribute(seeds, heatmap_rule=rule, heatmap_layer=None)
        at_layer = ri.attribute(seeds, heatmap_rule=rule, heatmap_layer=ri.layer)
        torch.testing.assert_close(at_layer, at_none, rtol=0, atol=0, msg=rule)
        region = ri.interpret(seeds[:1], heatmap_rule=rule, heatmap_layer=ri.layer)
        assert region.heatmap_layer is None, rule


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    ).eval()
    x = torch.randn(300, 10)
    _spread(mlp, mlp[4], x)
    return mlp, x


def test_split_at_the_input_of_the_heads_leading_linear():
    """Split at the input of ``mlp[2]``, the head's first Linear layer (N x 16): the
    region is found (it failed with a reshape error: the leading layer's input was read
    before the head put the points there), holds the seed, and the channel-members map
    at the split layer is ``relu(v . psi)`` by hand (one position per channel)."""
    mlp, x = _mlp()
    ri = RepresentativeInterpretation(mlp, mlp[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ri.fit(x[:200], progress=False, attribute_to_layer_input=True)
    seed = x[200:201]
    region = ri.interpret(seed, heatmap_rule="channel-members", heatmap_layer=None)
    assert region.has_boundaries and bool(region.contains(seed)[0])
    psi = mlp[1](mlp[0](x[:5])).detach()
    expect = (psi @ region.direction).clamp_min(0)[:, None]
    torch.testing.assert_close(region.heatmap(x[:5]), expect, rtol=1e-5, atol=1e-6)


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


def test_choose_default_checks_max_sanity():
    """A NaN bound would make every candidate eligible without a word (``x > nan`` is
    False), a string failed in a comparison, a bool was taken as 1: each gets an error
    naming ``max_sanity``; None still switches the bound off."""
    from test_heatmap_rules import _two_setup_report

    from captum_repinterp.evaluation.selection import choose_default

    tie = (None, None)
    outcomes = {
        "s0": {"ri[a]": (True, True), "ri[b@input]": (True, None), "ri[a@input]": tie},
        "s1": {"ri[a]": (True, True), "ri[b@input]": (True, None), "ri[a@input]": tie},
    }
    report = _two_setup_report([None, "input"], outcomes)
    report["setups"]["s0"]["sanity"] = {"stages": [{"ri[a]": 0.2, "ri[b@input]": 0.1}]}
    report["setups"]["s1"]["sanity"] = {"stages": [{"ri[a]": 0.7, "ri[b@input]": 0.1}]}
    assert choose_default(report)["default"] == "a/b@auto"  # a is out of the bound on s1
    assert choose_default(report, max_sanity=None)["default"] == "a"
    with pytest.raises(ValueError, match="max_sanity"):
        choose_default(report, max_sanity=float("nan"))
    for bad in ("0.5", True):
        with pytest.raises(TypeError, match="max_sanity"):
            choose_default(report, max_sanity=bad)


def test_audit_takes_the_split_layer_as_heatmap_layer(tiny):
    """``heatmap_layer=ri.layer`` is the split layer, as in ``interpret``: audit gives the
    same result as without it (it said the maps cannot be drawn "at another layer")."""
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    ri.fit(x[:240], batch_size=64, progress=False)
    plain = ri.audit(x[240:300], target=0, progress=False)
    named = ri.audit(x[240:300], target=0, progress=False, heatmap_layer=ri.layer)
    assert len(plain[0].regions) == len(named[0].regions) > 0
    for a, b in zip(plain[0].regions, named[0].regions):
        assert (a.size, a.purity) == (b.size, b.purity)
        assert a.interpretation == b.interpretation
    with pytest.raises(ValueError, match="heatmap_layer"):
        ri.audit(x[240:300], target=0, progress=False, heatmap_layer=model.features[0])
