"""The sharded reference set on a real local Ray cluster: same results as the local path."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import captum_repinterp
from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.solver import greedy_cover_bits, greedy_cover_oracle, pack_failing

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------- no Ray needed
def _oracle_from_bits(fail, positive):
    """The counts a sharded set sums, computed here from the whole packed matrix."""
    n = positive.shape[0]
    m = fail.shape[0]
    pos = torch.tensor(positive)
    bits_pos = pack_failing(pos.numpy()[None])[0]
    bits_neg = pack_failing(~pos.numpy()[None])[0]

    def counts(picks):
        inside_p, inside_n = bits_pos.copy(), bits_neg.copy()
        for j in picks:
            inside_p &= ~fail[j]
            inside_n &= ~fail[j]
        df = np.bitwise_count(fail & inside_p).sum(axis=1, dtype=np.int64)
        dg = np.bitwise_count(fail & inside_n).sum(axis=1, dtype=np.int64)
        return df, dg

    def unseparated():
        sep = np.bitwise_or.reduce(fail, axis=0) if m else np.zeros_like(bits_neg)
        return int(np.bitwise_count(bits_neg & ~sep).sum())

    def necessary(j, others):
        alone = fail[j].copy()
        for k in others:
            alone &= ~fail[k]
        return bool(alone.any())

    assert n == positive.shape[0]
    return counts, unseparated, necessary


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 90),
    st.integers(0, 12),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["tighten", "prune", "none"]),
    st.sampled_from([None, 0, 2, 0.1]),
)
def test_oracle_solver_equals_packed_solver(n, m, seed, refine, delta):
    """The greedy on summed counts picks exactly what the packed solver picks."""
    rng = np.random.default_rng(seed)
    failing = rng.random((m, n)) < rng.uniform(0.05, 0.6)
    positive = rng.random(n) < 0.5
    fail = pack_failing(failing)
    pos_t = torch.from_numpy(positive)
    n_neg = int((~positive).sum())
    if isinstance(delta, int) and delta > n_neg:
        delta = n_neg
    ref = greedy_cover_bits(fail, pos_t, delta=delta, refine=refine)
    counts, unseparated, necessary = _oracle_from_bits(fail, positive)
    picks, d, need = greedy_cover_oracle(
        m, n_neg, counts, unseparated, necessary, delta=delta, refine=refine
    )
    assert picks == ref.selected.tolist()
    assert d == ref.delta
    inside = ~failing[picks].any(axis=0) if picks else np.ones(n, bool)
    assert np.array_equal(inside, ref.inside.numpy())
    assert (int((~positive & ~inside).sum()) >= need) == ref.reached


def test_missing_ray_names_the_extra(monkeypatch):
    from captum_repinterp.distributed.actor import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install captum_repinterp\[ray\]"):
        import_ray()


# ----------------------------------------------------- argument errors (before any cluster starts)
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


# ---------------------------------------------------------------------- a local cluster
ray = pytest.importorskip("ray")
from captum_repinterp.distributed import (  # noqa: E402
    ShardLostError,
    fit_sharded,
    shard_references,
)
from captum_repinterp.distributed.sharding import split_points  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A two-CPU Ray cluster started (and shut down) by these tests. Workers import this
    checkout of the package and the test modules (the models are defined there)."""
    root = str(Path(captum_repinterp.__file__).resolve().parent.parent)
    path = os.pathsep.join([root, str(HERE)])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}},
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield
    ray.shutdown()


def _fit(model, layer, x):
    return RepresentativeInterpretation(model, layer).fit(x, progress=False)


def _same(a, b):
    """Everything an Interpretation holds, compared exactly; the members' distances to
    float32 rounding (each shard's BLAS call has other sizes than the local one: up to
    9 ulp seen, 1.05e-6 relative with OMP_NUM_THREADS=1, so 1e-5 leaves room)."""
    assert a.target == b.target and a.seed_in_class == b.seed_in_class
    for name in ("weight", "bias", "runner_up", "members", "seed_margins"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.member_distances, b.member_distances, rtol=1e-5, atol=1e-9)
    for name in ("purity", "coverage", "delta", "reached", "n_sampled"):
        assert getattr(a, name) == getattr(b, name), name
    if a.channel_weights is None:
        assert b.channel_weights is None
    else:
        assert torch.equal(a.channel_weights, b.channel_weights)


@pytest.fixture(scope="module")
def local_and_sharded(tiny, cluster, one_thread):
    """The projection path (a Linear after the split): local and sharded over 3 actors."""
    model, x = tiny
    local = _fit(model, model.features[-1], x)
    sharded = shard_references(_fit(model, model.features[-1], x), n_actors=3, progress=False)
    yield local, sharded
    sharded.references_.shutdown()


def test_shards_are_contiguous_and_hold_every_row(local_and_sharded):
    local, sharded = local_and_sharded
    refs = sharded.references_
    assert refs.offsets == [0, 100, 200]
    assert refs.n == 300 and refs.n_shards == 3
    assert torch.equal(refs.predictions, local.predictions_)
    rows = torch.tensor([299, 0, 5, 130, 129, 250, 5])
    assert torch.equal(sharded.features_[rows], local.features_[rows])
    assert torch.equal(refs.projection.projected[rows], local.projection_.projected[rows])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"refine": "prune", "delta": 3},
        {"refine": "none", "n_boundaries": 20, "random_state": 5},
        {"delta": 0.05, "heatmap_rule": "region-score"},
    ],
)
def test_interpret_batch_equals_local(local_and_sharded, tiny, options):
    """A batch of seeds runs as Ray tasks; every interpretation is the local one, in order."""
    local, sharded = local_and_sharded
    _, x = tiny
    seeds = x[[3, 70, 150, 299]]
    for a, b in zip(local.interpret(seeds, **options), sharded.interpret(seeds, **options)):
        _same(a, b)
        assert b.reader is sharded.reader_
    # one seed runs on the driver, the same way
    _same(local.interpret(seeds[:1], **options), sharded.interpret(seeds[:1], **options))


def test_other_target_and_attribute_equal_local(local_and_sharded, tiny):
    local, sharded = local_and_sharded
    _, x = tiny
    seeds = x[:3]
    for a, b in zip(local.interpret(seeds, target=2), sharded.interpret(seeds, target=2)):
        _same(a, b)
    assert torch.equal(local.attribute(seeds), sharded.attribute(seeds))


def test_plain_path_without_projection(tiny, cluster, one_thread):
    """Split inside the convolutions: no affine map after the layer, the full product."""
    model, x = tiny
    local = _fit(model, model.features[0], x)
    assert local.projection_ is None
    sharded = shard_references(_fit(model, model.features[0], x), n_actors=2, progress=False)
    try:
        assert sharded.references_.projection is None
        seeds = x[[10, 200]]
        for opts in ({}, {"refine": "prune"}):
            for a, b in zip(local.interpret(seeds, **opts), sharded.interpret(seeds, **opts)):
                _same(a, b)
        # an empty selection ranks members by L1 distance, gathered from the shards
        a = local.interpret(seeds[:1], n_boundaries=1, delta=0.99, refine="none")
        b = sharded.interpret(seeds[:1], n_boundaries=1, delta=0.99, refine="none")
        _same(a, b)
    finally:
        sharded.references_.shutdown()


def _region_summary(result):
    out = {}
    for c, ca in result.classes.items():
        out[c] = (
            ca.indices.tolist(),
            ca.uncovered.tolist(),
            [
                (
                    r.seed_index,
                    r.members.tolist(),
                    r.n_inside,
                    r.purity,
                    r.split_score if r.split_score == r.split_score else None,
                    [g.members.tolist() for g in r.subgroups],
                    r.interpretation.members.tolist(),
                    r.interpretation.weight,
                )
                for r in ca.regions
            ],
        )
    return out


def _same_audit(a, b):
    sa, sb = _region_summary(a), _region_summary(b)
    assert list(sa) == list(sb)
    for c in sa:
        assert sa[c][:2] == sb[c][:2]
        assert len(sa[c][2]) == len(sb[c][2])
        for ra, rb in zip(sa[c][2], sb[c][2]):
            assert ra[:-1] == rb[:-1]
            assert torch.equal(ra[-1], rb[-1])
    for ca, cb in zip(a, b):
        for ra, rb in zip(ca.regions, cb.regions):
            assert torch.equal(ra.mean_heatmap, rb.mean_heatmap)


def test_audit_all_classes_equals_local(local_and_sharded, tiny):
    """Classes run as Ray tasks (each class's seeds in order); the result is the local one."""
    local, sharded = local_and_sharded
    _, x = tiny
    kwargs = {"max_regions": 2, "n_boundaries": 20, "subgroup_by": "margins"}
    res_local = local.audit(x[:160], **kwargs)
    res_sharded = sharded.audit(x[:160], **kwargs)
    _same_audit(res_local, res_sharded)
    for ca in res_sharded:
        for r in ca.regions:
            assert r.interpretation.reader is sharded.reader_


def test_fit_sharded_equals_local_fit(tiny, cluster, one_thread, tmp_path):
    """Ray Data runs the model on the workers (built by a factory there); the features,
    predictions and every interpretation equal the local fit's. Shards spilled to disk."""
    model, x = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def factory():
        from conftest import TinyCNN

        m = TinyCNN()
        m.load_state_dict(state)
        return m.eval()

    local = _fit(model, model.features[-1], x)
    ri = RepresentativeInterpretation(model, model.features[-1])
    fit_sharded(ri, x, factory, n_actors=2, batch_size=64, spill_dir=tmp_path, progress=False)
    try:
        refs = ri.references_
        assert torch.equal(refs.predictions, local.predictions_)
        assert torch.equal(ri.features_[torch.arange(300)], local.features_)
        assert (tmp_path / "shard-0000" / "features.npy").exists()
        assert (tmp_path / "shard-0001" / "complete").exists()
        assert torch.allclose(refs.projection.basis, local.projection_.basis)
        seeds = x[[1, 2, 77]]
        for a, b in zip(local.interpret(seeds), ri.interpret(seeds)):
            _same(a, b)
        assert torch.equal(local.attribute(seeds), ri.attribute(seeds))
    finally:
        ri.references_.shutdown()


def test_fit_sharded_from_torch_dataset_and_ray_dataset(tiny, cluster, one_thread):
    """A torch Dataset of (image, label) and a Ray Dataset give the same shards."""
    model, x = tiny
    local = _fit(model, model.features[-1], x[:100])
    ds = torch.utils.data.TensorDataset(x[:100], torch.zeros(100, dtype=torch.long))
    ri = fit_sharded(RepresentativeInterpretation(model, model.features[-1]), ds, progress=False)
    ri.references_.shutdown()
    ray_ds = ray.data.from_numpy(x[:100].numpy()).rename_columns({"data": "image"})
    ri2 = RepresentativeInterpretation(model, model.features[-1])
    fit_sharded(ri2, ray_ds, n_actors=1, column="image", progress=False)
    try:
        assert torch.equal(ri2.predictions_, local.predictions_)
        feats = ri2.features_[torch.arange(100)]
        assert torch.allclose(feats, local.features_, rtol=1e-5, atol=1e-6)
    finally:
        ri2.references_.shutdown()


def test_fit_sharded_argument_errors(tiny, cluster):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    with pytest.raises(ValueError, match="n_actors"):
        fit_sharded(ri, x, n_actors=0)
    with pytest.raises(TypeError, match="references"):
        fit_sharded(ri, [1, 2, 3])
    with pytest.raises(ValueError, match="n_actors"):
        fit_sharded(ri, x[:2], n_actors=3, progress=False)

    def wrong():
        from conftest import TinyCNN

        torch.manual_seed(123)
        return TinyCNN().eval()

    with pytest.raises(ValueError, match="model_factory"):
        fit_sharded(ri, x[:50], wrong, n_actors=1, progress=False)


def test_actor_killed_mid_audit_is_restarted(tiny, cluster, one_thread):
    """An actor killed between two seeds of an audit restarts, reloads its shard and the
    calls that found it dead are retried: the audit equals the local one."""
    model, x = tiny
    local = _fit(model, model.features[-1], x)
    ri = shard_references(_fit(model, model.features[-1], x), n_actors=2, progress=False)
    refs = ri.references_
    calls = []
    interpret = ri.interpret

    def interpret_then_kill(*args, **kwargs):
        out = interpret(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            ray.kill(refs.actors[0], no_restart=False)
        return out

    ri.interpret = interpret_then_kill
    kwargs = {"max_regions": 3, "n_boundaries": 20, "subgroup_by": "none"}
    try:
        res = ri.audit(x[:120], target=1, **kwargs)
        assert len(calls) >= 2
        _same_audit(local.audit(x[:120], target=1, **kwargs), res)
    finally:
        refs.shutdown()


def test_actor_dead_for_good_is_reported(tiny, cluster, one_thread):
    """A shard that cannot come back fails the call with an error naming it."""
    model, x = tiny
    ri = shard_references(
        _fit(model, model.features[-1], x), n_actors=2, max_restarts=0, progress=False
    )
    refs = ri.references_
    ray.kill(refs.actors[1], no_restart=True)
    with pytest.raises(ShardLostError, match=r"shard 1 \(references 150\.\.299\)"):
        ri.interpret(x[:1])
    with pytest.raises(ShardLostError):
        ri.audit(x[:60], max_regions=1, n_boundaries=10)
    refs.shutdown()


def test_sessions_are_rebuilt_after_eviction(local_and_sharded, tiny):
    """A session evicted from an actor's cache is recomputed from the boundaries."""
    local, sharded = local_and_sharded
    _, x = tiny
    refs = sharded.references_
    ray.get([a.configure.remote(0) for a in refs.actors])
    try:
        _same(local.interpret(x[:1], refine="prune"), sharded.interpret(x[:1], refine="prune"))
    finally:
        ray.get([a.configure.remote(16) for a in refs.actors])
    assert all(m["sessions"] == 0 for m in refs.memory())
    assert split_points(300, 3) == [0, 100, 200]
    assert split_points(5, 5) == [0, 1, 2, 3, 4]


def test_fit_sharded_refuses_a_model_changed_after_it(tiny, cluster, one_thread):
    """As a local fit does: the shards hold the old weights' features."""
    import copy

    model, x = tiny
    model = copy.deepcopy(model)  # the session's model stays as it is
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def factory():
        from conftest import TinyCNN

        m = TinyCNN()
        m.load_state_dict(state)
        return m.eval()

    ri = RepresentativeInterpretation(model, model.features[-1])
    fit_sharded(ri, x[:200], factory, n_actors=2, batch_size=64, progress=False)
    try:
        ri.interpret(x[200:201], n_boundaries=12)
        with torch.no_grad():
            model.head[3].bias.add_(1.0)
        with pytest.raises(ValueError, match="forward_func: the model's parameters"):
            ri.interpret(x[200:201], n_boundaries=12)
    finally:
        ri.references_.shutdown()
