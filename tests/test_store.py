"""On-disk reference store: same results as in RAM, append / resume, bounded memory."""

from __future__ import annotations

import copy
import json
import mmap
import os
import sys

import numpy as np
import pytest
import torch
from conftest import fit as _fit
from torch import nn

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp._memory import PeakAnon, rss_anon_kb
from captum_repinterp.match import margins
from captum_repinterp.store import ReferenceStore


def _model(d: int = 24, hidden: int = 16, classes: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Identity(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    ).eval()


def _refs(n: int, d: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("d", [24, 96])  # 96: the head's 16 units allow the projection
def test_store_matches_ram(tmp_path, d):
    model = _model(d=d)
    refs = _refs(600, d=d)
    seeds = _refs(4, d=d, seed=2)
    ram = RepresentativeInterpretation(model, model[0]).fit(refs, batch_size=64, progress=False)
    disk = RepresentativeInterpretation(model, model[0]).fit(
        refs, batch_size=64, progress=False, store=tmp_path / "s"
    )
    assert isinstance(disk.features_, torch.Tensor)
    assert torch.equal(disk.features_, ram.features_)
    assert torch.equal(disk.predictions_, ram.predictions_)
    a = ram.interpret(seeds, n_boundaries=20)
    b = disk.interpret(seeds, n_boundaries=20)
    for x, y in zip(a, b):
        assert torch.equal(x.weight, y.weight) and torch.equal(x.bias, y.bias)
        assert torch.equal(x.members, y.members)
        assert torch.equal(x.member_distances, y.member_distances)
        assert x.purity == y.purity and x.coverage == y.coverage
    assert torch.equal(
        ram.attribute(seeds, n_boundaries=20), disk.attribute(seeds, n_boundaries=20)
    )
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["n"] == 600 and meta["dim"] == d and meta["complete"] is True
    assert np.load(tmp_path / "s" / "features.npy", mmap_mode="r").shape == (600, d)
    # the projection shortcut is kept on disk next to the features (never in RAM)
    assert (ram.projection_ is None) == (d == 24) == (disk.projection_ is None)
    if disk.projection_ is not None:
        on_disk = np.load(tmp_path / "s" / "projected.npy", mmap_mode="r")
        assert on_disk.shape == (600, 16)
        assert torch.equal(disk.projection_.projected, ram.projection_.projected)
    # the tensors are copy-on-write views of the files: changing them never changes the store
    disk.features_[0, 0] = 123.0
    assert np.load(tmp_path / "s" / "features.npy", mmap_mode="r")[0, 0] != 123.0


def test_append_equals_one_fit(tmp_path):
    model = _model()
    refs = _refs(700)
    one = RepresentativeInterpretation(model, model[0]).fit(refs, progress=False)
    ri = RepresentativeInterpretation(model, model[0])
    for s in range(0, 700, 150):  # grows past the first capacity (150 rows)
        ri.fit(refs[s : s + 150], batch_size=64, progress=False, store=tmp_path / "a", append=True)
    assert ri.n_references_ == 700
    assert torch.equal(ri.features_, one.features_)
    assert torch.equal(ri.predictions_, one.predictions_)
    reopened = ReferenceStore.open(tmp_path / "a")
    assert reopened.n == 700 and reopened.complete


def test_append_with_another_model_is_refused(tmp_path):
    """Appending (or reusing) a store written by a model with other weights would mix
    two models' rows: refused. The same weights in a new object pass; a store without
    a fingerprint (written before it was kept) passes too."""
    import json

    from captum_repinterp.store import model_fingerprint

    model, other = _model(), _model(seed=3)
    twin = _model()
    assert model_fingerprint(model) == model_fingerprint(twin)
    assert model_fingerprint(model) != model_fingerprint(other)
    assert model_fingerprint(lambda x: x) is None
    refs = _refs(300)
    path = tmp_path / "s"
    RepresentativeInterpretation(model, model[0]).fit(refs[:150], progress=False, store=path)
    assert json.loads((path / "meta.json").read_text())["model"] == model_fingerprint(model)
    for stranger in (other, _model().double()):
        with pytest.raises(ValueError, match="written by a model with other weights"):
            RepresentativeInterpretation(stranger, stranger[0]).fit(
                refs[150:].to(next(stranger.parameters()).dtype),
                progress=False,
                store=path,
                append=True,
            )
    ri = RepresentativeInterpretation(twin, twin[0])
    ri.fit(refs[150:], progress=False, store=path, append=True)
    assert ri.n_references_ == 300
    meta = json.loads((path / "meta.json").read_text())
    del meta["model"]  # a store from before the fingerprint
    (path / "meta.json").write_text(json.dumps(meta))
    ri = RepresentativeInterpretation(other, other[0])
    ri.fit(refs[:50], progress=False, store=path, append=True)
    assert ri.n_references_ == 350


def test_resume_after_interruption(tmp_path):
    model = _model()
    from conftest import Interrupted, interrupt_on_call

    refs = _refs(500)
    ri = RepresentativeInterpretation(model, model[0])
    with interrupt_on_call(model[0], 4), pytest.raises(Interrupted):
        ri.fit(refs, batch_size=64, progress=False, store=tmp_path / "r")
    partial = ReferenceStore.open(tmp_path / "r")
    assert partial.n == 3 * 64 and not partial.complete
    # resume: only the remaining rows are computed
    seen = []
    handle = model[0].register_forward_hook(lambda _m, i, _o: seen.append(i[0].shape[0]))
    ri.fit(refs, batch_size=64, progress=False, store=tmp_path / "r")
    handle.remove()
    # (one-row calls are fit's trace of the head on the first example, calls of at most
    # four rows its cut check on the first references)
    assert sum(k for k in seen if k > 4) == 500 - 3 * 64
    full = RepresentativeInterpretation(model, model[0]).fit(refs, progress=False)
    assert torch.equal(ri.features_, full.features_)
    assert torch.equal(ri.predictions_, full.predictions_)
    # a finished store of the same size is reused; a different one needs append=True
    seen.clear()
    handle = model[0].register_forward_hook(lambda _m, i, _o: seen.append(i[0].shape[0]))
    ri.fit(refs, progress=False, store=tmp_path / "r")
    handle.remove()
    assert all(k <= 4 for k in seen)
    with pytest.raises(ValueError, match="append=True"):
        ri.fit(refs[:10], progress=False, store=tmp_path / "r")


def test_bad_arguments(tmp_path):
    model = _model()
    ri = RepresentativeInterpretation(model, model[0])
    with pytest.raises(ValueError, match="append"):
        ri.fit(_refs(10), append=True, progress=False)
    with pytest.raises(TypeError, match="store"):
        ri.fit(_refs(10), store=3, progress=False)
    with pytest.raises(ValueError, match="store"):
        ReferenceStore.open(tmp_path / "nothing")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_interpret_memory_bounded_with_store(tmp_path):
    """Per-seed work on a 160 MB store stays far below N x D in anonymous memory."""
    d, n, chunk = 512, 80_000, 10_000
    model = _model(d=d, hidden=32, classes=4)
    ri = RepresentativeInterpretation(model, model[0])
    for s in range(0, n, chunk):
        ri.fit(
            _refs(chunk, d=d, seed=10 + s),
            batch_size=2048,
            progress=False,
            store=tmp_path / "big",
            append=True,
        )
    feature_mb = n * d * 4 / 2**20
    x = _refs(1, d=d, seed=3)
    with PeakAnon() as mem:
        it = ri.interpret(x, n_boundaries=30)
    assert len(it.members) > 0
    assert mem.mb < 0.25 * feature_mb, (mem.mb, feature_mb)


def test_margins_reads_in_chunks():
    """``margins`` touches at most ``chunk_size`` rows at a time and matches one product."""
    feats = _refs(1000, d=8)
    w, b = _refs(5, d=8, seed=4), _refs(1, d=5, seed=5)[0]
    sizes = []

    class Spy:
        shape = feats.shape
        device = feats.device

        def dim(self) -> int:
            return 2

        def __getitem__(self, key):  # noqa: ANN001
            part = feats[key]
            sizes.append(part.shape[0])
            return part

    out = margins(Spy(), w, b, chunk_size=128)  # type: ignore[arg-type]
    assert max(sizes) <= 128 and sum(sizes) == 1000
    ref = feats.double() @ w.double().T + b.double()
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_sampler_sees_a_short_lived_allocation():
    """PeakAnon catches a 64 MiB block that is freed before the block ends.

    The block is a private anonymous mapping of its own, written page by page, and
    unmapped at the end: malloc (``np.ones``) could serve it from freed heap pages still
    resident after earlier tests, and then RssAnon did not grow (a CI run saw 4 KiB).
    (``mmap.mmap(-1, n)`` alone is a shared mapping, counted as RssShmem.)"""
    size = 64 * 2**20
    before = rss_anon_kb()
    with PeakAnon() as mem:
        block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        np.frombuffer(block, dtype=np.uint8)[:] = 1  # touch every page
        held = rss_anon_kb()
        block.close()
    assert held - before >= 60 * 1024
    # the sampler's own baseline is read when the block starts; under load other pages
    # of the process come and go meanwhile (a CI run measured 59.7 MB once)
    assert 48 <= mem.mb <= 80, mem.mb
    with PeakAnon() as idle:
        pass
    assert idle.mb < 8
    with pytest.raises(ValueError, match="interval"):
        PeakAnon(interval=0)


# --------------------- stores of other references, files it did not write, a resume inside a batch
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


def test_append_at_another_layer_of_the_same_shape_is_refused(tiny, tmp_path):
    """Appending at another layer of the same model whose output has the store's shape
    (the conv before the ReLU the store was fitted at) would mix two layers' features in
    one reference set: refused before a row is written. The same layer (another
    explainer) still appends."""
    model, x = tiny
    block = model.features[-1]  # conv -> ReLU
    _fit(model, block, x[:40], store=tmp_path)
    before = (tmp_path / "meta.json").read_text()
    with pytest.raises(ValueError, match=r"store: .*'features\.1'.*'features\.1\.0'"):
        _fit(model, block[0], x[40:60], store=tmp_path, append=True)
    assert (tmp_path / "meta.json").read_text() == before
    ri = _fit(model, block, x[40:60], store=tmp_path, append=True)
    assert ri.n_references_ == 60


def test_a_store_being_written_is_refused_to_a_second_fit(tiny, one_thread, tmp_path):
    """Two fits writing one store at once (two processes appending) took each other's
    running append for an interrupted one and wrote into it: rows of both sets mixed in
    one store. The store is locked while a fit writes: a second fit meanwhile is refused
    (here run from inside the first, as another process would); the first one's rows
    are those of a fit in one go, and the second succeeds once the first has finished."""
    model, x = tiny
    twin = copy.deepcopy(model)  # the other writer (no hook of the first on it)
    path = tmp_path / "s"
    _fit(model, model.features, x[:40], store=path)
    errors: list[Exception] = []
    calls = [0]

    def second_writer(*_: object) -> None:
        calls[0] += 1
        if calls[0] == 3:  # the first call's second batch of rows
            for append in (True, False):
                try:
                    _fit(twin, twin.features, x[100:160], store=path, append=append)
                except ValueError as exc:
                    errors.append(exc)

    handle = model.features.register_forward_hook(second_writer)
    try:
        first = _fit(model, model.features, x[40:100], store=path, append=True, batch_size=20)
    finally:
        handle.remove()
    assert len(errors) == 2
    assert all("is being written by another fit" in str(e) for e in errors)
    with torch.no_grad():
        assert torch.equal(first.predictions_, model(x[:100]).argmax(1))
        torch.testing.assert_close(first.features_, model.features(x[:100]).flatten(1))
    again = _fit(twin, twin.features, x[100:160], store=path, append=True)
    assert again.n_references_ == 160


def test_store_append_still_works(tiny, tmp_path):
    model, x = tiny
    _fit(model, model.features, x[:40], store=tmp_path)
    ri = _fit(model, model.features, x[40:60], store=tmp_path, append=True)
    assert torch.equal(ri.predictions_, model(x[:60]).argmax(1))


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


def test_store_resumed_inside_a_batch_with_another_batch_size_equals_ram(relu_fit, tmp_path):
    """A fit interrupted after two batches of 32, resumed with batches of 50 (so the
    resume starts inside a batch), stores what the in-memory fit keeps, and its regions
    and maps are the same."""
    model, x, ram = relu_fit
    from conftest import Interrupted, interrupt_on_call

    refs = x[:120]
    with interrupt_on_call(model.pool, 3), pytest.raises(Interrupted):
        _fit(model, model.pool, refs, batch_size=32, store=tmp_path / "s")
    partial = ReferenceStore.open(tmp_path / "s")
    assert not partial.complete and partial.n % 50 != 0 and 0 < partial.n < 120
    ri = _fit(model, model.pool, refs, batch_size=50, store=tmp_path / "s")
    assert ri.store_.n == 120 and ri.store_.complete
    torch.testing.assert_close(ri.features_, ram.features_, rtol=0, atol=1e-6)
    assert torch.equal(ri.predictions_, ram.predictions_)
    for rule in ("elementwise", "channel-members"):
        a = ram.interpret(x[125:126], heatmap_rule=rule, heatmap_layer=None)
        b = ri.interpret(x[125:126], heatmap_rule=rule, heatmap_layer=None)
        assert torch.equal(a.members, b.members)
        torch.testing.assert_close(a.weight, b.weight)
        torch.testing.assert_close(a.heatmap(x[130:133]), b.heatmap(x[130:133]))
    assert ri.heatmap_resolution_ == ram.heatmap_resolution_


def test_interrupted_append_resumes_with_append_true(tmp_path):
    """An append interrupted part-way is resumed by the same call (``append=True``, same
    references): the store then equals one fitted in one go, with no row written twice;
    resuming it without ``append``, or appending to an interrupted first fit, is refused
    (either would mix or skip rows)."""
    from conftest import Interrupted, interrupt_on_call

    model = _model()
    a, b = _refs(150), _refs(300, seed=3)
    whole = RepresentativeInterpretation(model, model[0]).fit(
        torch.cat([a, b]), batch_size=64, progress=False
    )
    path = tmp_path / "s"
    ri = RepresentativeInterpretation(model, model[0])
    ri.fit(a, batch_size=64, progress=False, store=path)
    with interrupt_on_call(model[0], 3), pytest.raises(Interrupted):
        ri.fit(b, batch_size=64, progress=False, store=path, append=True)
    partial = ReferenceStore.open(path)
    assert partial.n == 150 + 2 * 64 and not partial.complete
    with pytest.raises(ValueError, match=r"store: .*interrupted append.*append=True"):
        ri.fit(b, batch_size=64, progress=False, store=path)
    assert ReferenceStore.open(path).n == 150 + 2 * 64  # nothing written
    ri.fit(b, batch_size=100, progress=False, store=path, append=True)
    assert ri.store_.n == 450 and ri.store_.complete
    assert torch.equal(ri.features_, whole.features_)
    assert torch.equal(ri.predictions_, whole.predictions_)
    # an interrupted first fit is resumed before anything is appended
    with interrupt_on_call(model[0], 2), pytest.raises(Interrupted):
        ri.fit(a, batch_size=64, progress=False, store=tmp_path / "t")
    with pytest.raises(ValueError, match=r"store: .*interrupted fit.*append=False"):
        ri.fit(b, batch_size=64, progress=False, store=tmp_path / "t", append=True)
    assert ReferenceStore.open(tmp_path / "t").n == 64


def _edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def _truncate(name, nbytes):
    def cut(path):
        with open(path / name, "r+b") as f:
            f.truncate((path / name).stat().st_size - nbytes)

    return cut


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: (p / "meta.json").write_text('{"format": "captum_repinterp.refer'),
        lambda p: (p / "meta.json").write_text(""),
        lambda p: (p / "meta.json").write_text("[1, 2]"),
        _truncate("features.npy", 4 * 24 * 10),
        _truncate("predictions.npy", 8 * 10),
        _truncate("logits.npy", 4 * 3 * 10),
        lambda p: (p / "predictions.npy").unlink(),
        lambda p: (p / "features.npy").write_bytes(b"not an array"),
        lambda p: np.save(p / "features.npy", np.zeros((200, 24), np.float64)),
        lambda p: np.save(p / "features.npy", np.zeros((200, 12), np.float32)),
        lambda p: _edit_meta(p, n=201),
        lambda p: _edit_meta(p, n=-1),
        lambda p: _edit_meta(p, dim=12),
        lambda p: _edit_meta(p, layout=None),
    ],
)
@pytest.mark.parametrize("complete", [True, False])
def test_damaged_store_is_refused(tmp_path, damage, complete):
    """A store whose meta.json or arrays are damaged (truncated, missing, of another
    shape or type, or counting rows it lacks) is refused with a ValueError naming
    ``store``, when reused and when resumed; never read as it is."""
    model = _model()
    refs = _refs(200)
    path = tmp_path / "s"
    ri = RepresentativeInterpretation(model, model[0])
    ri.fit(refs, batch_size=64, progress=False, store=path)
    assert ri.store_.has_logits
    if not complete:
        _edit_meta(path, complete=False, n=128)
    damage(path)
    with pytest.raises(ValueError, match=r"store: .* is damaged"):
        RepresentativeInterpretation(model, model[0]).fit(
            refs, batch_size=64, progress=False, store=path
        )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_during_a_fit_does_not_keep_the_store_locked(tiny, tmp_path):
    """A process forked while a fit holds the store's lock (a DataLoader worker started
    during the fit, kept with ``persistent_workers``) shared the lock, so a later fit of
    the store was refused while the child lived. A forked child now drops its copy."""
    model, x = tiny
    path = tmp_path / "s"
    _fit(model, model.features, x[:40], store=path)
    calls, children = [0], []

    def fork_a_worker(*_: object) -> None:
        calls[0] += 1
        if calls[0] == 3:  # while the append below writes
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child waits until the parent closes the pipe
                os.close(w)
                os.read(r, 1)
                os._exit(0)
            os.close(r)
            children.append((pid, w))

    handle = model.features.register_forward_hook(fork_a_worker)
    try:
        _fit(model, model.features, x[40:100], store=path, append=True, batch_size=20)
    finally:
        handle.remove()
    try:
        assert children
        again = _fit(model, model.features, x[100:120], store=path, append=True)
        assert again.n_references_ == 120
    finally:
        for pid, w in children:
            os.close(w)
            os.waitpid(pid, 0)


def test_a_file_system_without_locks_leaves_the_store_unlocked(tmp_path, monkeypatch):
    """flock failing for another reason than a held lock (ENOLCK on some network mounts)
    is no other fit: the store is written without a lock instead of refused."""
    import errno
    import fcntl

    from captum_repinterp.store import StoreLock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = StoreLock(tmp_path)
    lock.acquire()  # no ValueError
    lock.release()

    def held(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(ValueError, match="store: .* is being written by another fit"):
        StoreLock(tmp_path).acquire()
