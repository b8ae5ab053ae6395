"""QA round 11: what users bring (wrapped models, feature scales, odd arguments).

Each test checks against a hand computation or an exact equivalence (the same model
written another way must give the same regions and maps).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import Scale
from torch import nn

from captum_repinterp import Interpretation, RepresentativeInterpretation, find_layer


def affine_copy(tiny: tuple[nn.Module, torch.Tensor]) -> nn.Sequential:
    """The tiny CNN's features with one linear layer fitted to its predictions' classes."""
    model, x = tiny
    features = copy.deepcopy(model.features)
    lin = nn.Linear(8 * 6 * 6, 4)
    with torch.no_grad():
        h = features(x).flatten(1)
        labels = model(x).argmax(1)
        sol = torch.linalg.lstsq(
            torch.cat([h, torch.ones(len(h), 1)], 1), nn.functional.one_hot(labels, 4).float()
        ).solution
        lin.weight.copy_(sol[:-1].T)
        lin.bias.copy_(sol[-1])
    return nn.Sequential(features, nn.Sequential(nn.Flatten(), lin)).eval()


def scaled(model: nn.Sequential, k: float) -> nn.Sequential:
    """``model`` (features, head) with its features times ``k`` and the weights of the
    head's first linear layer divided by ``k``: for a power of two ``k``, the same
    function bit for bit, its features in other units."""
    features, head = copy.deepcopy(model[0]), copy.deepcopy(model[1])
    lin = next(m for m in head.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        lin.weight.div_(k)
    return nn.Sequential(features, Scale(k), head).eval()


@pytest.mark.parametrize("kind", ["affine", "sampled"])
def test_regions_do_not_depend_on_the_features_units(tiny, one_thread, kind):
    """Features 2**20 times larger (the weights after them as much smaller) describe the
    same boundaries, so the regions must be the same. Before, near-duplicate boundaries
    were judged by the cosine of ``[w, b]``, which the offsets dominate once the normals
    are small: every boundary with an offset of the same sign was merged into the first,
    and an affine head's region (exactly the references predicted as the seed's class)
    took in references of every class (a random-weight Inception-v3, whose features
    reach 6e5, had purity 0.14 to 0.38)."""
    model, x = tiny
    base = affine_copy(tiny) if kind == "affine" else nn.Sequential(model.features, model.head)
    refs, seeds = x[:200], x[200:206]
    regions = {}
    for k in (1.0, 2.0**20):
        net = scaled(base, k)
        ri = RepresentativeInterpretation(net, net[1]).fit(refs, progress=False)
        regions[k] = ri.interpret(seeds, n_boundaries=20)
        if kind == "affine":  # exact: the region is {G_c > G_k for every k}
            with torch.no_grad():
                pred = net(refs).argmax(1)
            for r in regions[k]:
                assert sorted(r.members) == torch.nonzero(pred == r.target).flatten().tolist()
                assert r.purity == 1.0
    for a, b in zip(regions[1.0], regions[2.0**20]):
        assert sorted(a.members) == sorted(b.members)
        assert a.weight.shape == b.weight.shape


@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_a_compiled_model_gives_the_eager_models_results(tiny, one_thread, how):
    """``torch.compile(model)`` (an ``OptimizedModule``) and ``model.compile()`` (compiled
    in place) are the same function as the model: every call must give the eager model's
    maps, and find_layer its layer. Before, the compiled graph ran without the hooks
    registered after compiling, so fit failed with "the given layer was not called
    during the forward pass" (the layer does run), and names started with
    ``_orig_mod.``."""
    model, x = tiny
    refs, seeds = x[:120], x[200:203]
    eager = RepresentativeInterpretation(model, model.features).fit(refs, progress=False)
    if how == "torch.compile":
        compiled = torch.compile(model)
    else:
        compiled = copy.deepcopy(model)
        compiled.compile()
    with torch.no_grad():
        compiled(seeds)  # compiled before it is explained, as deployed
    layer = compiled.get_submodule("features") if how != "torch.compile" else model.features
    ri = RepresentativeInterpretation(compiled, layer).fit(refs, progress=False)
    for heatmap_layer in (None, "input"):
        assert torch.equal(
            ri.attribute(seeds, heatmap_layer=heatmap_layer),
            eager.attribute(seeds, heatmap_layer=heatmap_layer),
        )
    assert find_layer(compiled, seeds[:1], return_name=True) == ("features", layer)


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


def test_a_store_never_overwrites_files_it_did_not_write(tiny, one_thread, tmp_path):
    """``fit(store=folder)`` on a folder that holds no store but a file of a name the
    store writes (``features.npy`` of the user's own) overwrote it without a word. It
    must refuse, naming the file, and leave it as it was; other files are no obstacle,
    and a path below a file is a ValueError naming ``store``."""
    import numpy as np

    model, x = tiny
    mine = tmp_path / "results"
    mine.mkdir()
    np.save(mine / "features.npy", np.arange(5.0))
    ri = RepresentativeInterpretation(model, model.features)
    with pytest.raises(ValueError, match=r"store: .*results.* holds features\.npy"):
        ri.fit(x[:40], progress=False, store=mine)
    assert np.array_equal(np.load(mine / "features.npy"), np.arange(5.0))
    assert sorted(p.name for p in mine.iterdir()) == ["features.npy"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    ri.fit(x[:40], progress=False, store=other)
    assert torch.equal(
        ri.features_,
        RepresentativeInterpretation(model, model.features).fit(x[:40], progress=False).features_,
    )
    assert (other / "notes.txt").read_text() == "mine"

    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"store: cannot make the directory .*a_file/sub"):
        ri.fit(x[:40], progress=False, store=tmp_path / "a_file" / "sub")
