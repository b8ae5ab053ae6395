"""Tests of the evaluation protocol: hand-computed arithmetic, then small real runs."""

import copy
import importlib.util
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from captum_repinterp.evaluation import (
    ALL_SETUPS,
    EvalConfig,
    Setup,
    average_drop_increase,
    channel_weight_methods,
    choose_default,
    drop_increase,
    evaluate_setup,
    gradcam_package_available,
    interval_estimable,
    keep_key,
    markdown_report,
    mask_images,
    randomise,
    rank_correlation,
    recompute_intervals,
    stratified_t_ci,
    top_fraction_mask,
)
from captum_repinterp.evaluation.methods import acts_and_grads
from captum_repinterp.evaluation.protocol import MIN_SEEDS_FOR_INTERVAL, Timer, _aggregate, _compare
from captum_repinterp.options import InterpretOptions

needs_gradcam = pytest.mark.skipif(
    not gradcam_package_available(), reason="grad-cam (pytorch_grad_cam) not installed"
)


# ---------------------------------------------------------------- arithmetic by hand
def test_top_fraction_mask_keeps_the_largest_pixels():
    maps = torch.tensor([[3.0, 9.0, 1.0, 0.0, 4.0], [8.0, 2.0, 7.0, 5.0, 6.0]])[None, None]
    mask = top_fraction_mask(maps, 0.2)  # 20% of 10 pixels = the 2 largest (9 and 8)
    expected = torch.zeros(2, 5, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = True
    assert torch.equal(mask[0, 0], expected)
    # 0.25 of 10 pixels: ceil(2.5) = 3 pixels (9, 8, 7)
    assert int(top_fraction_mask(maps, 0.25).sum()) == 3
    assert bool(top_fraction_mask(maps, 0.25)[0, 0, 1, 2])


def test_mask_images_sets_the_rest_to_the_baseline_in_every_channel():
    images = torch.arange(20.0).reshape(1, 2, 2, 5) + 1
    maps = torch.tensor([[0.0, 0, 0, 0, 5], [0, 0, 0, 0, 0]])[None, None]
    maps[0, 0, 1, 1] = 4.0
    out = mask_images(images, maps, 0.2, baseline=-1.0)
    keep = torch.zeros(2, 5, dtype=torch.bool)
    keep[0, 4] = keep[1, 1] = True
    for c in range(2):
        assert torch.equal(out[0, c][keep], images[0, c][keep])
        assert bool((out[0, c][~keep] == -1.0).all())


def test_drop_and_increase_by_hand():
    y = torch.tensor([0.5, 0.4, 0.8], dtype=torch.float64)
    y_masked = torch.tensor([0.25, 0.6, 0.8], dtype=torch.float64)
    drop, inc = drop_increase(y, y_masked)
    assert drop.tolist() == [0.5, 0.0, 0.0]
    assert inc.tolist() == [0.0, 1.0, 0.0]


class _TwoLogits(nn.Module):
    """logits = (w . x, 0): the softmax of class 0 is sigmoid(w . x)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_average_drop_increase_on_a_hand_built_model():
    w = torch.tensor([1.0, -2.0, 0.5, 1.0, 0.0])
    model = _TwoLogits(w)
    x = torch.tensor([[1.0, 1.0, 2.0, 1.0, 3.0], [1.0, 0.0, 0.0, 2.0, 1.0]]).reshape(2, 1, 1, 5)
    # maps: image 0 keeps pixel 4 (w = 0 -> masked score 0 logit), image 1 keeps pixel 3
    maps = torch.tensor([[0.0, 1, 2, 3, 9], [0.0, 1, 2, 9, 3]]).reshape(2, 1, 1, 5)
    ad, ai = average_drop_increase(model, x, maps, torch.tensor([0, 0]), fraction=0.2)

    def sig(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    y0, y0m = sig(1 - 2 + 1 + 1 + 0), sig(0.0)  # w.x = 1 ; masked: only pixel 4 (w=0)
    y1, y1m = sig(1 + 2), sig(2.0)  # masked: only pixel 3, 1 * 2
    assert ad.tolist() == pytest.approx([max(0, y0 - y0m) / y0, max(0, y1 - y1m) / y1])
    assert ai.tolist() == [float(y0 < y0m), float(y1 < y1m)]


def test_rank_correlation_by_hand():
    a = torch.tensor([[1.0, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    b = torch.tensor([[4.0, 3, 2, 1], [1, 3, 2, 4], [5, 5, 5, 5]])
    rho = rank_correlation(a, b)
    # ranks differ by (0, 1, 1, 0): 1 - 6 * 2 / (4 * 15) = 0.8
    assert rho[0] == pytest.approx(-1.0)
    assert rho[1] == pytest.approx(0.8)
    assert math.isnan(rho[2])  # a constant map has no ranking


def test_bad_arguments_are_named():
    maps = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_mask(maps, 0.0)
    with pytest.raises(TypeError, match="fraction"):
        top_fraction_mask(maps, "0.2")
    with pytest.raises(ValueError, match="maps"):
        mask_images(torch.rand(2, 1, 4, 4), maps)
    with pytest.raises(TypeError, match="setup"):
        evaluate_setup("mnist")


# ---------------------------------------------------------------- methods
def test_gradcam_weights_reused_on_the_seed_equal_layergradcam(tiny):
    model, x = tiny
    layer = model.features[-1]
    (gradcam,) = channel_weight_methods(model, layer, include_package=False)
    images, targets = x[:6], model(x[:6]).argmax(1)
    w = gradcam.weights(images, targets)
    acts, _ = acts_and_grads(model, layer, images, targets)
    reused = gradcam.reuse(w, acts, (12, 12))
    assert torch.allclose(reused, gradcam.explain(images, targets), atol=1e-5)


@needs_gradcam
def test_package_methods_match_pytorch_grad_cam(tiny):
    from pytorch_grad_cam import GradCAMPlusPlus, HiResCAM

    model, x = tiny
    layer = model.features[-1]
    methods = {m.name: m for m in channel_weight_methods(model, layer)}
    assert set(methods) == {"gradcam", "gradcam++", "scorecam", "hirescam"}
    images, targets = x[:4], model(x[:4]).argmax(1)
    acts, grads = acts_and_grads(model, layer, images, targets)
    for name, cls in (("hirescam", HiResCAM), ("gradcam++", GradCAMPlusPlus)):
        cam = cls(model, [layer])
        cam.activations_and_grads.release()
        ref = np.maximum(
            cam.get_cam_image(images, layer, None, acts.numpy(), grads.numpy(), False), 0
        )
        w = methods[name].weights(images, targets)
        ours = torch.relu(((w if w.dim() == 4 else w[:, :, None, None]) * acts).sum(1))
        assert np.allclose(ours.numpy(), ref, atol=1e-5)


def test_randomise_resets_only_the_cascade_and_is_seeded(tiny):
    model, x = tiny
    setup = Setup(
        "tiny",
        model,
        model.features[-1],
        x[:10],
        x[10:20],
        head=model.head,
        cascade=[("head", model.head), ("f1", model.features[1])],
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m1, layer1, head1 = randomise(model, setup, ["head"], seed=3)
    m2, _, _ = randomise(model, setup, ["head"], seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the original is untouched
    s1, s2 = m1.state_dict(), m2.state_dict()
    for k in before:
        assert torch.equal(s1[k], s2[k])
        assert torch.equal(s1[k], before[k]) == (not k.startswith("head."))
    assert layer1 is m1.features[-1] and head1 is m1.head
    with pytest.raises(ValueError, match="names"):
        randomise(model, setup, ["nope"])


def test_stratified_t_ci_by_hand():
    # constant values: the interval is the value itself
    assert stratified_t_ci([0.3] * 7) == pytest.approx((0.3, 0.3, 0.3))
    # constant within each stratum: no within-class variance
    m, lo, hi = stratified_t_ci([1.0, 1.0, 5.0, 5.0, 5.0], strata=[0, 0, 1, 1, 1])
    assert (m, lo, hi) == pytest.approx((3.4, 3.4, 3.4))
    # ... which one stratum over the same values has: mean +- t(4) s / sqrt(5)
    _, lo1, hi1 = stratified_t_ci([1.0, 1.0, 5.0, 5.0, 5.0])
    s1 = np.std([1.0, 1.0, 5.0, 5.0, 5.0], ddof=1)
    assert (hi1 - lo1) / 2 == pytest.approx(2.7764451 * s1 / math.sqrt(5))
    # by hand, two per class (the case the percentile bootstrap made too narrow): classes
    # {0, 1} and {2, 4}; mean 1.75; Var = (2/4)^2 (0.5/2 + 2/2) = 0.3125; df = 2
    m, lo, hi = stratified_t_ci([0.0, 1.0, 2.0, 4.0], strata=[5, 5, 9, 9])
    assert m == pytest.approx(1.75)
    assert (hi - m) == pytest.approx(4.30265273 * math.sqrt(0.3125))
    assert (m - lo) == pytest.approx(hi - m)
    # a class with one value adds nothing to the variance nor to the degrees of freedom
    m2, lo2, hi2 = stratified_t_ci([0.0, 1.0, 2.0, 4.0, 7.0], strata=[5, 5, 9, 9, 3])
    assert m2 == pytest.approx(2.8)
    var = (2 / 5) ** 2 * (0.5 / 2 + 2 / 2)
    assert (hi2 - m2) == pytest.approx(4.30265273 * math.sqrt(var))
    # one value per class: no interval
    m3, lo3, hi3 = stratified_t_ci([1.0, 2.0, 3.0], strata=[0, 1, 2])
    assert m3 == 2.0 and math.isnan(lo3) and math.isnan(hi3)
    # NaNs are dropped; nothing left gives NaNs
    assert stratified_t_ci([float("nan"), 2.0, 2.0])[0] == 2.0
    assert all(math.isnan(v) for v in stratified_t_ci([float("nan")]))
    with pytest.raises(ValueError, match="strata"):
        stratified_t_ci([1.0, 2.0], strata=[0])


def test_stratified_t_ci_covers_at_two_seeds_per_class():
    """The nominal 95% is met at 2 seeds in each of 10 classes (the stratified percentile
    bootstrap used before covered 79% of skewed draws here); 400 draws, so the observed
    share is within about 2.2 points of the truth."""
    rng = np.random.default_rng(1)
    a = np.linspace(0.5, 3, 10)
    strata = np.repeat(np.arange(10), 2)
    true = float(np.mean(a / (a + 2.0)))
    hits = 0
    for _ in range(400):
        _, lo, hi = stratified_t_ci(rng.beta(a[strata], 2.0), strata)
        hits += lo <= true <= hi
    assert 0.90 <= hits / 400 <= 0.99


def test_aggregate_and_paired_comparison_by_hand():
    # two methods, three seeds (classes 0, 1, 1); method "b" has no image for seed 2
    owner = [("ri", 0), ("ri", 0), ("ri", 1), ("ri", 2), ("b", 0), ("b", 1)]
    ad = torch.tensor([0.2, 0.4, 0.1, 0.5, 0.6, 0.1])
    ai = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    table = _aggregate(owner, ad, ai, 3, [0, 1, 1])
    assert table["ri"]["per_seed_AD"] == pytest.approx([0.3, 0.1, 0.5])
    assert table["ri"]["mAD"] == pytest.approx(0.3) and table["ri"]["mAI"] == pytest.approx(0.5)
    assert table["ri"]["n_images"] == 4 and table["ri"]["n_seeds"] == 3
    assert table["b"]["n_seeds"] == 2 and math.isnan(table["b"]["per_seed_AD"][2])
    assert table["b"]["mAD"] == pytest.approx(0.35)
    # three seeds: too few for an interval (reported as NaN, "n/a" in the tables)
    assert all(math.isnan(v) for v in table["ri"]["mAD_ci"] + table["ri"]["mAI_ci"])
    (row,) = _compare(table, ["ri"], ["b"], [0, 1, 1])
    # paired over the seeds both have: (0.3 - 0.6, 0.1 - 0.1) -> mean -0.15
    assert row["dAD"] == pytest.approx(-0.15)
    assert row["dAI"] == pytest.approx(0.25)  # (0.5 - 0, 0 - 0)
    # seed 0 (class 0) differs by -0.3, seed 1 (class 1, alone once seed 2 is dropped) by
    # 0: every stratified resample gives -0.15, an interval of width 0 that says nothing
    # about the spread; no winner is declared
    assert row["n_paired"] == 2 and row["estimable"] is False
    assert all(math.isnan(v) for v in row["dAD_ci"]) and row["win_AD"] is None
    assert row["win_AI"] is None


def test_paired_comparison_with_enough_seeds_by_hand():
    # six seeds, three per class, one image each; RI's AD is 0.3 below "b" on class 0 and
    # equal on class 1: every stratified resample gives -0.15, and the classes hold
    # enough seeds to resample, so RI is better on AD; AI is equal everywhere (a tie)
    strata = [0, 0, 0, 1, 1, 1]
    owner = [("ri", j) for j in range(6)] + [("b", j) for j in range(6)]
    ad = torch.tensor([0.3, 0.3, 0.3, 0.1, 0.1, 0.1, 0.6, 0.6, 0.6, 0.1, 0.1, 0.1])
    ai = torch.zeros(12)
    table = _aggregate(owner, ad, ai, 6, strata)
    assert table["ri"]["mAD"] == pytest.approx(0.2)
    assert table["ri"]["mAD_ci"] == pytest.approx([0.2, 0.2])  # constant within each class
    (row,) = _compare(table, ["ri"], ["b"], strata)
    assert row["estimable"] is True and row["n_paired"] == 6
    assert row["dAD_ci"] == pytest.approx([-0.15, -0.15]) and row["win_AD"] is True
    assert row["dAI_ci"] == pytest.approx([0.0, 0.0]) and row["win_AI"] is None
    # worse: swap the roles
    (rev,) = _compare(table, ["b"], ["ri"], strata)
    assert rev["win_AD"] is False
    # the same six differences, one seed per class: no interval, no winner
    (alone,) = _compare(table, ["ri"], ["b"], [0, 1, 2, 3, 4, 5])
    assert alone["estimable"] is False and alone["win_AD"] is None
    assert alone["dAD"] == pytest.approx(-0.15)


def test_interval_estimable_counts_seeds_in_classes_with_two_or_more():
    assert MIN_SEEDS_FOR_INTERVAL == 5
    nan = float("nan")
    assert interval_estimable([0.1] * 5, [0, 0, 1, 1, 1])
    assert not interval_estimable([0.1] * 4, [0, 0, 1, 1])
    # one seed per class, however many classes: nothing to resample
    assert not interval_estimable([0.1] * 10, list(range(10)))
    # singletons do not count; NaN (a seed without images) is dropped first
    assert not interval_estimable([0.1] * 6, [0, 0, 1, 1, 2, 3])
    assert interval_estimable([0.1] * 6, [0, 0, 1, 1, 1, 3])
    assert not interval_estimable([0.1, 0.1, nan, 0.1, 0.1, 0.1], [0, 0, 1, 1, 2, 3])


def test_timer_records_prints_and_stays_quiet_on_errors(capsys):
    timings: dict[str, float] = {}
    with Timer(timings, "step", "[x] step") as t:
        time.sleep(0.02)
    assert t.seconds >= 0.02 and timings == {"step": t.seconds}
    assert capsys.readouterr().out == f"[x] step: {t.seconds:.1f} s\n"
    with pytest.raises(RuntimeError), Timer(timings, "failed", "[x] failed"):
        raise RuntimeError("boom")
    assert "failed" in timings and capsys.readouterr().out == ""
    with Timer() as bare:
        pass
    assert bare.seconds >= 0 and capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="key"):
        Timer(timings)


def test_keep_shares_are_validated_and_keyed(tiny):
    model, x = tiny
    setup = Setup("tiny", model, model.features[-1], x[:10], x[10:20], head=model.head)
    assert keep_key(0.2) == "0.2" and keep_key(0.5) == "0.5" and keep_key(1) == "1"
    assert EvalConfig().fractions == (0.2, 0.5)
    for bad, err in (
        ((0.2, 1.5), ValueError),
        ((0.0,), ValueError),
        ((), TypeError),
        (0.2, TypeError),
        ((0.2, 0.2), ValueError),
        (("0.2",), TypeError),
    ):
        with pytest.raises(err, match="fractions"):
            evaluate_setup(setup, EvalConfig(fractions=bad))


def test_rule_variants_keep_their_own_combine(tiny):
    from captum_repinterp import RepresentativeInterpretation
    from captum_repinterp.evaluation.protocol import _ri_variant

    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1], head=model.head)
    ri.fit(x[:200], progress=False)
    region = ri.interpret(x[200:201], heatmap_rule="elementwise-members", heatmap_layer=None)
    for rule in ("elementwise-members", "elementwise"):
        kw = {"heatmap_rule": rule, "combine": "unit", "heatmap_layer": None}
        variant = _ri_variant(region, kw)
        assert variant.combine == "unit"
        # the variant's map is the one interpret draws with those arguments
        direct = ri.interpret(x[200:201], **kw)
        feats, _ = ri.transform(x[201:205])
        acts = ri.layout_.unflatten(feats)
        torch.testing.assert_close(
            variant.heatmap_from_activations(acts), direct.heatmap_from_activations(acts)
        )


# ---------------------------------------------------------------- the pipeline
@pytest.mark.slow
def test_small_pipeline_on_the_tiny_model(tiny):
    model, x = tiny
    f = model.features
    setup = Setup(
        "tiny",
        model,
        f[-1],
        x[:200],
        x[200:],
        head=model.head,
        cascade=[("head", model.head), ("features[1]", f[1])],
        other_layers=[("features[0]", f[0], nn.Sequential(f[1], model.head))],
        heatmap_layers=[("features[0]", f[0])],
    )
    cfg = EvalConfig(
        seeds_per_class=1,
        k=3,
        n_explain_per_class=1,
        n_sanity=2,
        n_fidelity=2,
        n_perturb=2,
        ig_steps=8,
        ri_variants={
            "ri[region-members]": {"heatmap_rule": "region-members"},
            "ri[elementwise]": {"heatmap_rule": "elementwise", "heatmap_layer": None},
        },
        heatmap_layer_rules=("region-score",),
    )
    res = evaluate_setup(setup, cfg)
    json.dumps(res)  # serialisable
    # every masking metric at both keep shares, on the same seeds and images
    assert list(res["reuse"]["keep"]) == ["0.2", "0.5"] == list(res["no_reuse"]["keep"])
    at20, at50 = (res["reuse"]["keep"][k]["metrics"] for k in ("0.2", "0.5"))
    assert at20.keys() == at50.keys()
    assert all(at20[m]["n_images"] == at50[m]["n_images"] for m in at20)
    assert [at20[m]["mAD"] for m in at20] != [at50[m]["mAD"] for m in at20]
    reuse = res["reuse"]["keep"]["0.2"]
    methods = ["ri", "gradcam"] + (
        ["gradcam++", "scorecam", "hirescam"] if gradcam_package_available() else []
    )
    n_seeds = len(res["reuse"]["seeds"])
    assert n_seeds == 4  # one per predicted class
    for m in methods:
        row = reuse["metrics"][m]
        assert 0 <= row["mAD"] <= 1 and 0 <= row["mAI"] <= 1
        assert row["n_images"] <= cfg.k * n_seeds
        assert m in res["no_reuse"]["keep"]["0.2"]["metrics"]
        assert m in res["fidelity"]["metrics"]
    assert "ig" in res["no_reuse"]["keep"]["0.2"]["metrics"]
    rule = res["reuse"]["rule_summary"]["ri"]
    assert rule["precision"] is None or 0 <= rule["precision"] <= 1
    stages = res["sanity"]["stages"]
    assert [s["randomised"] for s in stages] == ["head", "head+features[1]"]
    for s in stages:
        for m in methods:
            assert s[m] is None or -1 <= s[m] <= 1
        # RI's maps on the randomised copy: every config drawn at the split layer or the
        # input, never one whose heatmap_layer belongs to the original model
        assert "heatmap_layer" not in s.get("note", "")
        assert {"ri", "ri[region-members]", "ri[elementwise]"} <= set(s)
        assert not any("@features" in k for k in s)
    # every RI config is also measured on the baselines' images, with paired comparisons
    assert "ri @nn" in reuse["metrics"]
    # the map drawn at an earlier layer, on both image sets and without reuse
    for name in ("ri[map@features[0]]", "ri[map@features[0]] @nn"):
        row = reuse["metrics"][name]
        assert 0 <= row["mAD"] <= 1 and row["n_images"] > 0
    assert "ri[map@features[0]]" in res["no_reuse"]["keep"]["0.2"]["metrics"]
    # rules with region weights, at the split layer and at the earlier layer
    for name in ("ri[region-members]", "ri[region-score@features[0]]"):
        assert reuse["metrics"][name]["n_images"] > 0
        assert name in res["no_reuse"]["keep"]["0.5"]["metrics"]
    described = res["ri_configs"]
    assert described["ri[region-score@features[0]]"] == {
        "heatmap_rule": "region-score",
        "heatmap_layer": "features[0]",
        "named_layer": True,
        "forward_passes": "K (channels of the layer), once per seed",
        "cost_per_channel": 1,
    }
    # the row "ri" is what a user gets: the package's defaults; map@L is elementwise
    assert described["ri"]["heatmap_layer"] == InterpretOptions().heatmap_layer == "auto"
    assert described["ri"]["heatmap_rule"] == InterpretOptions().heatmap_rule
    assert described["ri[map@features[0]]"]["heatmap_rule"] == "elementwise"
    assert described["ri[elementwise]"]["heatmap_layer"] is None
    # one seed per class: no interval and no winner (the bootstrap would collapse)
    for row in reuse["metrics"].values():
        assert row["mAD_ci"] == [None, None] and row["mAI_ci"] == [None, None]
    for c in reuse["comparisons"]:
        assert c["estimable"] is False and c["win_AD"] is None and c["win_AI"] is None
    pairs = {(c["ri"], c["baseline"]) for c in reuse["comparisons"]}
    assert ("ri", "gradcam") in pairs and ("ri @nn", "gradcam") in pairs
    # the layer sweep reruns the reuse protocol at the other layer, every method there
    (sweep,) = res["layers"]
    assert sweep["layer"] == "features[0]" and sweep["shape"][0] == f[0][0].out_channels
    assert set(methods) <= set(sweep["keep"]["0.5"]["metrics"])
    md = markdown_report({"setups": {"tiny": res}, "total_seconds": 1.0})
    assert "| ri | RI's |" in md and "Sanity check" in md
    assert "| ri @nn |" in md and "| RI config | vs gradcam |" in md
    assert "## Choosing the default heat-map rule" in md and "| ri[region-members] |" in md
    for share in ("20%", "50%"):
        assert f"### Reuse protocol, keep {share}" in md
        assert f"### Without reuse, keep {share}" in md
        assert f"### Reuse protocol at features[0], keep {share}" in md
    rows = [line for line in md.split("## tiny")[1].splitlines() if line.startswith("| ri")]
    assert "n/a (too few seeds)" in md and rows
    assert not any("**" in line or "(worse)" in line for line in rows)
    assert "| ri | n/a / n/a |" in md
    # the protocol is the docs' method page, and every page the report names is in docs/
    assert "(method.md)" in md
    docs = Path(__file__).resolve().parents[1] / "docs"
    assert all((docs / name).is_file() for name in re.findall(r"[\w.-]+\.md\b", md))


# ---------------------------------------------------------------- the benchmark script
def _load_script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_leaves_docs_alone_unless_asked(tmp_path, monkeypatch, capsys):
    script = _load_script()
    calls = []

    def fake_run(setups, out, seed=0, quick=False, fractions=()):
        calls.append((setups, seed, quick, fractions))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "evaluation.md").write_text("# tables")
        (Path(out) / "results.json").write_text("{}")
        return {"total_seconds": 1.0}

    docs = tmp_path / "docs"
    docs.mkdir()
    monkeypatch.setattr(script, "run_evaluation", fake_run)
    monkeypatch.setattr(script, "DOCS", docs)
    out = tmp_path / "out"
    assert script.main(["--setups", "mnist", "--out", str(out), "--quick"]) == 0
    assert calls[-1] == (["mnist"], 0, True, (0.2, 0.5))
    assert list(docs.iterdir()) == []  # nothing written to docs
    assert str(out.resolve()) in capsys.readouterr().out
    assert script.main(["--out", str(out), "--keep", "0.3", "--update-docs"]) == 0
    assert calls[-1] == (list(ALL_SETUPS), 0, False, (0.3,))
    assert (docs / "evaluation.md").read_text() == "# tables"
    assert (docs / "evaluation_results.json").read_text() == "{}"
    with pytest.raises(SystemExit):
        script.main(["--out", str(out), "--quick", "--update-docs"])


def test_published_evaluation_page_is_the_results_file_and_the_package_default():
    """docs/evaluation.md is the report of docs/evaluation_results.json; its row ``ri`` is
    the package's default on every setup; docs/choices.md names the rule's first-ranked
    candidate with the counts the results give."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    report = json.loads((docs / "evaluation_results.json").read_text())
    assert markdown_report(report) == (docs / "evaluation.md").read_text()
    assert set(report["setups"]) == set(ALL_SETUPS)
    for res in report["setups"].values():
        ri = res["ri_configs"]["ri"]
        assert (ri["heatmap_rule"], ri["heatmap_layer"]) == (
            InterpretOptions().heatmap_rule, InterpretOptions().heatmap_layer)  # fmt: skip
    first = choose_default(report)["ranking"][0]
    counts = f"`{first['rule']}` {first['wins']} / {first['losses']} / {first['ties']} first"
    assert counts in " ".join((docs / "choices.md").read_text().split())


def test_recompute_intervals_gives_what_a_fresh_aggregate_gives():
    """A report's intervals and win/loss marks recomputed from its per-seed values are
    those _aggregate and _compare give now; the no-reuse part and a layer sweep written
    without their classes get them rebuilt from the seeds' equal allocation."""
    rng = np.random.default_rng(0)
    strata = [0] * 4 + [1] * 4 + [2] * 4
    owner = [(m, j) for m in ("ri", "b") for j in range(12)]
    ad = torch.from_numpy(rng.uniform(0, 1, 24))
    ai = torch.from_numpy(rng.integers(0, 2, 24).astype(float))
    table = _aggregate(owner, ad, ai, 12, strata)
    comparisons = _compare(table, ["ri"], ["b"], strata)
    stale = copy.deepcopy(table)
    for row in stale.values():
        row["mAD_ci"] = row["mAI_ci"] = [0.0, 0.0]
    stale_cmp = [dict(comparisons[0], dAD_ci=[9.0, 9.0], win_AD=True)]
    part = {"0.2": {"metrics": stale, "comparisons": stale_cmp}}
    report = {
        "setups": {
            "toy": {
                "reuse": {"seed_targets": strata, "keep": copy.deepcopy(part)},
                "layers": [{"layer": "features.0", "keep": copy.deepcopy(part)}],
                "no_reuse": {"images": list(range(12)), "keep": copy.deepcopy(part)},
            }
        }
    }
    recompute_intervals(report)
    res = report["setups"]["toy"]
    for got in (res["reuse"]["keep"], res["layers"][0]["keep"], res["no_reuse"]["keep"]):
        assert got["0.2"]["metrics"] == table
        assert got["0.2"]["comparisons"] == comparisons
    # classes that cannot be rebuilt (unequal allocation) are refused, naming report
    report["setups"]["toy"]["reuse"]["seed_targets"] = [0] * 5 + [1] * 3 + [2] * 4
    with pytest.raises(ValueError, match=r"^report: setup 'toy', layer 'features.0'"):
        recompute_intervals(report)
