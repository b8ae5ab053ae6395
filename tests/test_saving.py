"""Saving and loading a region: compared by value, checked against the explainer it is
loaded with, and refusals naming ``path`` or ``explainer`` (a file that is no
interpretation, a file descriptor)."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from conftest import fit as _fit

from captum_repinterp import (
    Interpretation,
    NotFittedError,
    RepresentativeInterpretation,
)

NB = {"n_boundaries": 12, "bisection_steps": 12}

RANDOM_STATE = {"random_state": 0}


@pytest.mark.usefixtures("one_thread")
def test_interpretations_compare_by_value(last_block_fit, tmp_path):
    ri, _, x = last_block_fit
    region = ri.interpret(x[200:201], heatmap_rule="region-score", **NB)
    region.save(tmp_path / "r.npz")
    loaded = Interpretation.load(tmp_path / "r.npz")
    assert loaded == region and region == copy.deepcopy(region)
    other = ri.interpret(x[201:202], **NB)
    assert region != other and region != "region"
    changed = copy.deepcopy(region)
    changed.members = changed.members.flip(0)
    assert changed != region
    region.save(tmp_path / "plain")  # the path as given, as the docstring says
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "r.npz"]
    assert Interpretation.load(tmp_path / "plain") == region


@pytest.mark.usefixtures("one_thread")
def test_load_with_the_explainer_of_another_layer_is_refused(last_block_fit, tmp_path):
    ri, model, x = last_block_fit
    ri.interpret(x[200:201], **NB).save(tmp_path / "r.npz")
    other = RepresentativeInterpretation(model, model.features[0]).fit(x[:200], progress=False)
    with pytest.raises(ValueError, match="explainer"):
        Interpretation.load(tmp_path / "r.npz", explainer=other)


@pytest.mark.usefixtures("one_thread")
def test_load_with_the_explainer_of_the_other_side_of_the_layer_is_refused(tiny, tmp_path):
    """A ReLU's input and output are shaped alike: a region found on the layer's input
    (``attribute_to_layer_input=True``) loaded with an explainer reading its output was
    taken, and 4% of 100 new images got another rule decision. A file without the key
    (written before it was saved) is checked as before."""
    import json

    import numpy as np

    model, x = tiny
    relu = model.features[-1][1]
    before = RepresentativeInterpretation(model, relu)
    before.fit(x[:200], progress=False, attribute_to_layer_input=True)
    after = RepresentativeInterpretation(model, relu).fit(x[:200], progress=False)
    assert before.layout_ == after.layout_
    region = before.interpret(x[250:251], heatmap_layer=None, **NB)
    region.save(tmp_path / "r.npz")
    assert region.metadata()["attribute_to_layer_input"] is True
    with pytest.raises(ValueError, match="^explainer: .*attribute_to_layer_input=True"):
        Interpretation.load(tmp_path / "r.npz", explainer=after)
    with pytest.raises(ValueError, match="^explainer: .*attribute_to_layer_input=True"):
        Interpretation.load(tmp_path / "r.npz", explainer=after.reader_)
    back = Interpretation.load(tmp_path / "r.npz", explainer=before)
    assert back == region and back.metadata() == region.metadata()
    assert torch.equal(back.contains(x[200:300]), region.contains(x[200:300]))
    # without an explainer nothing is known of the side; saved again, nothing is claimed
    orphan = Interpretation.load(tmp_path / "r.npz")
    assert orphan.metadata()["attribute_to_layer_input"] is None
    orphan.save(tmp_path / "o.npz")
    assert Interpretation.load(tmp_path / "o.npz", explainer=after) == region
    with np.load(tmp_path / "r.npz") as data:
        arrays = dict(data)
    meta = json.loads(str(arrays["metadata"]))
    del meta["attribute_to_layer_input"]
    np.savez(tmp_path / "old.npz", **{**arrays, "metadata": np.array(json.dumps(meta))})
    assert Interpretation.load(tmp_path / "old.npz", explainer=after) == region


@pytest.mark.usefixtures("one_thread")
def test_load_with_a_wrong_or_unfitted_explainer_names_it(last_block_fit, tmp_path):
    ri, model, x = last_block_fit
    ri.interpret(x[200:201], **NB).save(tmp_path / "r.npz")
    for wrong in (model, "ri"):
        with pytest.raises(TypeError, match="explainer"):
            Interpretation.load(tmp_path / "r.npz", explainer=wrong)
    with pytest.raises(NotFittedError):
        Interpretation.load(
            tmp_path / "r.npz", explainer=RepresentativeInterpretation(model, model.features[-1])
        )
    # the fitted explainer and its reader both work
    a = Interpretation.load(tmp_path / "r.npz", explainer=ri).contains(x[:20])
    b = Interpretation.load(tmp_path / "r.npz", explainer=ri.reader_).contains(x[:20])
    assert torch.equal(a, b)


def test_load_of_a_file_that_is_no_interpretation_names_path(tiny, tmp_path):
    import numpy as np

    from captum_repinterp import Interpretation

    model, x = tiny
    ri = _fit(model, model.features, x[:80])
    region = ri.interpret(x[200:201], **RANDOM_STATE)
    good = tmp_path / "region.npz"
    region.save(good)
    loaded = Interpretation.load(good, explainer=ri)
    assert torch.equal(loaded.members, region.members)
    assert torch.equal(loaded.contains(x[:80]), region.contains(x[:80]))
    text = tmp_path / "text.npz"
    text.write_text("not an interpretation")
    torch_file = tmp_path / "state.pt"
    torch.save(model.state_dict(), torch_file)
    other_npz = tmp_path / "other.npz"
    np.savez(other_npz, a=np.zeros(3))
    odd_meta = tmp_path / "odd.npz"
    with np.load(good) as data:
        arrays = dict(data)
    np.savez(odd_meta, **{**arrays, "metadata": np.array("[1, 2]")})
    npy = tmp_path / "array.npy"  # np.save's one array: a TypeError from `with` before
    np.save(npy, np.zeros(3))
    for path in (text, torch_file, other_npz, odd_meta, npy):
        with pytest.raises(ValueError, match="^path: "):
            Interpretation.load(path, explainer=ri)
    with pytest.raises(FileNotFoundError):
        Interpretation.load(tmp_path / "missing.npz")


def test_saving_to_an_int_is_refused_and_writes_nothing(tiny, one_thread, tmp_path):
    """``open`` takes an int as a file descriptor: ``region.save(1)`` wrote the ``.npz``
    into stdout and closed it. Here the descriptor is a pipe's writing end: nothing may
    reach the pipe and the descriptor must stay open."""
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features).fit(x[:120], progress=False)
    region = ri.interpret(x[200:201], n_boundaries=10)
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
            region.save(write_end)
        os.write(write_end, b"!")  # still open
        assert os.read(read_end, 1 << 16) == b"!"  # and nothing else was written
        with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
            Interpretation.load(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    region.save(tmp_path / "r.npz")  # a path still works
    assert Interpretation.load(str(tmp_path / "r.npz"), explainer=ri) == region


def test_saving_to_an_empty_path_or_a_directory_names_path(last_block_fit, tmp_path):
    """``save("")`` raised ``ValueError: PosixPath('.') has an empty name`` and
    ``save(folder)`` an ``IsADirectoryError`` naming a temporary file the user never
    gave; both are now a ValueError naming ``path``, and nothing is written."""
    ri, _, x = last_block_fit
    region = ri.interpret(x[200:201], n_boundaries=10, heatmap_layer=None)
    with pytest.raises(ValueError, match="path: an empty path"):
        region.save("")
    with pytest.raises(ValueError, match=r"path: .* is a directory"):
        region.save(tmp_path)
    assert not list(tmp_path.iterdir())


def test_saving_a_layer_map_of_a_plain_function_says_why(tiny, one_thread, tmp_path):
    """With ``forward_func`` a plain function (not an ``nn.Module``) a map drawn at a
    module of the model works but cannot be saved by name; the error said the layer "is
    not a submodule of the model", which it is. It now names ``forward_func``, nothing
    is written, and maps at the split layer or the input still save."""
    model, x = tiny
    ri = RepresentativeInterpretation(lambda z: model(z), model.features[-1])
    ri.fit(x[:120], progress=False)
    region = ri.interpret(x[200:201], n_boundaries=10, heatmap_layer=model.features[0])
    with pytest.raises(ValueError, match="heatmap_layer: .*forward_func is not an nn.Module"):
        region.save(tmp_path / "r.npz")
    assert not list(tmp_path.iterdir())
    region = ri.interpret(x[200:201], n_boundaries=10, heatmap_layer="input")
    region.save(tmp_path / "r.npz")
    assert Interpretation.load(tmp_path / "r.npz", explainer=ri) == region


def test_an_interrupted_save_leaves_the_earlier_file(last_block_fit, tmp_path, monkeypatch):
    """``save`` wrote in place: a save interrupted part-way left a truncated file, which
    ``load`` then refused. Now the earlier file stays whole and no temporary is left."""
    import numpy as np

    ri, _, x = last_block_fit
    first, second = ri.interpret(x[200:201], **NB), ri.interpret(x[201:202], **NB)
    path = tmp_path / "region.npz"
    first.save(path)
    before = path.read_bytes()

    def interrupted(fh, **arrays):
        fh.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        second.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["region.npz"]
    assert Interpretation.load(path, ri) == first


def test_load_with_another_model_or_layer_of_the_same_shape_warns(last_block_fit, tmp_path):
    """Shapes alone let a region load into another model with a layer shaped alike, or
    into the conv before the saved ReLU, and silently give other rule decisions; the
    file now keeps the model's fingerprint and the layer's name, compared at load."""
    ri, model, x = last_block_fit
    region = ri.interpret(x[200:201], **NB)
    region.save(tmp_path / "r.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Interpretation.load(tmp_path / "r.npz", ri) == region  # same explainer
        twin = copy.deepcopy(model)  # same weights, another object
        same = _fit(twin, twin.features[-1], x[:200])
        assert Interpretation.load(tmp_path / "r.npz", same).contains(x[:20]).tolist() == (
            region.contains(x[:20]).tolist()
        )
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head[-1].bias.add_(0.5)
    other = _fit(changed, changed.features[-1], x[:200])
    with pytest.warns(UserWarning, match=r"^explainer: .*a model with other weights"):
        Interpretation.load(tmp_path / "r.npz", other)
    conv = _fit(model, model.features[-1][0], x[:200], ignore_warnings=UserWarning)
    with pytest.warns(
        UserWarning, match=r"another layer \('features.1.0', saved at 'features.1'\)"
    ):
        Interpretation.load(tmp_path / "r.npz", conv)
