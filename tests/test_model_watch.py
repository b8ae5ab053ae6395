"""A model changed after ``fit`` is refused: the references' features, predictions and
boundaries are the old weights' (an optimizer step after fit gave regions of purity 0
with no warning)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from captum_repinterp import RepresentativeInterpretation

NB = {"n_boundaries": 12, "bisection_steps": 12, "heatmap_layer": None}
CHANGED = "forward_func: the model's parameters or buffers changed after fit"


def _fitted(tiny):
    model, x = tiny
    model = copy.deepcopy(model)  # the session's model stays as it is
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    return ri, model, x


def _every_call(ri, x):
    return [
        lambda: ri.interpret(x[200:201], **NB),
        lambda: ri.attribute(x[200:202], **NB),
        lambda: ri.transform(x[200:202]),
        lambda: ri.audit(x[200:], target=0, max_regions=1, subgroup_by="none", **NB),
    ]


def test_weights_changed_in_place_are_refused_by_every_call(tiny):
    ri, model, x = _fitted(tiny)
    before = ri.interpret(x[200:201], **NB)
    with torch.no_grad():
        model.head[3].weight.mul_(-1)
    for call in _every_call(ri, x):
        with pytest.raises(ValueError, match=CHANGED):
            call()
    # the same values again: accepted, with the same result as before the change
    with torch.no_grad():
        model.head[3].weight.mul_(-1)
    assert ri.interpret(x[200:201], **NB) == before


def test_an_optimizer_step_is_refused_and_a_new_fit_accepted(tiny):
    ri, model, x = _fitted(tiny)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(x[:20]).logsumexp(1).mean()
    loss.backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=CHANGED):
        ri.interpret(x[200:201], **NB)
    ri.fit(x[:200], progress=False)
    assert len(ri.interpret(x[200:201], **NB)) > 0


def test_load_state_dict_of_the_same_weights_is_accepted(tiny):
    ri, model, x = _fitted(tiny)
    before = ri.interpret(x[200:201], **NB)
    model.load_state_dict(copy.deepcopy(model.state_dict()))  # bumps the versions
    assert ri.interpret(x[200:201], **NB) == before
    other = copy.deepcopy(model.state_dict())
    other["features.0.0.bias"] += 0.5
    model.load_state_dict(other)
    with pytest.raises(ValueError, match=CHANGED):
        ri.interpret(x[200:201], **NB)


class _BatchNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 10 * 10, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_a_forward_pass_in_training_mode_is_refused(tiny):
    _, x = tiny
    torch.manual_seed(0)
    model = _BatchNormCNN().eval()
    with torch.no_grad():
        model.head[1].weight.mul_(20)  # predictions spread over the classes
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(x[:200], progress=False)
    ri.interpret(x[200:201], **NB)
    model.train()
    model(x[:8])  # updates the running statistics
    model.eval()
    with pytest.raises(ValueError, match=CHANGED):
        ri.interpret(x[200:201], **NB)


class _Counting(nn.Module):
    """Writes a buffer in place on every forward pass (eval mode included)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


def test_a_model_that_writes_a_buffer_itself_is_not_refused(tiny):
    model, x = tiny
    counting = _Counting(copy.deepcopy(model)).eval()
    ri = RepresentativeInterpretation(counting, counting.model.features[-1])
    ri.fit(x[:200], progress=False)
    first = ri.interpret(x[200:201], **NB)
    assert ri.interpret(x[200:201], **NB) == first  # our own passes moved the buffer
    ri.attribute(x[200:202], **NB)
    with torch.no_grad():
        counting.model.head[3].bias.add_(1.0)
    with pytest.raises(ValueError, match=CHANGED):
        ri.interpret(x[200:201], **NB)


def test_a_store_fit_takes_the_stores_hash_and_refuses_a_change(tiny, tmp_path):
    from captum_repinterp.store import model_fingerprint

    model, x = tiny
    model = copy.deepcopy(model)
    ri = RepresentativeInterpretation(model, model.features[-1])
    ri.fit(x[:200], progress=False, store=tmp_path / "s")
    assert ri._watch.fingerprint == model_fingerprint(model) == ri.store_.meta["model"]
    ri.interpret(x[200:201], **NB)
    with torch.no_grad():
        model.head[3].bias.add_(1.0)
    with pytest.raises(ValueError, match=CHANGED):
        ri.interpret(x[200:201], **NB)
