"""Saving and loading an audit: one ``.npz`` read with ``allow_pickle=False`` that gives
back an equal audit (same summary, same heat maps with the explainer), and refusals
naming ``path`` or ``explainer``."""

from __future__ import annotations

import copy
import json
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import fit as _fit
from matplotlib.figure import Figure

from captum_repinterp import Interpretation, RepresentativeInterpretation
from captum_repinterp.auditing import AuditResult, audit
from captum_repinterp.visualization import plot_audit

FAST = {"n_boundaries": 20, "bisection_steps": 12}


@pytest.fixture(scope="module")
def fitted(tiny, one_thread):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1], head=model.head)
    ri.fit(x, progress=False)
    return ri, x


@pytest.fixture(scope="module")
def result(fitted):
    """Every class, several regions, sub-groups split by margins (a silhouette floor of
    -1 keeps any split), two held-out images (NaN held-out scores for most regions)."""
    ri, x = fitted
    return audit(
        ri,
        x,
        coverage_target=1.0,
        max_regions=3,
        heldout=x[:2],
        subgroup_by="margins",
        min_silhouette=-1.0,
        random_state=0,
        **FAST,
    )


@pytest.fixture
def saved(result, tmp_path):
    path = tmp_path / "audit.npz"
    result.save(path)
    return path


def _regions(res: AuditResult):
    return [r for ca in res for r in ca.regions]


def _nan_in(value) -> bool:
    return isinstance(value, float) and np.isnan(value)


def test_the_audit_round_trips_equal_with_the_same_summary(result, saved):
    regions = _regions(result)
    # the audit exercises what must round-trip: several classes and regions, split
    # regions, held-out scores with NaN in them
    assert len(result) > 1 and len(regions) > len(result)
    assert any(len(r.subgroups) > 1 for r in regions)
    assert any(any(_nan_in(v) for v in r.heldout.values()) for r in regions)
    loaded = AuditResult.load(saved)
    assert loaded == result and not loaded != result
    assert loaded.summary() == result.summary() and repr(loaded) == repr(result)
    assert list(loaded.classes) == list(result.classes)  # the order of the classes too
    assert loaded.seconds == result.seconds  # not compared by ==, but in the summary
    for a, b in zip(loaded, result):
        assert a.seconds == b.seconds and a.target == b.target
        for ra, rb in zip(a.regions, b.regions):
            assert ra.interpretation == rb.interpretation
            assert ra.heldout == rb.heldout or all(
                (x == y) or (_nan_in(x) and _nan_in(y))
                for x, y in zip(ra.heldout.values(), rb.heldout.values())
            )
            assert type(ra.heldout["n_inside"]) is int
            assert [g.size for g in ra.subgroups] == [g.size for g in rb.subgroups]
            assert ra.mean_heatmap.dtype == rb.mean_heatmap.dtype
    # every array reads without pickle (no object arrays)
    with np.load(saved, allow_pickle=False) as data:
        for name in data.files:
            assert data[name].dtype != object, name


def test_a_change_in_the_file_is_seen(result, saved, tmp_path):
    """``==`` of a loaded audit compares what was read: one member changed in the file
    gives an audit that no longer equals the saved one."""
    with np.load(saved) as data:
        arrays = dict(data)
    arrays["class0/region0/members"] = arrays["class0/region0/members"][::-1].copy()
    np.savez(tmp_path / "changed.npz", **arrays)
    assert AuditResult.load(tmp_path / "changed.npz") != result


def test_with_the_explainer_the_maps_and_rules_are_the_original_ones(fitted, result, saved):
    ri, x = fitted
    for explainer in (ri, ri.reader_):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same model: no warning
            loaded = AuditResult.load(saved, explainer=explainer)
        assert loaded == result
        for a, b in zip(_regions(loaded), _regions(result)):
            assert a.interpretation.reader is ri.reader_
            assert torch.equal(a.interpretation.heatmap(x[:12]), b.interpretation.heatmap(x[:12]))
            assert torch.equal(a.interpretation.contains(x[:12]), b.interpretation.contains(x[:12]))
            # the model's fingerprint and layer name were kept, as Interpretation.save does
            assert a.interpretation.metadata() == b.interpretation.metadata()


def test_without_explainer_everything_but_the_model_works(fitted, result, saved):
    ri, x = fitted
    loaded = AuditResult.load(saved)
    region, original = _regions(loaded)[0], _regions(result)[0]
    interp = region.interpretation
    assert interp.reader is None
    with pytest.raises(RuntimeError, match="needs the model"):
        interp.heatmap(x[:2])
    feats, preds = loaded.features, loaded.predictions
    assert torch.equal(
        interp.contains_features(feats), original.interpretation.contains_features(feats)
    )
    assert interp.evaluate_features(feats, preds) == original.interpretation.evaluate_features(
        feats, preds
    )
    maps = interp.heatmap_from_activations(ri.layout_.unflatten(feats[:5]))
    expected = original.interpretation.heatmap_from_activations(ri.layout_.unflatten(feats[:5]))
    assert all(torch.equal(a, b) for a, b in zip(maps, expected))
    c = next(iter(loaded.classes))
    fig = plot_audit(loaded[c], x)
    assert isinstance(fig, Figure) and len(fig.axes) > 1


def test_several_outputs_no_interpretation_and_no_heldout_round_trip(result, tmp_path):
    """Parts an audit can have that the fixture's has not: mean maps of a layer with
    several outputs (a tuple), a region kept without its interpretation, no held-out
    images, a region with no sub-group."""
    changed = copy.deepcopy(result)
    region = _regions(changed)[0]
    region.mean_heatmap = (region.mean_heatmap, region.mean_heatmap[:, :2] * 2)
    region.subgroups[0].mean_heatmap = (region.subgroups[0].mean_heatmap,)
    region.interpretation = None
    region.heldout = None
    _regions(changed)[1].subgroups = []
    changed.save(tmp_path / "changed.npz")
    loaded = AuditResult.load(tmp_path / "changed.npz")
    assert loaded == changed and loaded != result
    first = _regions(loaded)[0]
    assert isinstance(first.mean_heatmap, tuple) and len(first.mean_heatmap) == 2
    assert isinstance(first.subgroups[0].mean_heatmap, tuple)
    assert first.interpretation is None and first.heldout is None
    assert _regions(loaded)[1].subgroups == []
    assert loaded.summary() == changed.summary()


def test_load_with_another_model_warns_once_and_another_layer_is_refused(tiny, result, saved):
    model, x = tiny
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head[-1].bias.add_(0.5)
    other = _fit(changed, changed.features[-1], x)
    with pytest.warns(UserWarning, match=r"^explainer: .*a model with other weights") as rec:
        loaded = AuditResult.load(saved, explainer=other)
    assert len([w for w in rec if "other weights" in str(w.message)]) == 1  # not per region
    assert loaded == result
    first = _fit(model, model.features[0], x[:120])
    with pytest.raises(ValueError, match="^explainer: "):
        AuditResult.load(saved, explainer=first)
    few = _fit(model, model.features[-1], x[:20])
    with pytest.raises(ValueError, match="^explainer: .*fitted on 20 references"):
        AuditResult.load(saved, explainer=few)
    with pytest.raises(TypeError, match="explainer"):
        AuditResult.load(saved, explainer=model)


def test_files_that_are_no_audit_are_refused_naming_path(fitted, result, saved, tmp_path):
    ri, x = fitted
    interp = tmp_path / "region.npz"
    _regions(result)[0].interpretation.save(interp)
    with pytest.raises(ValueError, match=r"^path: .*is an interpretation .*Interpretation\.load"):
        AuditResult.load(interp)
    with pytest.raises(ValueError, match="^path: .*not an interpretation"):
        Interpretation.load(saved)
    text = tmp_path / "text.npz"
    text.write_text("not an audit")
    other_npz = tmp_path / "other.npz"
    np.savez(other_npz, a=np.zeros(3))
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    torch_file = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, torch_file)
    with np.load(saved) as data:
        arrays = dict(data)
    meta = json.loads(str(arrays["audit"]))

    def rewrite(name: str, **changes) -> os.PathLike:
        path = tmp_path / name
        np.savez(path, **{**arrays, **changes})
        return path

    no_array = tmp_path / "no_array.npz"
    np.savez(no_array, **{k: v for k, v in arrays.items() if k != "class0/indices"})
    no_field = rewrite("no_field.npz", audit=np.array(json.dumps({**meta, "seconds": None})))
    no_seconds = {k: v for k, v in meta.items() if k != "seconds"}
    missing = rewrite("missing.npz", audit=np.array(json.dumps(no_seconds)))
    listed = rewrite("list.npz", audit=np.array("[1, 2]"))
    not_json = rewrite("not_json.npz", audit=np.array("{"))
    for path in (text, other_npz, npy, torch_file, no_array, no_field, missing, listed, not_json):
        with pytest.raises(ValueError, match=f"^path: {str(path)!r} is not an audit"):
            AuditResult.load(path, explainer=ri)
    newer = rewrite("newer.npz", audit=np.array(json.dumps({**meta, "format_version": 2})))
    with pytest.raises(ValueError, match=r"^path: .* has audit format version 2"):
        AuditResult.load(newer)
    with pytest.raises(FileNotFoundError):
        AuditResult.load(tmp_path / "absent.npz")
    assert AuditResult.load(rewrite("same.npz")) == result  # the rewriting itself is fine


def test_save_takes_the_path_as_given_and_refuses_bad_paths(result, tmp_path):
    result.save(tmp_path / "plain")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # no suffix added
    assert AuditResult.load(str(tmp_path / "plain")) == result
    (tmp_path / "plain").unlink()
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
            result.save(write_end)
        with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
            AuditResult.load(read_end)
        os.write(write_end, b"!")  # still open, and nothing else was written
        assert os.read(read_end, 1 << 16) == b"!"
    finally:
        os.close(read_end)
        os.close(write_end)
    with pytest.raises(ValueError, match="path: an empty path"):
        result.save("")
    with pytest.raises(ValueError, match=r"path: .* is a directory"):
        result.save(tmp_path)
    assert not list(tmp_path.iterdir())


def test_an_interrupted_save_leaves_the_earlier_file(result, saved, monkeypatch):
    before = saved.read_bytes()

    def interrupted(fh, **arrays):
        fh.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        copy.deepcopy(result).save(saved)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
    assert AuditResult.load(saved) == result
