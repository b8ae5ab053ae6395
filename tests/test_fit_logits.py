"""The references' logits kept by ``fit`` stand in for the head at the segments' ends."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.features import forward_with_layer
from captum_repinterp.heads import HookHead
from captum_repinterp.reader import LayerReader
from captum_repinterp.sampler import choose_candidates, find_crossings, sample_boundaries


class Counting:
    """A head function (the model's end after ``features[0]``) that keeps every batch it
    is evaluated on."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.batches: list[torch.Tensor] = []

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        self.batches.append(a.detach().flatten(1).clone())
        return self.model.head(self.model.features[1](a))

    @property
    def rows(self) -> int:
        return sum(b.shape[0] for b in self.batches)


def _plain(tiny, head=None, **fit_kwargs):
    """Split after the first conv block: the head starts with a conv and a ReLU, so no
    shortcut applies and the crossings run on the features themselves."""
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[0], head=head)
    ri.fit(x[:200], batch_size=64, progress=False, **fit_kwargs)
    fitted = ri.references_
    assert fitted.projection is None and fitted.leading is None and fitted.affine is None
    return ri


def test_fit_keeps_the_model_outputs_which_are_the_heads_values(tiny, one_thread):
    model, x = tiny
    ri = _plain(tiny)
    logits = ri.references_.logits
    assert logits is not None and logits.shape == (200, 4) and logits.dtype == torch.float32
    with torch.no_grad():
        expected = model(x[:200])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(1), ri.predictions_)
    # the head anchored at another example gives them at the references' features
    head = HookHead(model, model.features[0], (x[250:251],), None, ri.layout_)
    with torch.no_grad():
        at_features = head(ri.features_[:40])
    torch.testing.assert_close(at_features, logits[:40], rtol=1e-4, atol=1e-5)


def test_find_crossings_with_the_heads_own_end_values_is_unchanged() -> None:
    """Given the values the head gives at the seed and the ends, nothing changes, and
    the head is not evaluated at the ends."""
    torch.manual_seed(3)
    head = nn.Sequential(
        nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    pts = torch.randn(300, 6, generator=torch.Generator().manual_seed(4)) * 2
    with torch.no_grad():
        preds = head(pts).argmax(1)
    cls = int(preds[0])
    x, ends = pts[0], pts[preds != cls][:25]
    with torch.no_grad():
        both = head(torch.cat([x[None], ends]))
    seen: list[torch.Tensor] = []

    def counted(p: torch.Tensor) -> torch.Tensor:
        seen.append(p.detach().clone())
        return head(p)

    plain = find_crossings(head, x, ends, cls)
    given = find_crossings(counted, x, ends, cls, start_logits=both[0], end_logits=both[1:])
    assert torch.equal(plain[0], given[0]) and torch.equal(plain[1], given[1])
    assert plain[3] == given[3] and torch.equal(plain[2], given[2])
    evaluated = torch.cat(seen)
    assert not (evaluated[:, None, :] == ends[None]).all(-1).any()
    assert not (evaluated == x).all(-1).any()
    # the whole sampler, too
    a = sample_boundaries(head, x, ends, cls)
    b = sample_boundaries(head, x, ends, cls, logits=both)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert torch.equal(a.source, b.source)
    with pytest.raises(ValueError, match="end_logits"):
        find_crossings(head, x, ends, cls, end_logits=both[2:])


def test_interpret_evaluates_the_head_at_no_candidate(tiny, one_thread):
    model, x = tiny
    counting = Counting(model)
    ri = _plain(tiny, head=counting)
    assert ri.references_.logits is not None
    counting.batches.clear()
    reg = ri.interpret(x[210:211], random_state=0)
    assert reg.has_boundaries
    with_logits = counting.batches
    cands = ri.features_[choose_candidates(ri.predictions_, reg.target, True, 50, 0)]
    evaluated = torch.cat(with_logits)
    assert not (evaluated[:, None, :] == cands[None]).all(-1).any()
    assert with_logits[0].shape[0] == 1  # the seed alone, then the open segments
    # without the logits the first call is the seed and every candidate
    ri._references = dataclasses.replace(ri.references_, logits=None)
    counting.batches = []
    again = ri.interpret(x[210:211], random_state=0)
    assert counting.batches[0].shape[0] == 1 + cands.shape[0]
    assert counting.rows > sum(b.shape[0] for b in with_logits) + cands.shape[0] // 2
    # the same region, to rounding of the ends' logits
    assert torch.equal(torch.sort(again.members).values, torch.sort(reg.members).values)
    assert again.purity == reg.purity


def test_logits_are_dropped_when_the_head_is_not_the_models_end(tiny, one_thread):
    model, x = tiny
    other = copy.deepcopy(model.head)
    with torch.no_grad():
        other[3].bias.add_(torch.tensor([3.0, -3.0, 0.0, 0.0]))
    ri = RepresentativeInterpretation(model, model.features[-1], head=other)
    ri.fit(x[:100], progress=False, cut_check="off")
    assert ri.references_.logits is None
    # the same head as the model's end keeps them
    ri2 = RepresentativeInterpretation(model, model.features[-1], head=model.head)
    ri2.fit(x[:100], progress=False)
    assert ri2.references_.logits is not None


def test_affine_head_is_checked_without_calling_it(tiny, one_thread):
    """With the logits, the per-seed check of the exact affine regions needs no head call."""
    model, x = tiny
    calls = []

    class Last(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = model.head[3]

        def forward(self, a: torch.Tensor) -> torch.Tensor:
            calls.append(a.shape[0])
            return self.linear(a)

    ri = RepresentativeInterpretation(model, model.head[2], head=Last().eval())
    ri.fit(x[:150], progress=False)
    assert ri.references_.affine is not None and ri.references_.logits is not None
    calls.clear()
    reg = ri.interpret(x[220:221])
    assert calls == []
    assert reg.n_sampled == 3  # the exact boundaries against the three other classes


def test_store_keeps_the_logits_and_its_reuse_checks_them(tiny, tmp_path, one_thread):
    model, x = tiny
    path = tmp_path / "store"
    first = _plain(tiny, store=path)
    assert (path / "logits.npy").is_file()
    in_ram = _plain(tiny)
    torch.testing.assert_close(first.references_.logits, in_ram.references_.logits)
    second = _plain(tiny, store=path)  # a finished store reused
    assert torch.equal(second.references_.logits, first.references_.logits)
    a, b = first.interpret(x[205:207], random_state=0), second.interpret(x[205:207], random_state=0)
    for ra, rb in zip(a, b):
        assert torch.equal(ra.members, rb.members) and torch.equal(ra.weight, rb.weight)
    # the model changed after the layer: same features, other outputs
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head[3].bias.add_(1.0)
    with pytest.raises(ValueError, match="store"):
        RepresentativeInterpretation(changed, changed.features[0]).fit(
            x[:200], batch_size=64, progress=False, store=path
        )
    # a store written without logits (an older version) is used without them
    (path / "logits.npy").unlink()
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("logits")
    (path / "meta.json").write_text(json.dumps(meta))
    old = _plain(tiny, store=path)
    assert old.references_.logits is None
    c = old.interpret(x[205:207], random_state=0)
    for ra, rc in zip(a, c):
        assert torch.equal(torch.sort(ra.members).values, torch.sort(rc.members).values)


def test_store_logits_follow_append_and_resume(tiny, tmp_path, one_thread):
    model, x = tiny
    path = tmp_path / "grown"
    ri = RepresentativeInterpretation(model, model.features[0])
    ri.fit(x[:40], batch_size=16, progress=False, store=path, append=True)
    ri.fit(x[40:120], batch_size=32, progress=False, store=path, append=True)
    logits = ri.references_.logits
    assert logits is not None and logits.shape[0] == ri.n_references_
    with torch.no_grad():
        expected = model(x[: ri.n_references_])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_hook_head_one_row_call_takes_the_trunk_recording_run(tiny, one_thread):
    model, x = tiny
    layer = model.features[0]
    ri = _plain(tiny)
    psi = ri.features_[7:8]
    HookHead(model, layer, (x[:1],), None, ri.layout_)(psi)  # the checks decided once
    runs = []
    handle = model.head[3].register_forward_hook(lambda m, a, o: runs.append(a[0].shape[0]))
    try:
        head = HookHead(model, layer, (x[3:4],), None, ri.layout_)
        with torch.no_grad():
            out = head(psi)
        assert runs == [1]  # the recording run only
        _, _, full = forward_with_layer(
            model, layer, (x[3:4],), None, replace=psi, layout=ri.layout_
        )
        assert torch.equal(out, full)
        # with gradients the head runs (the recording run had none)
        runs.clear()
        fresh = HookHead(model, layer, (x[3:4],), None, ri.layout_)
        p = psi.clone().requires_grad_(True)
        with torch.enable_grad():
            out2 = fresh(p)
        assert runs == [1, 1] and out2.requires_grad
        assert torch.equal(out2.detach(), full)
    finally:
        handle.remove()


def test_seeds_read_once_and_results_unchanged(tiny, one_thread, monkeypatch):
    """A seed's read records the trunk its head uses (the model's start runs once per
    seed, not twice), and every result is bitwise what the head's own recording run gave."""
    model, x = tiny
    ri = _plain(tiny)
    ri.interpret(x[200:201], random_state=0)  # the head's checks, decided once
    runs: list[int] = []
    handle = model.features[0][0].register_forward_hook(lambda m, a, o: runs.append(1))

    def interpret_all():
        runs.clear()
        out = [ri.interpret(x[i : i + 1], random_state=0) for i in range(201, 221)]
        out += ri.interpret(x[221:224], random_state=0)  # a batch: each head records
        return out, len(runs)

    try:
        new, new_runs = interpret_all()
        monkeypatch.setattr(LayerReader, "_head_records_trunk", lambda self: False)
        old, old_runs = interpret_all()
    finally:
        handle.remove()
    assert (new_runs, old_runs) == (20 + 6, 40 + 6)
    names = ["weight", "bias", "runner_up", "members", "member_distances", "seed_margins"]
    for a, b in zip(new, old):
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in names)
        assert (a.purity, a.coverage, a.n_sampled) == (b.purity, b.coverage, b.n_sampled)
    assert sum(a.weight.shape[0] for a in new) > 20
