"""Misuse found by hand: each test is a bad input or a reuse that used to go wrong."""

from __future__ import annotations

import copy

import pytest
import torch

from captum_repinterp import RepresentativeInterpretation

RANDOM_STATE = {"random_state": 0}


def _fit(model, layer, refs, **kwargs):
    return RepresentativeInterpretation(model, layer).fit(refs, progress=False, **kwargs)


# ---------------------------------------------------------------------- on-disk store
def test_store_of_another_layer_is_refused(tiny, tmp_path):
    model, x = tiny
    refs = x[:60]
    _fit(model, model.features, refs, store=tmp_path)
    # same number of rows, another layer: the stored features must not be reused
    with pytest.raises(ValueError, match="store"):
        _fit(model, model.features[0], refs, store=tmp_path)


def test_store_of_another_model_is_refused(tiny, tmp_path):
    model, x = tiny
    refs = x[:60]
    first = _fit(model, model.features, refs, store=tmp_path)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.features[1][0].weight.mul_(-1)
    with pytest.raises(ValueError, match="store"):
        _fit(other, other.features, refs, store=tmp_path)
    # the refused fit did not change the store: the first model still reuses it
    again = _fit(model, model.features, refs, store=tmp_path)
    assert torch.equal(again.predictions_, first.predictions_)
    assert torch.equal(again.predictions_, model(refs).argmax(1))


def test_store_of_other_references_is_refused(tiny, tmp_path):
    model, x = tiny
    _fit(model, model.features, x[:60], store=tmp_path)
    with pytest.raises(ValueError, match="store"):
        _fit(model, model.features, x[60:120], store=tmp_path)


def test_store_append_still_works(tiny, tmp_path):
    model, x = tiny
    _fit(model, model.features, x[:40], store=tmp_path)
    ri = _fit(model, model.features, x[40:60], store=tmp_path, append=True)
    assert torch.equal(ri.predictions_, model(x[:60]).argmax(1))


# ---------------------------------------------------------------------- figures
def test_plot_region_takes_the_dataset_or_loader_given_to_fit(tiny):
    from torch.utils.data import DataLoader, TensorDataset

    from captum_repinterp.visualization import _reference_rows, plot_region

    model, x = tiny
    refs = x[:80]
    dataset = TensorDataset(refs, torch.zeros(80))
    loader = DataLoader(dataset, batch_size=16)
    ri = _fit(model, model.features, loader)
    region = ri.interpret(x[200:201], **RANDOM_STATE)
    members = region.similar(3)
    for given in (dataset, loader, TensorDataset(refs)):
        assert torch.equal(_reference_rows(given, members), refs[members])
        assert _reference_rows(given, members[:0]).shape == (0, *refs.shape[1:])
        fig = plot_region(region, x[200], given, k=3)
        assert len(fig.axes) >= 1 + len(members)
    with pytest.raises(ValueError, match="reference_images"):
        plot_region(region, x[200], refs[: int(members.max())])
    with pytest.raises(TypeError, match="reference_images"):
        plot_region(region, x[200], refs.numpy())


# ---------------------------------------------------------------------- command line
@pytest.mark.parametrize("command", ["demo", "report", "evaluate"])
def test_cli_out_that_cannot_be_a_folder_is_a_usage_error(capsys, tmp_path, command):
    from captum_repinterp.cli import main

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "below"):
        with pytest.raises(SystemExit) as info:
            main([command, "--out", str(out)])  # fails before any work
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith(f"captum-repinterp {command}: error: ")
        assert "argument --out" in err
    assert a_file.read_text() == "x"


# ---------------------------------------------------------------------- distributed
def test_distributed_argument_errors_do_not_start_ray(tiny):
    ray = pytest.importorskip("ray")
    from captum_repinterp.distributed import fit_sharded, shard_references

    if ray.is_initialized():
        pytest.skip("Ray is running already: cannot tell whether these calls start it")
    model, x = tiny
    fitted = _fit(model, model.features, x[:40])
    fresh = RepresentativeInterpretation(model, model.features)
    with pytest.raises(TypeError, match="^ri "):
        shard_references(object())
    with pytest.raises(TypeError, match="^actor_options "):
        shard_references(fitted, actor_options=[("num_cpus", 1)])
    with pytest.raises(TypeError, match="^ri "):
        fit_sharded(fitted.references_, x[:40])
    with pytest.raises(ValueError, match="^num_cpus "):
        fit_sharded(fresh, x[:40], num_cpus=-1, progress=False)
    with pytest.raises(ValueError, match="^num_cpus "):
        fit_sharded(fresh, x[:40], num_cpus=0, progress=False)
    with pytest.raises(ValueError, match="^concurrency "):
        fit_sharded(fresh, x[:40], concurrency=0, progress=False)
    with pytest.raises(TypeError, match="^actor_options "):
        fit_sharded(fresh, x[:40], actor_options="num_cpus=1", progress=False)
    assert not ray.is_initialized()


# ---------------------------------------------------------------------- saving
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
    for path in (text, torch_file, other_npz, odd_meta):
        with pytest.raises(ValueError, match="^path: "):
            Interpretation.load(path, explainer=ri)
    with pytest.raises(FileNotFoundError):
        Interpretation.load(tmp_path / "missing.npz")


# ---------------------------------------------------------------------- model failures
class _Scaled(torch.nn.Module):
    """A model with a second forward argument."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, scale):
        return self.model(x * scale)


def test_wrong_additional_forward_args_name_the_argument(tiny):
    model, x = tiny
    refs, seeds = x[:80], x[200:202]
    ri = _fit(model, model.features, refs)
    with pytest.raises(TypeError, match="^additional_forward_args: "):
        ri.attribute(seeds, additional_forward_args=(2.0,), **RANDOM_STATE)
    with pytest.raises(TypeError, match="^additional_forward_args: "):
        _fit(model, model.features, refs, additional_forward_args=(2.0,))
    scaled = _Scaled(model).eval()
    ri2 = _fit(scaled, model.features, refs, additional_forward_args=(1.0,))
    assert torch.equal(ri2.predictions_, ri.predictions_)
    with pytest.raises(TypeError, match="^additional_forward_args: "):
        ri2.attribute(seeds, **RANDOM_STATE)
    with pytest.raises(TypeError, match="^additional_forward_args: "):
        ri2.interpret(seeds, additional_forward_args=(1.0, 2.0), **RANDOM_STATE)
    with pytest.raises(TypeError, match="^additional_forward_args: "):
        _fit(scaled, model.features, refs)


def test_find_layer_bad_example_input_names_it(tiny):
    from captum_repinterp import find_layer

    model, x = tiny
    assert find_layer(model, x[:1]) is model.features
    for bad in (x[0], x[:1, :, :7, :7], torch.randn(1, 3, 12, 12)):
        with pytest.raises(ValueError, match="^example_input: "):
            find_layer(model, bad)
    with pytest.raises(TypeError, match="^example_input: "):
        find_layer(model, (x[:1] * 100).to(torch.uint8))
    with pytest.raises(ValueError, match="^example_input: "):
        find_layer(model, x[:0])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_cli_model_factory_that_needs_arguments_names_it(capsys, tmp_path):
    from captum_repinterp.cli import main

    with pytest.raises(SystemExit) as info:
        main(["report", "--out", str(tmp_path / "r"), "--model-factory", "os.path:join",
              "--data", "os:getcwd"])  # fmt: skip
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("captum-repinterp report: error: model_factory: os.path:join must ")


def test_shuffled_loader_warns_at_fit_and_is_refused_by_plot_region(tiny):
    from torch.utils.data import DataLoader, TensorDataset

    from captum_repinterp.visualization import plot_region

    model, x = tiny
    loader = DataLoader(TensorDataset(x[:80]), batch_size=16, shuffle=True)
    with pytest.warns(UserWarning, match="does not read its dataset in order") as caught:
        ri = _fit(model, model.features, loader)
    assert caught[0].filename == __file__  # points at the caller of fit
    region = ri.interpret(x[200:201], **RANDOM_STATE)
    with pytest.raises(ValueError, match="^reference_images: .*in order"):
        plot_region(region, x[200], loader)
