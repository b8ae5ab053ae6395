"""Stage 5: heat maps of a region, one small class per rule.

A region's direction ``v`` (the combination of its selected boundaries' normals, shaped
like the layer's output) is drawn on any image's layer activations ``A`` as
``sum_k weights[k, p] * A_k[p]``, then summed over channels and passed through a ReLU as
``LayerGradCam`` does. A rule is a subclass of :class:`HeatmapRule` that implements one
method, :meth:`HeatmapRule.cam_weights` (as pytorch-grad-cam's CAM variants implement
``get_cam_weights``), registered by name with :func:`register_heatmap_rule`:

- ``"elementwise"``: ``weights = v``, the rule the authors' code uses to draw
  one boundary; with ``layer=`` (``heatmap_layer``) it is drawn at an earlier layer, the
  gradient of the score ``v . psi`` there standing for ``v`` (:func:`pulled_back_heatmap`);
- ``"channel"``: Grad-CAM-like, ``weights_k = mean_p v[k, p]``;
- ``"elementwise-positive"``: ``weights = max(v, 0)``;
- ``"elementwise-members"``: ``weights = v / s_k``, ``s_k`` the mean activation of
  channel ``k`` over the seed and its 8 nearest reference members (no forward pass);
- ``"channel-members"`` (default): ``"channel"`` at the split layer,
  ``"elementwise-members"`` drawn at the input or an earlier layer (``layer=``);
- ``"region-score"``: Score-CAM-like channel weights scored by the *region*: each
  channel's activation on the seed, upsampled and min-max scaled, masks the seed; ``s_k``
  is how far the masked seed lies inside the region (the smallest signed distance
  ``h_j / ||w_j||`` over the selected boundaries) and ``weights = softmax(s)``, computed
  once on the seed (:meth:`HeatmapRule.region_weights`, ``K`` forward passes) and reused;
  with ``layer=`` the channels are those of that earlier, finer layer;
- ``"region-members"``: ``"region-score"`` computed on the seed and its 8 nearest
  reference members, each image's scores divided by their standard deviation before the
  softmax, the weights averaged (``9 K`` forward passes).

A rule's :meth:`HeatmapRule.region_weights` sees the region's members and the fitted
references through a :class:`RegionContext`: only references, never held-out images.

Outputs follow ``LayerGradCam``'s layout: the layer's shape with dimension 1 summed to 1
(``attr_dim_summation=True``), one tensor per layer output.

Modules: ``base`` (:class:`HeatmapRule`, the registry, :class:`RegionContext`),
``rules`` (the rules that need no forward pass), ``region_score`` (``region-score`` and
``region-members``), ``pullback`` (maps drawn at an earlier layer or the input). A rule
is registered when its module is imported: a rule in a new module is imported here
(``docs/choices.md``, "Structure of the package", lists what else names the rules).
"""

from .base import (
    COMBINE_RULES,
    HEATMAP_RULES,
    INPUT,
    HeatmapRule,
    RegionContext,
    combine_normals,
    get_heatmap_rule,
    register_heatmap_rule,
)
from .pullback import check_input_dtypes, pulled_back_heatmap
from .region_score import RegionMembersRule, RegionScoreRule, read_layer, region_score_weights
from .rules import (
    ChannelMembersRule,
    ChannelRule,
    ElementwiseMembersRule,
    ElementwisePositiveRule,
    ElementwiseRule,
    member_scale,
)

__all__ = [
    "COMBINE_RULES",
    "HEATMAP_RULES",
    "INPUT",
    "ChannelMembersRule",
    "ChannelRule",
    "ElementwiseMembersRule",
    "ElementwisePositiveRule",
    "ElementwiseRule",
    "HeatmapRule",
    "RegionContext",
    "RegionMembersRule",
    "RegionScoreRule",
    "check_input_dtypes",
    "combine_normals",
    "get_heatmap_rule",
    "member_scale",
    "pulled_back_heatmap",
    "read_layer",
    "region_score_weights",
    "register_heatmap_rule",
]
