"""The command line: bad arguments end in a one-line usage error (exit status 2)."""

import argparse
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from captum_repinterp import cli
from captum_repinterp.cli import main
from captum_repinterp.report_inputs import prepare_report

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
                nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()),
            )
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 5 * 5, 3))

        def forward(self, x):
            return self.head(self.features(x))


    def factory():
        torch.manual_seed(0)
        return Net().eval()


    def not_a_model():
        return "model"


    def data():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(160, 1, 10, 10, generator=gen)
        return x[:120], x[120:]


    def labelled():
        x, y = data()
        with torch.no_grad():
            preds = factory()(torch.cat([x, y])).argmax(1)
        return x, y, preds[:120], preds[120:]


    def bad_data():
        return data()[0]


    def nan_data():
        x, y = data()
        x[3, 0, 2, 2] = float("nan")
        return x, y


    def one_class():
        x, y = data()
        return x[:1].repeat(120, 1, 1, 1), y


    def inf_heldout():
        x, y = data()
        y[0, 0, 0, 0] = float("inf")
        return x, y


    def uint8_data():
        x, y = data()
        return (x * 50 + 128).clamp(0, 255).byte(), y


    def uint8_heldout():
        x, y = data()
        return x, (y * 50 + 128).clamp(0, 255).byte()


    def three_channels():
        x, y = data()
        return x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)


    class Folder(torch.utils.data.TensorDataset):
        # (image, label) items and folder names, as an ImageFolder gives
        classes = ["ant", "bee", "cat"]


    def folder():
        x, y, ref_labels, held_labels = labelled()
        refs = Folder(x, ref_labels)
        held = torch.utils.data.DataLoader(Folder(y, held_labels), batch_size=16)
        return refs, held


    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 10 * 10, 3))

        def forward(self, x):
            h = torch.relu(self.conv1(x))
            return self.head(torch.relu(self.conv2(h) + h))


    def with_head():
        model = factory()
        return model, model.features[-1], model.head


    def skip_model():
        torch.manual_seed(0)
        return Skip().eval()


    def not_a_cut():
        torch.manual_seed(0)
        model = Skip().eval()
        return model, model.conv2  # inside the residual block: h bypasses it
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "ri_user_mod.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "ri_user_mod"
    sys.modules.pop("ri_user_mod", None)


def _usage_error(capsys, argv: list[str]) -> str:
    """Run main(argv), expect argparse's exit status 2; return the one-line message."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: captum-repinterp")
    assert lines[-1].startswith("captum-repinterp")
    assert ": error: " in lines[-1]
    return lines[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "--classes", "a,b"], "--classes: must be comma-separated"),
        (["report", "--classes", "-1"], "--classes: must be comma-separated"),
        (["report", "--regions", "0"], "--regions: must be a positive int"),
        (["report", "--random-state", "x"], "--random-state/--seed: must be an int"),
        (["demo", "--seeds", "0"], "--seeds: a count must be at least 1"),
        (["demo", "--seeds", "two"], "--seeds: must be a count"),
        (["demo", "--seeds", "1,-2"], "--seeds: must be comma-separated"),
        (["evaluate", "--setup", "cifar"], "--setup: invalid choice: 'cifar'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_parse_errors(capsys, argv, message):
    assert message in _usage_error(capsys, argv)


_USER = ["--model-factory", "ri_user_mod:factory", "--data", "ri_user_mod:data"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*_USER, "--layer", "nope"], "layer: the model has no submodule 'nope'"),
        ([*_USER, "--layer", ""], "layer: the model has no submodule ''"),
        ([*_USER, "--layer", " "], "layer: the model has no submodule ' '"),
        ([*_USER, "--layer", "features.9"], "layer: the model has no submodule 'features.9'"),
        (["--layer", "features"], "--layer and --class-names apply to --model-factory's"),
        (["--class-names", "a,b,c"], "--layer and --class-names apply to --model-factory's"),
        ([*_USER, "--class-names", "a,,c"], "--class-names: must be comma-separated non-empty"),
        ([*_USER, "--class-names", "@no-such-file.txt"], "--class-names: cannot read"),
        ([*_USER, "--class-names", "a"], "class_names: 1 names, but the model predicts class"),
        (
            ["--model-factory", "ri_user_mod:with_head", "--data", "ri_user_mod:data"]
            + ["--layer", "features.0"],
            "layer: the model factory also returned a head",
        ),
    ],
)
def test_report_layer_and_class_names_errors(capsys, tmp_path, user_module, argv, message):
    line = _usage_error(capsys, ["report", "--out", str(tmp_path / "o"), *argv])
    assert message in line
    assert not (tmp_path / "o").exists()


def test_report_data_as_datasets_with_labels_and_folder_names(user_module):
    import ri_user_mod

    x, y, ref_labels, held_labels = ri_user_mod.labelled()
    inputs = prepare_report("ri_user_mod:factory", "ri_user_mod:folder")
    assert torch.equal(inputs.references, x) and torch.equal(inputs.heldout, y)
    assert torch.equal(inputs.reference_labels, ref_labels)
    assert torch.equal(inputs.heldout_labels, held_labels)
    assert inputs.class_names == ["ant", "bee", "cat"]
    named = prepare_report("ri_user_mod:factory", "ri_user_mod:folder", class_names=["a"] * 3)
    assert named.class_names == ["a", "a", "a"]


def test_prepare_report_layer_by_name_or_auto(user_module):
    import ri_user_mod

    from captum_repinterp import find_layer

    named = prepare_report(
        "ri_user_mod:factory", "ri_user_mod:data", layer="features.0.1", class_names=["a", "b", "c"]
    )
    assert named.layer is named.model.features[0][1] and named.head is None
    assert named.class_names == ["a", "b", "c"]
    auto = prepare_report("ri_user_mod:factory", "ri_user_mod:data", layer="auto")
    assert auto.layer is find_layer(auto.model, ri_user_mod.data()[0][:4])
    # a bare model without .features, made usable by --layer
    skip = prepare_report("ri_user_mod:skip_model", "ri_user_mod:data", layer="conv1")
    assert skip.layer is skip.model.conv1


def test_report_with_layer_and_class_names(tmp_path, user_module):
    out = tmp_path / "out"
    argv = ["report", "--out", str(out), *_USER, "--regions", "1", "--classes", "2"]
    assert main([*argv, "--layer", "features.0", "--class-names", "ant,bee,cat"]) == 0
    page = (out / "index.html").read_text()
    assert "2 (cat)" in page
    assert "features.0" in page  # the split layer the report names


def test_class_names_with_commas_come_from_a_file(tmp_path, capsys):
    """Names such as ImageNet's "tench, Tinca tinca" hold commas, which the
    comma-separated form splits; ``@FILE`` reads one name per line."""
    names = tmp_path / "names.txt"
    names.write_text("tench, Tinca tinca\n goldfish \ngreat white shark\n\n", encoding="utf-8")
    assert cli._name_list(f"@{names}") == ["tench, Tinca tinca", "goldfish", "great white shark"]
    assert cli._name_list("a, b") == ["a", "b"]
    names.write_text("a\n\nc\n", encoding="utf-8")
    with pytest.raises(argparse.ArgumentTypeError, match="one non-empty name per line"):
        cli._name_list(f"@{names}")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model-factory", "nocolon", "--data", "ri_user_mod:data"],
            "model_factory must look like 'package.module:function', got 'nocolon'",
        ),
        (
            ["--model-factory", "no_such_mod_xyz:f", "--data", "ri_user_mod:data"],
            "model_factory: cannot import module 'no_such_mod_xyz'",
        ),
        (
            ["--model-factory", "ri_user_mod:nope", "--data", "ri_user_mod:data"],
            "model_factory: 'ri_user_mod' has no callable 'nope'",
        ),
        (
            ["--model-factory", "ri_user_mod:not_a_model", "--data", "ri_user_mod:data"],
            "model factory must return an nn.Module, got str",
        ),
        (
            ["--model-factory", "ri_user_mod:factory", "--data", "ri_user_mod:nan_data"],
            "data: reference_images contain NaN or inf values",
        ),
        (
            ["--model-factory", "ri_user_mod:factory", "--data", "ri_user_mod:inf_heldout"],
            "data: heldout_images contain NaN or inf values",
        ),
        (
            ["--model-factory", "ri_user_mod:factory", "--data", "ri_user_mod:one_class"],
            "data: reference_images: the model predicts a single class",
        ),
        (
            ["--model-factory", "ri_user_mod:factory", "--data", "ri_user_mod:bad_data"],
            "data must return (reference_images, heldout_images)",
        ),
        (["--model-factory", "ri_user_mod:factory"], "give both --model-factory and --data"),
        (["--data", "ri_user_mod:data"], "give both --model-factory and --data"),
        (
            [
                "--model-factory",
                "ri_user_mod:factory",
                "--data",
                "ri_user_mod:data",
                "--classes",
                "42",
            ],
            "classes: none of [42] is predicted on the held-out images",
        ),
    ],
)
def test_report_argument_errors(capsys, tmp_path, user_module, argv, message):
    line = _usage_error(capsys, ["report", "--out", str(tmp_path / "o"), *argv])
    assert line.startswith("captum-repinterp report: error: ")
    assert message in line
    assert not (tmp_path / "o").exists()  # nothing ran


@pytest.mark.parametrize(
    ("data", "classes", "message"),
    [
        ("uint8_data", [], "data: reference_images: the model failed on tensor(s) (1, 1, 10, 10)"),
        ("uint8_heldout", [], "data: heldout_images: the model failed on tensor(s)"),
        ("uint8_heldout", ["--classes", "0"], "data: heldout_images: the model failed on"),
        ("three_channels", [], "data: reference_images: the model failed on a batch"),
    ],
)
def test_report_images_the_model_cannot_take_are_a_usage_error(
    capsys, tmp_path, user_module, data, classes, message
):
    """Images of another dtype or channel count than the model takes: one line naming the
    data argument, found on one image before any work (not a traceback from fit)."""
    argv = ["--model-factory", "ri_user_mod:factory", "--data", f"ri_user_mod:{data}"]
    line = _usage_error(capsys, ["report", "--out", str(tmp_path / "o"), *argv, *classes])
    assert message in line, line
    assert not (tmp_path / "o" / "index.html").exists()


def test_report_factory_layer_that_is_not_a_cut_is_a_usage_error(capsys, tmp_path, user_module):
    """The factory's layer is an argument: fit's NotACutError ends in one line, status 2."""
    argv = ["--model-factory", "ri_user_mod:not_a_cut", "--data", "ri_user_mod:data"]
    line = _usage_error(capsys, ["report", "--out", str(tmp_path / "o"), *argv])
    assert line.startswith("captum-repinterp report: error: model-factory: ")
    assert "cut" in line


def test_demo_report_bad_class_is_a_usage_error(capsys, monkeypatch):
    """``report --classes 42`` on the demo: one line, status 2 (the demo is not run)."""
    import captum_repinterp.report_inputs as report_inputs

    calls = []

    def fake(model_factory, data, classes, random_state, **_):
        calls.append(classes)
        raise ValueError(f"classes: none of {classes} is predicted on the held-out images")

    monkeypatch.setattr(report_inputs, "prepare_report", fake)
    line = _usage_error(capsys, ["report", "--classes", "42"])
    assert calls == [[42]]
    assert "classes: none of [42]" in line


def test_report_with_user_model(tmp_path, user_module, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "report",
                "--out",
                str(out),
                "--model-factory",
                "ri_user_mod:factory",
                "--data",
                "ri_user_mod:data",
                "--regions",
                "1",
            ]
        )
        == 0
    )
    assert f"report written to {(out / 'index.html').resolve()}" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert "Audit report: ri_user_mod:factory" in page
    assert "No true labels were given" in page
    import ri_user_mod

    with torch.no_grad():
        held_classes = ri_user_mod.factory()(ri_user_mod.data()[1]).argmax(1).unique()
    # one region per class predicted on the held-out images (--regions 1)
    assert len(list(out.glob("region_??_class*.png"))) == held_classes.numel()


def test_report_with_labelled_data(tmp_path, user_module):
    out = tmp_path / "out"
    assert (
        main(
            [
                "report",
                "--out",
                str(out),
                "--model-factory",
                "ri_user_mod:factory",
                "--data",
                "ri_user_mod:labelled",
                "--regions",
                "1",
                "--classes",
                "2",
            ]
        )
        == 0
    )
    page = (out / "index.html").read_text()
    # the labels are the model's own predictions: accuracy 100%, nothing misclassified
    assert "on the references 100.0%" in page and "on the held-out images 100.0%" in page
    assert "<th>misclassified</th>" in page


def test_prepare_report_resolves_without_running(user_module):
    inputs = prepare_report("ri_user_mod:factory", "ri_user_mod:labelled", [0, 2])
    assert inputs.classes == [0, 2] and inputs.reference_labels.shape == (120,)
    assert inputs.layer is inputs.model.features[-1]


def test_help_shows_defaults(capsys):
    for argv, defaults in (
        (["demo", "--help"], ["(default: 4)", "(default: out)", "(default: 0)", "0,100"]),
        (["report", "--help"], ["(default: 2)", "(default: report)"]),
        (["evaluate", "--help"], ["(default: evaluation)"]),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for d in defaults:
            assert d in text, (argv, d)
        # options without a default say what happens in their help, not "(default: None)"
        assert "(default: None)" not in text, argv


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4", 4), ("0,100", [0, 100]), ("7,", [7]), (" 3 , 5 ", [3, 5])],
)
def test_seeds_argument(text, expected):
    assert cli._seeds(text) == expected


def test_demo_passes_seeds(monkeypatch, tmp_path):
    import captum_repinterp.demo as demo

    got = {}
    monkeypatch.setattr(
        demo,
        "run_demo",
        lambda out, seeds, random_state: got.update(
            out=out, seeds=seeds, random_state=random_state
        ),
    )
    assert main(["demo", "--out", str(tmp_path), "--seeds", "0,100", "--seed", "3"]) == 0
    assert got == {"out": str(tmp_path), "seeds": [0, 100], "random_state": 3}


def test_evaluate_says_where_and_warns_on_quick(monkeypatch, tmp_path, capsys):
    import captum_repinterp.evaluation as evaluation

    got = {}

    def fake(setups, out, seed=0, quick=False):
        got.update(setups=setups, out=out, seed=seed, quick=quick)
        return {}

    monkeypatch.setattr(evaluation, "run_evaluation", fake)
    assert main(["evaluate", "--setup", "digits", "--out", str(tmp_path), "--quick"]) == 0
    assert got == {"setups": ["digits"], "out": str(tmp_path), "seed": 0, "quick": True}
    out = capsys.readouterr().out
    assert f"results written to {tmp_path.resolve() / 'results.json'}" in out
    assert "not evidence" in out
    assert main(["evaluate", "--setup", "digits", "--out", str(tmp_path)]) == 0
    assert "not evidence" not in capsys.readouterr().out


def test_tests_use_a_temporary_cache(temporary_cache):
    from captum_repinterp.datasets import cache_dir

    assert str(cache_dir()) == temporary_cache
    assert os.environ["CAPTUM_REPINTERP_CACHE"] == temporary_cache


# ---------------------------------------------------------- --out, --model-factory, --random-state
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


def test_cli_model_factory_that_needs_arguments_names_it(capsys, tmp_path):
    from captum_repinterp.cli import main

    with pytest.raises(SystemExit) as info:
        main(["report", "--out", str(tmp_path / "r"), "--model-factory", "os.path:join",
              "--data", "os:getcwd"])  # fmt: skip
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("captum-repinterp report: error: model_factory: os.path:join must ")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("command", ["report", "demo", "evaluate"])
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_cli_random_state_out_of_range_is_a_usage_error(capsys, command, seed):
    """The report's audit hands the seed to scikit-learn, which takes [0, 2**32): a
    seed outside failed with a traceback after the model had run."""
    from captum_repinterp.cli import main

    with pytest.raises(SystemExit) as info:
        main([command, "--random-state", seed])
    assert info.value.code == 2
    assert "--random-state/--seed: must be an int in [0, 2**32)" in capsys.readouterr().err


def test_warnings_of_a_command_name_the_command_not_runpy(tmp_path):
    """A package warning raised while ``python -m captum_repinterp`` runs pointed at
    ``<frozen runpy>`` (the first frame outside the package) with the line
    ``warnings.warn(...)``; the command now prints it as ``captum-repinterp:
    UserWarning: message`` on stderr, once however often it is given (the report's fit,
    audit and maps each gave the same curved-head warning)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import runpy, sys\n"
        "import captum_repinterp.demo as demo\n"
        "from captum_repinterp.features import warn_training\n"
        "demo.run_demo = lambda *a, **k: [warn_training() for _ in range(3)]\n"
        f"sys.argv = ['captum-repinterp', 'demo', '--out', {str(tmp_path / 'o')!r}]\n"
        "runpy.run_module('captum_repinterp', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "always", str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "training mode" in line]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("captum-repinterp: UserWarning: the model is in training mode")
    assert "runpy" not in done.stderr


@pytest.mark.parametrize("command", ["demo", "evaluate", "report"])
def test_out_folder_that_cannot_be_made_is_a_usage_error(
    capsys, tmp_path, monkeypatch, user_module, command
):
    """``--out`` on a read-only mount (or under /proc as root, where os.access says yes):
    one line naming --out and status 2, not a FileNotFoundError / OSError traceback."""
    import errno
    import pathlib

    import captum_repinterp.demo as demo
    import captum_repinterp.evaluation as evaluation

    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if "ro_out" in str(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("the job ran")

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.setattr(demo, "run_demo", never)
    monkeypatch.setattr(evaluation, "run_evaluation", never)
    argv = [command, "--out", str(tmp_path / "ro_out")]
    if command == "report":
        argv += ["--model-factory", "ri_user_mod:factory", "--data", "ri_user_mod:data"]
    line = _usage_error(capsys, argv)
    assert line.startswith(f"captum-repinterp {command}: error: argument --out: ")
    assert "Read-only file system" in line


def test_demo_seed_index_beyond_the_heldout_images_is_a_usage_error(capsys, tmp_path, monkeypatch):
    """``demo --seeds 999999,``: one line, status 2, found before the fit (was a traceback)."""
    import types

    import captum_repinterp.demo as demo

    def never(*args, **kwargs):
        raise AssertionError("the setup ran")

    monkeypatch.setattr(demo, "mnist_setup", lambda rs: types.SimpleNamespace(heldout=[0] * 10))
    monkeypatch.setattr(demo, "run_setup", never)
    line = _usage_error(capsys, ["demo", "--out", str(tmp_path / "d"), "--seeds", "3,999999"])
    assert "seeds: held-out indices must lie in 0..9, got [3, 999999]" in line
