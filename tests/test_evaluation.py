"""Tests of the evaluation protocol: hand-computed arithmetic, then small real runs."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from captum_repinterp.evaluation import (
    EvalConfig,
    Setup,
    average_drop_increase,
    bootstrap_ci,
    channel_weight_methods,
    drop_increase,
    evaluate_setup,
    gradcam_package_available,
    markdown_report,
    mask_images,
    randomise,
    rank_correlation,
    top_fraction_mask,
)
from captum_repinterp.evaluation.methods import acts_and_grads
from captum_repinterp.evaluation.protocol import _aggregate, _compare

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
    setup = Setup("tiny", model, model.features[-1], x[:10], x[10:20], head=model.head,
                  cascade=[("head", model.head), ("f1", model.features[1])])
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


def test_bootstrap_ci_by_hand():
    # constant values: the interval is the value itself
    assert bootstrap_ci([0.3] * 7) == pytest.approx((0.3, 0.3, 0.3))
    # constant within each stratum: every stratified resample has the same mean
    m, lo, hi = bootstrap_ci([1.0, 1.0, 5.0, 5.0, 5.0], strata=[0, 0, 1, 1, 1])
    assert (m, lo, hi) == pytest.approx((3.4, 3.4, 3.4))
    # ... which an unstratified bootstrap of the same values does not have
    _, lo1, hi1 = bootstrap_ci([1.0, 1.0, 5.0, 5.0, 5.0])
    assert hi1 - lo1 > 1.0
    # NaNs are dropped; nothing left gives NaNs
    assert bootstrap_ci([float("nan"), 2.0, 2.0])[0] == 2.0
    assert all(math.isnan(v) for v in bootstrap_ci([float("nan")]))
    # normal data: the 95% interval is close to mean -/+ 1.96 standard errors
    x = np.random.default_rng(1).normal(0.5, 2.0, 400)
    m, lo, hi = bootstrap_ci(x, n_boot=4000)
    se = x.std() / math.sqrt(x.size)
    assert lo < m < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert bootstrap_ci(x, n_boot=500, seed=3) == bootstrap_ci(x, n_boot=500, seed=3)
    with pytest.raises(ValueError, match="strata"):
        bootstrap_ci([1.0, 2.0], strata=[0])


def test_aggregate_and_paired_comparison_by_hand():
    # two methods, three seeds (classes 0, 1, 1); method "b" has no image for seed 2
    owner = [("ri", 0), ("ri", 0), ("ri", 1), ("ri", 2), ("b", 0), ("b", 1)]
    ad = torch.tensor([0.2, 0.4, 0.1, 0.5, 0.6, 0.1])
    ai = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    cfg = EvalConfig(n_boot=300)
    table = _aggregate(owner, ad, ai, 3, [0, 1, 1], cfg)
    assert table["ri"]["per_seed_AD"] == pytest.approx([0.3, 0.1, 0.5])
    assert table["ri"]["mAD"] == pytest.approx(0.3) and table["ri"]["mAI"] == pytest.approx(0.5)
    assert table["ri"]["n_images"] == 4 and table["ri"]["n_seeds"] == 3
    assert table["b"]["n_seeds"] == 2 and math.isnan(table["b"]["per_seed_AD"][2])
    assert table["b"]["mAD"] == pytest.approx(0.35)
    lo, hi = table["ri"]["mAD_ci"]
    assert 0.1 <= lo <= 0.3 <= hi <= 0.5
    (row,) = _compare(table, ["ri"], ["b"], [0, 1, 1], cfg)
    # paired over the seeds both have: (0.3 - 0.6, 0.1 - 0.1) -> mean -0.15
    assert row["dAD"] == pytest.approx(-0.15)
    assert row["dAI"] == pytest.approx(0.25)  # (0.5 - 0, 0 - 0)
    # seed 0 (class 0) differs by -0.3, seed 1 (class 1, alone once seed 2 is dropped) by
    # 0: every stratified resample gives -0.15, so RI is surely better on AD
    assert row["dAD_ci"] == pytest.approx([-0.15, -0.15]) and row["win_AD"] is True
    table["b"]["per_seed_AD"] = [0.3, 0.1, float("nan")]
    (tie,) = _compare(table, ["ri"], ["b"], [0, 1, 1], cfg)
    assert tie["dAD"] == pytest.approx(0.0, abs=1e-7) and tie["win_AD"] is None


# ---------------------------------------------------------------- the pipeline
@pytest.mark.slow
def test_small_pipeline_on_the_tiny_model(tiny):
    model, x = tiny
    f = model.features
    setup = Setup("tiny", model, f[-1], x[:200], x[200:], head=model.head,
                  cascade=[("head", model.head), ("features[1]", f[1])],
                  other_layers=[("features[0]", f[0], nn.Sequential(f[1], model.head))],
                  heatmap_layers=[("features[0]", f[0])])
    cfg = EvalConfig(seeds_per_class=1, k=3, n_explain_per_class=1, n_sanity=2,
                     n_fidelity=2, n_perturb=2, ig_steps=8)
    res = evaluate_setup(setup, cfg)
    json.dumps(res)  # serialisable
    methods = ["ri", "gradcam"] + (
        ["gradcam++", "scorecam", "hirescam"] if gradcam_package_available() else []
    )
    n_seeds = len(res["reuse"]["seeds"])
    assert n_seeds == 4  # one per predicted class
    for m in methods:
        row = res["reuse"]["metrics"][m]
        assert 0 <= row["mAD"] <= 1 and 0 <= row["mAI"] <= 1
        assert row["n_images"] <= cfg.k * n_seeds
        assert m in res["no_reuse"]["metrics"]
        assert m in res["fidelity"]["metrics"]
    assert "ig" in res["no_reuse"]["metrics"]
    rule = res["reuse"]["rule_summary"]["ri"]
    assert rule["precision"] is None or 0 <= rule["precision"] <= 1
    stages = res["sanity"]["stages"]
    assert [s["randomised"] for s in stages] == ["head", "head+features[1]"]
    for s in stages:
        for m in methods:
            assert s[m] is None or -1 <= s[m] <= 1
    # every RI config is also measured on the baselines' images, with paired comparisons
    assert "ri @nn" in res["reuse"]["metrics"]
    # the map drawn at an earlier layer, on both image sets and without reuse
    for name in ("ri[map@features[0]]", "ri[map@features[0]] @nn"):
        row = res["reuse"]["metrics"][name]
        assert 0 <= row["mAD"] <= 1 and row["n_images"] > 0
    assert "ri[map@features[0]]" in res["no_reuse"]["metrics"]
    for row in res["reuse"]["metrics"].values():
        lo, hi = row["mAD_ci"]
        assert lo <= row["mAD"] <= hi
    pairs = {(c["ri"], c["baseline"]) for c in res["reuse"]["comparisons"]}
    assert ("ri", "gradcam") in pairs and ("ri @nn", "gradcam") in pairs
    # the layer sweep reruns the reuse protocol at the other layer, every method there
    (sweep,) = res["layers"]
    assert sweep["layer"] == "features[0]" and sweep["shape"][0] == f[0][0].out_channels
    assert set(methods) <= set(sweep["metrics"])
    md = markdown_report({"setups": {"tiny": res}, "total_seconds": 1.0})
    assert "| ri | RI's |" in md and "Sanity check" in md
    assert "Reuse protocol at features[0]" in md and "| ri @nn | gradcam |" in md
