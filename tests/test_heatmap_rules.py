"""The heat-map rules that use the region: hand computations on tiny tensors, properties,
and the rules run end to end on a tiny CNN."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_repinterp import RepresentativeInterpretation
from captum_repinterp.evaluation.selection import CURRENT_DEFAULT, candidate_name, choose_default
from captum_repinterp.features import LayerLayout
from captum_repinterp.heatmap import (
    HEATMAP_RULES,
    RegionContext,
    get_heatmap_rule,
    member_scale,
    region_score_weights,
)
from captum_repinterp.interpretation import Interpretation

LAYOUT = LayerLayout.from_outputs((torch.zeros(1, 2, 2, 2),), False)


def _draw(rule_name, direction, acts, channel_weights=None, relu=True):
    return get_heatmap_rule(rule_name).draw(direction, (acts,), LAYOUT, channel_weights, relu=relu)[
        0
    ]


def test_every_rule_reports_its_cost():
    for name, cls in HEATMAP_RULES.items():
        assert cls.name == name
        assert isinstance(cls.forward_passes, str) and cls.forward_passes
        assert cls.cost_per_channel >= 0
    assert HEATMAP_RULES["region-members"].cost_per_channel == 9
    assert HEATMAP_RULES["region-score"].cost_per_channel == 1
    assert HEATMAP_RULES["elementwise-members"].cost_per_channel == 0


def test_elementwise_positive_by_hand():
    v = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0, -0.5, 1.0])  # K=2, 2x2
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[2.0, 1.0], [0.0, 5.0]]]])
    # position (0,0): max(1,0)*1 + max(-1,0)*2 = 1; (0,1): 0*2 + 2*1 = 2;
    # (1,0): 0.5*3 + 0*0 = 1.5; (1,1): 3*4 + 1*5 = 17
    expect = torch.tensor([[[[1.0, 2.0], [1.5, 17.0]]]])
    torch.testing.assert_close(_draw("elementwise-positive", v, a), expect)
    # the plain elementwise rule lets negative parts cancel: (0,1) = -2*2 + 2*1 = -2
    assert _draw("elementwise", v, a, relu=False)[0, 0, 0, 1] == -2.0


def test_member_scale_by_hand():
    levels = torch.tensor([[1.0, 4.0, 0.0], [3.0, 4.0, 0.0]])  # means 2, 4, 0
    # 1/s = 0.5, 0.25, (not positive: the largest other, 0.5); scaled to mean 1
    raw = torch.tensor([0.5, 0.25, 0.5])
    torch.testing.assert_close(member_scale(levels), raw / raw.mean())
    assert torch.equal(member_scale(torch.zeros(2, 3)), torch.ones(3))


def _context(members, features, inputs=None):
    refs = type("Refs", (), {"features": features, "inputs": inputs})()
    return RegionContext(members=torch.tensor(members), references=refs, reader=None)


def test_elementwise_members_weights_and_map_by_hand():
    seed = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[2.0, 2.0], [2.0, 6.0]]])  # K=2
    # two references, features flattened like the layer (K x 2 x 2 -> 8)
    feats = torch.tensor([[3.0] * 4 + [0.0] * 4, [5.0] * 4 + [4.0] * 4])
    rule = get_heatmap_rule("elementwise-members")
    cw = rule.region_weights(
        torch.zeros(1, 8), torch.zeros(1), (torch.zeros(1, 1, 4, 4),), (seed,), None,
        context=_context([1, 0], feats),
    )  # fmt: skip
    # channel means: seed 1 and 3; ref1 5 and 4; ref0 3 and 0 -> s = (3, 7/3)
    raw = torch.tensor([1 / 3, 3 / 7])
    torch.testing.assert_close(cw, (raw / raw.mean()).float())
    v = torch.tensor([1.0, -1.0, 2.0, 0.0, 0.5, 0.5, -1.0, 1.0])
    a = seed[None]
    expect = ((v.reshape(1, 2, 2, 2) * cw.reshape(1, 2, 1, 1)) * a).sum(1, keepdim=True)
    torch.testing.assert_close(_draw("elementwise-members", v, a, cw), expect.clamp_min(0))
    # with only the first member kept
    rule.n_members = 1
    try:
        cw1 = rule.region_weights(
            torch.zeros(1, 8), torch.zeros(1), (torch.zeros(1, 1, 4, 4),), (seed,), None,
            context=_context([1, 0], feats, inputs=torch.ones(2, 1, 4, 4)),
        )  # fmt: skip
    finally:
        rule.n_members = 8
    raw1 = torch.tensor([1 / 3, 1 / 3.5])
    torch.testing.assert_close(cw1, (raw1 / raw1.mean()).float())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.1, 10.0), min_size=3, max_size=3))
def test_elementwise_members_map_is_invariant_to_channel_scale(scales):
    """Scaling a channel everywhere (seed, members, new image) leaves the map unchanged
    up to one positive factor (the weights are scaled to mean 1)."""
    gen = torch.Generator().manual_seed(0)
    seed = torch.rand(3, 2, 2, generator=gen) + 0.1
    feats = torch.rand(4, 12, generator=gen) + 0.1
    new = torch.rand(2, 3, 2, 2, generator=gen)
    v = torch.randn(12, generator=gen)
    c = torch.tensor(scales)[:, None, None]
    layout = LayerLayout.from_outputs((torch.zeros(1, 3, 2, 2),), False)
    rule = get_heatmap_rule("elementwise-members")

    def the_map(seed, feats, new):
        cw = rule.region_weights(
            torch.zeros(1, 12), torch.zeros(1), (torch.zeros(1, 1, 2, 2),), (seed,), None,
            context=_context([0, 1, 2, 3], feats),
        )  # fmt: skip
        m = rule.draw(v, (new,), layout, cw, relu=False)[0]
        return m / m.abs().sum()

    scaled_feats = (feats.reshape(4, 3, 2, 2) * c).reshape(4, 12)
    torch.testing.assert_close(
        the_map(seed * c, scaled_feats, new * c), the_map(seed, feats, new), rtol=1e-4, atol=1e-5
    )


def _linear_features(weight):
    """A tiny 'model' from 1 x 1 x 2 x 2 images to features: a fixed linear map."""
    return lambda batch: batch.flatten(1) @ weight.T


def test_region_score_weights_over_several_images_by_hand():
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 1, 2, 2, generator=gen)  # the seed and one member
    acts = torch.rand(2, 3, 2, 2, generator=gen)  # K=3 channels at the input's size
    lin = torch.randn(5, 4, generator=gen)
    w, b = torch.randn(2, 5, generator=gen), torch.randn(2, generator=gen)
    out = region_score_weights(images, acts, _linear_features(lin), w, b, scale_free=True)
    per_image = []
    for i in range(2):
        scores = []
        for k in range(3):
            m = acts[i, k]  # same size: no interpolation
            m = (m - m.min()) / (m.max() - m.min())
            f = (images[i, 0] * m).reshape(4) @ lin.T
            scores.append(min(float((w[j] @ f + b[j]) / w[j].norm()) for j in range(2)))
        s = torch.tensor(scores, dtype=torch.float64)
        per_image.append(torch.softmax(s / s.std(correction=0), 0))
    torch.testing.assert_close(out, torch.stack(per_image).mean(0).float(), rtol=1e-5, atol=1e-6)
    # the seed alone, without scale-freeing: the rule "region-score"
    alone = region_score_weights(images[:1], acts[0], _linear_features(lin), w, b)
    torch.testing.assert_close(alone.sum(), torch.tensor(1.0))


@settings(max_examples=25, deadline=None)
@given(st.floats(0.01, 100.0))
def test_scale_free_weights_do_not_depend_on_the_margins_scale(c):
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(3, 1, 2, 2, generator=gen)
    acts = torch.rand(3, 4, 2, 2, generator=gen)
    lin = torch.randn(5, 4, generator=gen)
    w, b = torch.randn(3, 5, generator=gen), torch.randn(3, generator=gen)
    ref = region_score_weights(images, acts, _linear_features(lin), w, b, scale_free=True)
    # features scaled by c with the bias scaled too: every signed distance scales by c
    scaled = region_score_weights(images, acts, _linear_features(lin * c), w, b * c, True)
    torch.testing.assert_close(scaled, ref, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def fitted(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.features[-1])
    ri.fit(x[:240], batch_size=64, progress=False)
    return ri, model, x


def _hand_region_score(model, image, acts, reg):
    k = acts.shape[0]
    scores = []
    for c in range(k):
        m = F.interpolate(acts[c][None, None], size=(12, 12), mode="bilinear",
                          align_corners=False)[0, 0]  # fmt: skip
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        f = model.features(image * m).detach().reshape(-1)
        scores.append(float(((reg.weight @ f + reg.bias) / reg.weight.norm(dim=1)).min()))
    return torch.tensor(scores, dtype=torch.float64)


def test_region_members_on_a_cnn_by_hand(fitted, tmp_path):
    ri, model, x = fitted
    seed = x[244:245]
    reg = ri.interpret(seed, heatmap_rule="region-members")
    assert reg.channel_weights.shape == (8,)
    rows = reg.members[:8]
    assert len(rows) == 8
    weights = []
    for image in [seed[0], *x[rows]]:
        image = image[None]
        s = _hand_region_score(model, image, model.features(image).detach()[0], reg)
        weights.append(torch.softmax(s / s.std(correction=0), 0))
    alpha = torch.stack(weights).mean(0).float()
    torch.testing.assert_close(reg.channel_weights, alpha, rtol=1e-4, atol=1e-6)
    maps = reg.heatmap(x[:3])
    expect = (alpha[None, :, None, None] * model.features(x[:3]).detach()).sum(1, keepdim=True)
    torch.testing.assert_close(maps, expect.clamp_min(0), rtol=1e-4, atol=1e-5)
    # LayerGradCam's layout, and attribute() on the seed is the interpretation's map
    assert maps.shape == LayerGradCam(model, model.features[-1]).attribute(x[:3], 0).shape
    torch.testing.assert_close(ri.attribute(seed, heatmap_rule="region-members"), reg.heatmap(seed))
    reg.save(tmp_path / "r.npz")
    back = Interpretation.load(tmp_path / "r.npz", explainer=ri)
    torch.testing.assert_close(back.heatmap(x[:3]), maps)


def test_region_members_leaves_out_the_seed_itself(fitted):
    ri, model, x = fitted
    seed = x[10:11]  # a reference: it is its own nearest member
    reg = ri.interpret(seed, heatmap_rule="region-members")
    assert int(reg.members[0]) == 10
    ctx = RegionContext(reg.members, ri.references_, ri.reader_)
    rows = ctx.nearest_members(8, (seed,))
    assert (
        10 not in rows.tolist()
        and rows.tolist() == [r for r in reg.members.tolist() if r != 10][:8]
    )


class _RowFetcher:
    """Features indexed like sharded references: any index gives ``len(index) x D``."""

    def __init__(self, features):
        self.f = features
        self.calls = 0

    def __getitem__(self, index):
        self.calls += 1
        return self.f[torch.as_tensor(index).reshape(-1)]


def test_nearest_members_leaves_out_every_copy_of_the_seed():
    feats = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    feats[[2, 5, 7]] = feats[0].clone()  # three more copies of reference 0 (the seed)
    images = feats.reshape(10, 1, 2, 2)
    members = torch.tensor([0, 2, 5, 1, 7, 3, 4, 6, 8, 9])
    expect = [1, 3, 4, 6]
    for fetch in (lambda f: f, _RowFetcher):
        refs = SimpleNamespace(features=fetch(feats), inputs=images)
        ctx = RegionContext(members, refs, None)
        assert ctx.nearest_members(4, seed_features=feats[0]).tolist() == expect
        assert ctx.nearest_members(4, (images[:1],)).tolist() == expect
        assert ctx.nearest_members(20, seed_features=feats[0]).tolist() == [1, 3, 4, 6, 8, 9]
        assert ctx.nearest_members(0, seed_features=feats[0]).tolist() == []
    # one batch of m + 1 rows when the seed is not among them twice
    refs = SimpleNamespace(features=_RowFetcher(feats), inputs=None)
    ctx = RegionContext(torch.tensor([3, 4, 6, 8, 9]), refs, None)
    assert ctx.nearest_members(2, seed_features=feats[0]).tolist() == [3, 4]
    assert refs.features.calls == 1


def test_region_members_without_reference_images_scores_the_seed_alone(tiny):
    model, x = tiny
    ds = torch.utils.data.TensorDataset(x[:240])
    ri = RepresentativeInterpretation(model, model.features[-1]).fit(ds, progress=False)
    assert ri.references_.inputs is None
    reg = ri.interpret(x[244:245], heatmap_rule="region-members")
    s = _hand_region_score(model, x[244:245], model.features(x[244:245]).detach()[0], reg)
    alpha = torch.softmax(s / s.std(correction=0), 0).float()
    torch.testing.assert_close(reg.channel_weights, alpha, rtol=1e-4, atol=1e-6)


def test_region_members_falls_back_to_elementwise_off_convolutions(tiny):
    model, x = tiny
    ri = RepresentativeInterpretation(model, model.head[2]).fit(x[:200], progress=False)
    got = ri.attribute(x[200:203], heatmap_rule="region-members")
    want = ri.attribute(x[200:203], heatmap_rule="elementwise", heatmap_layer=None)
    torch.testing.assert_close(got, want)


def test_region_score_at_an_earlier_layer_by_hand(fitted):
    ri, model, x = fitted
    f0 = model.features[0]
    seed = x[244:245]
    reg = ri.interpret(seed, heatmap_rule="region-score", heatmap_layer=f0)
    a0 = f0(seed).detach()[0]  # 6 x 6 x 6
    assert reg.channel_weights.shape == (6,)
    alpha = torch.softmax(_hand_region_score(model, seed, a0, reg), 0).float()
    torch.testing.assert_close(reg.channel_weights, alpha, rtol=1e-4, atol=1e-6)
    maps = reg.heatmap(x[:4])
    expect = (alpha[None, :, None, None] * f0(x[:4]).detach()).sum(1, keepdim=True)
    torch.testing.assert_close(maps, expect.clamp_min(0), rtol=1e-4, atol=1e-5)
    assert maps.shape == LayerGradCam(model, f0).attribute(x[:4], 0).shape
    torch.testing.assert_close(
        ri.attribute(seed, heatmap_rule="region-score", heatmap_layer=f0), reg.heatmap(seed)
    )


def _report(cells):
    """A two-candidate, one-setup report with given (win_AD, win_AI) per keep share."""
    metrics = {
        "ri": {"mAD": 0.3, "mAI": 0.2},
        "ri[x]": {"mAD": 0.2, "mAI": 0.3},
        "gradcam": {"mAD": 0.5, "mAI": 0.1},
        "scorecam": {"mAD": 0.25, "mAI": 0.25},
    }
    keep = {}
    for key, outcome in cells.items():
        comps = []
        for ri_name, (wad, wai) in outcome.items():
            for b in ("gradcam", "scorecam"):
                comps.append({"ri": ri_name, "baseline": b, "dAD": -0.1, "dAD_ci": [-0.2, 0.0],
                              "dAI": 0.1, "dAI_ci": [0.0, 0.2], "estimable": True,
                              "win_AD": wad if b == "scorecam" else True,
                              "win_AI": wai if b == "scorecam" else True})  # fmt: skip
        keep[key] = {"metrics": metrics, "comparisons": comps}
    cfg = {"heatmap_layer": None, "forward_passes": "0", "cost_per_channel": 0}
    return {
        "setups": {
            "s": {
                "methods": ["ri", "gradcam", "scorecam"],
                "ri_configs": {
                    "ri": {**cfg, "heatmap_rule": "elementwise"},
                    "ri[x]": {**cfg, "heatmap_rule": "x", "cost_per_channel": 1},
                    "ri[x@f0]": {**cfg, "heatmap_rule": "x", "heatmap_layer": "f0"},
                },
                "reuse": {"keep": keep},
            }
        }
    }


def test_choose_default_counts_cells_against_the_best_baseline():
    rep = _report({"0.2": {"ri": (None, False), "ri[x]": (True, None)},
                   "0.5": {"ri": (None, None), "ri[x]": (True, True)}})  # fmt: skip
    sel = choose_default(rep, max_cost_per_channel=None)
    assert sel["default"] == "x"
    first, second = sel["ranking"]
    assert (first["config"], first["wins"], first["losses"], first["ties"]) == ("ri[x]", 3, 0, 1)
    assert (second["wins"], second["losses"], second["ties"]) == (0, 1, 3)
    # every cell is against scorecam, the best baseline on both metrics
    assert {c["opponent"] for c in sel["cells"]} == {"scorecam"}
    # the layer variant is not a candidate
    assert all(c["candidate"] != "ri[x@f0]" for c in sel["cells"])


def test_choose_default_breaks_ties_by_cost_then_the_current_default():
    same = {"0.2": {"ri": (True, None), "ri[x]": (True, None)}}
    assert choose_default(_report(same), None)["default"] == "elementwise"  # cheaper
    fewer_losses = {"0.2": {"ri": (True, False), "ri[x]": (True, None)}}
    assert choose_default(_report(fewer_losses), None)["default"] == "x"


def test_choose_default_keeps_the_cost_bound():
    # "x" (one forward pass per channel) loses fewer cells but is above the default bound
    fewer_losses = {"0.2": {"ri": (True, False), "ri[x]": (True, None)}}
    sel = choose_default(_report(fewer_losses))
    assert sel["default"] == "elementwise"
    assert [(r["config"], r["eligible"]) for r in sel["ranking"]] == [
        ("ri", True),
        ("ri[x]", False),
    ]
    assert choose_default(_report(fewer_losses), max_cost_per_channel=1)["default"] == "x"
    # nothing eligible: the package's default stays
    only_x = _report(fewer_losses)
    del only_x["setups"]["s"]["ri_configs"]["ri"]
    assert choose_default(only_x)["default"] == candidate_name(*CURRENT_DEFAULT)


def test_choose_default_ranks_the_input_and_auto_candidates():
    """Candidates at ``"input"``/``"auto"`` take part (a named layer does not); with the
    same cells the split layer goes first (cheaper), with more wins ``auto`` is chosen."""
    rep = _report({"0.2": {"ri": (True, None), "ri[x]": (True, None)}})
    setup = rep["setups"]["s"]
    for name, where in (("ri[e@input]", "input"), ("ri[e@auto]", "auto")):
        setup["ri_configs"][name] = {"heatmap_rule": "elementwise", "heatmap_layer": where,
                                     "named_layer": False, "forward_passes": "0",
                                     "cost_per_channel": 0}  # fmt: skip
    part = setup["reuse"]["keep"]["0.2"]
    part["metrics"] = {**part["metrics"], "ri[e@input]": {"mAD": 0.2, "mAI": 0.3},
                       "ri[e@auto]": {"mAD": 0.2, "mAI": 0.3}}  # fmt: skip
    base = [c for c in part["comparisons"] if c["ri"] == "ri"]
    part["comparisons"] += [{**c, "ri": "ri[e@input]"} for c in base]
    sel = choose_default(rep, max_cost_per_channel=0)
    order = [r["rule"] for r in sel["ranking"] if r["eligible"]]
    # same cells: the split layer first; auto has no comparisons on record: last
    assert order == ["elementwise", "elementwise@input", "elementwise@auto"]
    part["comparisons"] += [{**c, "ri": "ri[e@auto]", "win_AI": True} for c in base]
    sel = choose_default(rep, max_cost_per_channel=0)
    assert (sel["default"], sel["default_rule"], sel["default_layer"]) == (
        "elementwise@auto", "elementwise", "auto")  # fmt: skip
    assert sel["ranking"][0]["wins"] == 2


def test_choose_default_breaks_a_tie_by_the_current_defaults_rule(monkeypatch):
    """Two candidates with the same cells and cost, neither the current default: the one
    with the current default's rule goes first, whatever the order of the configs."""
    import captum_repinterp.evaluation.selection as selection

    monkeypatch.setattr(selection, "CURRENT_DEFAULT", ("m", None))
    for order in ((("ri[a@input]", "a"), ("ri[m@auto]", "m")),
                  (("ri[m@auto]", "m"), ("ri[a@input]", "a"))):  # fmt: skip
        rep = _report({"0.2": {"ri": (None, None)}})
        setup = rep["setups"]["s"]
        part = setup["reuse"]["keep"]["0.2"]
        base = [c for c in part["comparisons"] if c["ri"] == "ri"]
        for name, rule in order:
            where = name.split("@")[1][:-1]
            setup["ri_configs"][name] = {"heatmap_rule": rule, "heatmap_layer": where,
                                         "named_layer": False, "forward_passes": "0",
                                         "cost_per_channel": 0}  # fmt: skip
            part["metrics"][name] = {"mAD": 0.2, "mAI": 0.3}
            part["comparisons"] += [{**c, "ri": name, "win_AD": True} for c in base]
        sel = selection.choose_default(rep)
        assert sel["default"] == "m@auto", order


def _two_setup_report(choices, outcomes):
    """Setups ``s0``, ``s1``, ... where ``"auto"`` chose ``choices[i]`` (``"input"`` or None),
    configs ``ri[a]`` (rule a at the split layer), ``ri[b@input]``, ``ri[a@input]``;
    ``outcomes[setup][config]`` is the (win_AD, win_AI) of the only keep share."""
    setups = {}
    for i, choice in enumerate(choices):
        name = f"s{i}"
        comps = [{"ri": ri, "baseline": "scorecam", "dAD": -0.1, "dAD_ci": [-0.2, -0.05],
                  "dAI": 0.1, "dAI_ci": [0.05, 0.2], "estimable": True,
                  "win_AD": wad, "win_AI": wai}
                 for ri, (wad, wai) in outcomes[name].items()]  # fmt: skip
        metrics = {ri: {"mAD": 0.2, "mAI": 0.3} for ri in outcomes[name]}
        metrics["scorecam"] = {"mAD": 0.25, "mAI": 0.25}
        cfg = {"forward_passes": "0", "cost_per_channel": 0, "named_layer": False}
        setups[name] = {
            "methods": [*outcomes[name], "scorecam"],
            "ri_configs": {
                "ri[a]": {**cfg, "heatmap_rule": "a", "heatmap_layer": None},
                "ri[b@input]": {**cfg, "heatmap_rule": "b", "heatmap_layer": "input"},
                "ri[a@input]": {**cfg, "heatmap_rule": "a", "heatmap_layer": "input"},
            },
            "heatmap_resolution": {"heatmap_layer": choice},
            "reuse": {"keep": {"0.2": {"metrics": metrics, "comparisons": comps}}},
        }
    return {"setups": setups}


def test_choose_default_pairs_take_the_cells_of_the_resolution_auto_chose():
    """A pair for ``"auto"`` (a at the split layer, b at the input) has, on each setup,
    the cells of the config ``"auto"`` would have drawn: a's where the layer was kept,
    b@input's where the input was chosen; a pair of one rule is not added."""
    outcomes = {
        "s0": {"ri[a]": (True, True), "ri[b@input]": (False, False), "ri[a@input]": (None, None)},
        "s1": {"ri[a]": (False, False), "ri[b@input]": (True, None), "ri[a@input]": (None, None)},
    }
    sel = choose_default(_two_setup_report([None, "input"], outcomes), max_cost_per_channel=0)
    rows = {r["rule"]: r for r in sel["ranking"]}
    assert "a/b@auto" in rows and "b/a@auto" not in rows  # b is not run at the split layer
    assert "a/a@auto" not in rows and "a@auto" not in rows
    pair = rows["a/b@auto"]
    assert (pair["wins"], pair["losses"], pair["ties"]) == (3, 0, 1)
    assert (pair["heatmap_rule"], pair["heatmap_layer"], pair["input_rule"]) == ("a", "auto", "b")
    cells = [c for c in sel["cells"] if c["candidate"] == "ri[a/b@auto]"]
    assert {(c["setup"], c["source"]) for c in cells} == {("s0", "ri[a]"), ("s1", "ri[b@input]")}
    assert sel["default"] == "a/b@auto"
    assert (sel["default_rule"], sel["default_layer"], sel["default_input_rule"]) == (
        "a", "auto", "b")  # fmt: skip
    # the same outcomes with the choices swapped: the pair now has the other cells
    sel = choose_default(_two_setup_report(["input", None], outcomes), max_cost_per_channel=0)
    pair = next(r for r in sel["ranking"] if r["rule"] == "a/b@auto")
    assert (pair["wins"], pair["losses"], pair["ties"]) == (0, 4, 0)


def test_choose_default_ranks_by_wins_minus_losses():
    """Three wins and two losses rank below two wins and no loss (by wins first they
    would not)."""
    tie = (None, None)
    outcomes = {
        "s0": {"ri[a]": (True, True), "ri[b@input]": (True, True), "ri[a@input]": tie},
        "s1": {"ri[a]": (True, False), "ri[b@input]": tie, "ri[a@input]": tie},
        "s2": {"ri[a]": (False, None), "ri[b@input]": tie, "ri[a@input]": tie},
    }
    report = _two_setup_report(["input"] * 3, outcomes)
    sel = choose_default(report, max_cost_per_channel=0)
    rows = {r["rule"]: r for r in sel["ranking"]}
    assert (rows["a"]["wins"], rows["a"]["losses"]) == (3, 2)
    assert (rows["b@input"]["wins"], rows["b@input"]["losses"]) == (2, 0)
    order = [r["rule"] for r in sel["ranking"]]
    assert order.index("b@input") < order.index("a")
    # auto chose the input everywhere, so the pair a/b@auto has b@input's cells
    assert order.index("a/b@auto") < order.index("a")


def test_choose_default_weighs_every_family_the_same():
    """``a`` wins 2 cells on each of three setups of one family, ``b@input`` wins 2 on the
    fourth setup, its own family: by counts ``a`` leads 6 to 2; by families (6 / 3 = 2
    against 2 / 1 = 2) they tie, and the weighted wins then tie too, so cost decides
    (the split layer first). When one of ``a``'s wins becomes a loss, its score is
    2 - 2 / 3 and ``b@input`` goes first although ``a`` still has more wins."""
    tie = (None, None)
    outcomes = {f"s{i}": {"ri[a]": (True, True), "ri[b@input]": tie, "ri[a@input]": tie}
                for i in range(3)}  # fmt: skip
    outcomes["s3"] = {"ri[a]": tie, "ri[b@input]": (True, True), "ri[a@input]": tie}
    report = _two_setup_report([None] * 4, outcomes)
    for i, res in enumerate(report["setups"].values()):
        res["family"] = "big" if i < 3 else "small"
    rows = {r["rule"]: r for r in choose_default(report)["ranking"]}
    assert (rows["a"]["wins"], rows["b@input"]["wins"]) == (6, 2)
    assert rows["a"]["score"] == pytest.approx(2.0) == rows["b@input"]["score"]
    assert choose_default(report)["default"] == "a"
    report["setups"]["s1"]["reuse"]["keep"]["0.2"]["comparisons"][0]["win_AI"] = False
    sel = choose_default(report)
    rows = {r["rule"]: r for r in sel["ranking"]}
    assert rows["a"]["score"] == pytest.approx(2.0 - 2 / 3)  # a win became a loss
    assert sel["default"] == "b@input"
    # without families every setup is its own family: counts decide, a first
    for res in report["setups"].values():
        del res["family"]
    assert choose_default(report)["default"] == "a"


def test_choose_default_keeps_the_sanity_bound():
    """A candidate whose maps stay correlated above the bound with the maps of the
    randomised top block, on any setup, is not eligible; a pair takes the value of the
    rule it draws on each setup."""
    tie = (None, None)
    outcomes = {
        "s0": {"ri[a]": (True, True), "ri[b@input]": (True, None), "ri[a@input]": tie},
        "s1": {"ri[a]": (True, True), "ri[b@input]": (True, None), "ri[a@input]": tie},
    }
    report = _two_setup_report([None, "input"], outcomes)
    report["setups"]["s0"]["sanity"] = {"stages": [{"ri[a]": 0.2, "ri[b@input]": 0.9}]}
    report["setups"]["s1"]["sanity"] = {"stages": [{"ri[a]": 0.7, "ri[b@input]": 0.1}]}
    sel = choose_default(report)
    rows = {r["rule"]: r for r in sel["ranking"]}
    assert rows["a"]["sanity"] == 0.7 and not rows["a"]["eligible"]
    assert rows["b@input"]["sanity"] == 0.9 and not rows["b@input"]["eligible"]
    # the pair draws a on s0 (0.2) and b at the input on s1 (0.1)
    pair = rows["a/b@auto"]
    assert pair["sanity_by_setup"] == {"s0": 0.2, "s1": 0.1} and pair["eligible"]
    assert sel["default"] == "a/b@auto"
    assert choose_default(report, max_sanity=None)["default"] == "a"  # 4 wins, cheaper
    assert not rows["a"]["within_sanity"] and rows["a"]["within_cost"]


def test_channel_members_is_channel_at_the_split_layer_and_members_elsewhere(fitted, tmp_path):
    """The pair rule: at the split layer its map is the channel rule's, by hand
    (``relu(sum_k mean_p v[k, p] A_k)``); at the input and at an earlier layer it is the
    elementwise-members rule's, with the same member levels."""
    ri, model, x = fitted
    seed = x[244:245]
    pair = ri.interpret(seed, heatmap_rule="channel-members", heatmap_layer=None)
    members = ri.interpret(seed, heatmap_rule="elementwise-members", heatmap_layer=None)
    torch.testing.assert_close(pair.channel_weights, members.channel_weights)
    v = pair.direction.reshape(model.features(seed).shape[1:])  # K x h x w
    acts = model.features(x[:3]).detach()
    alpha = v.mean(dim=(1, 2))
    expect = (alpha[None, :, None, None] * acts).sum(1, keepdim=True).clamp_min(0)
    torch.testing.assert_close(pair.heatmap(x[:3]), expect, rtol=1e-4, atol=1e-5)
    channel = ri.interpret(seed, heatmap_rule="channel", heatmap_layer=None)
    torch.testing.assert_close(pair.heatmap(x[:3]), channel.heatmap(x[:3]))
    for where in ("input", model.features[0]):
        pair = ri.interpret(seed, heatmap_rule="channel-members", heatmap_layer=where)
        members = ri.interpret(seed, heatmap_rule="elementwise-members", heatmap_layer=where)
        torch.testing.assert_close(pair.heatmap(x[:3]), members.heatmap(x[:3]))
        assert not torch.allclose(pair.heatmap(x[:3]).sum(), torch.zeros(()))
    pair.save(tmp_path / "p.npz")
    back = Interpretation.load(tmp_path / "p.npz", explainer=ri)
    assert back.heatmap_rule == "channel-members"


# --------------------------------------------------------------------- choose_default's max_sanity
def test_choose_default_checks_max_sanity():
    """A NaN bound would make every candidate eligible without a word (``x > nan`` is
    False), a string failed in a comparison, a bool was taken as 1: each gets an error
    naming ``max_sanity``; None still switches the bound off."""

    from captum_repinterp.evaluation.selection import choose_default

    tie = (None, None)
    outcomes = {
        "s0": {"ri[a]": (True, True), "ri[b@input]": (True, None), "ri[a@input]": tie},
        "s1": {"ri[a]": (True, True), "ri[b@input]": (True, None), "ri[a@input]": tie},
    }
    report = _two_setup_report([None, "input"], outcomes)
    report["setups"]["s0"]["sanity"] = {"stages": [{"ri[a]": 0.2, "ri[b@input]": 0.1}]}
    report["setups"]["s1"]["sanity"] = {"stages": [{"ri[a]": 0.7, "ri[b@input]": 0.1}]}
    assert choose_default(report)["default"] == "a/b@auto"  # a is out of the bound on s1
    assert choose_default(report, max_sanity=None)["default"] == "a"
    with pytest.raises(ValueError, match="max_sanity"):
        choose_default(report, max_sanity=float("nan"))
    for bad in ("0.5", True):
        with pytest.raises(TypeError, match="max_sanity"):
            choose_default(report, max_sanity=bad)


# ---------------------------------------------------------------- the registry
def _rule_class(name, base=None, **attrs):
    """A new rule class (not registered) named ``name``, ``elementwise``'s map."""
    base = base or get_heatmap_rule("elementwise").__class__
    return type("ScratchRule", (base,), {"name": name, **attrs})


@pytest.fixture
def registry():
    """The registry restored after the test, whatever it registered."""
    saved = dict(HEATMAP_RULES)
    yield HEATMAP_RULES
    HEATMAP_RULES.clear()
    HEATMAP_RULES.update(saved)


def test_register_refuses_a_taken_name_and_what_is_not_a_rule(registry):
    """A second class under a built-in's name is refused (it replaced the built-in
    silently); registering a class again, or a class redefined under the same module
    and name (a re-run notebook cell), is not."""
    from captum_repinterp.heatmap import ChannelRule, register_heatmap_rule

    with pytest.raises(ValueError, match="'channel' is taken by .*ChannelRule"):
        register_heatmap_rule(_rule_class("channel"))
    assert HEATMAP_RULES["channel"] is ChannelRule
    assert register_heatmap_rule(ChannelRule) is ChannelRule
    register_heatmap_rule(_rule_class("scratch-rule"))
    again = register_heatmap_rule(_rule_class("scratch-rule"))  # redefined
    assert HEATMAP_RULES["scratch-rule"] is again
    with pytest.raises(TypeError, match="HeatmapRule subclass"):
        register_heatmap_rule(object)
    with pytest.raises(ValueError, match="non-empty name"):
        register_heatmap_rule(_rule_class(""))


def test_register_refuses_input_without_layer(registry):
    """The input is drawn by the same pull-back as an earlier layer, so a rule drawn at
    the input is drawn at a layer too: a subclass that turned ``supports_layer`` off and
    kept its parent's ``supports_input`` was refused only when ``"auto"`` chose the
    input, with a message about a ``heatmap_layer`` the user had not passed."""
    from captum_repinterp.heatmap import ElementwiseMembersRule, register_heatmap_rule

    split_only = _rule_class("scratch-split", ElementwiseMembersRule, supports_layer=False)
    with pytest.raises(TypeError, match="scratch-split.*supports_input"):
        register_heatmap_rule(split_only)
    assert "scratch-split" not in HEATMAP_RULES


def test_refusals_name_the_rules_that_take_the_layer():
    """The messages list the registered rules drawn at the input or at an earlier layer
    (they said "the elementwise rules", which left out ``channel-members`` and the
    region-scored rules, and would name a new ``elementwise-*`` rule drawn only at the
    split layer)."""
    with pytest.raises(ValueError, match=r"^heatmap_layer='input'.*'channel-members'") as e:
        get_heatmap_rule("channel", "input")
    assert "'region-score'" not in str(e.value)
    with pytest.raises(ValueError, match=r"^heatmap_layer.*'region-score'.*") as e:
        get_heatmap_rule("channel", torch.nn.Identity())
    assert "'channel'," not in str(e.value)
