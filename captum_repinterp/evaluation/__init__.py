"""Evaluation of representative interpretations against CAM baselines.

The protocol is described in ``docs/method.md``; the results are in
``docs/evaluation.md``.

- :mod:`.metrics`: top-fraction masks, average drop / increase, rank correlation;
- :mod:`.methods`: Grad-CAM (Captum), Grad-CAM++, Score-CAM, HiResCAM (``grad-cam``
  package, optional), Integrated Gradients;
- :mod:`.protocol`: :func:`evaluate_setup` runs the whole protocol on one setup, with the
  masking metrics at each keep share (20% and 50% by default);
- :mod:`.setups`: the real setups (MNIST-5k, faces, digits, and the check setups of the
  rule that chooses the default heat map) and the report;
- :mod:`.selection`: :func:`choose_default`, the rule that picks the default heat-map
  rule from a run (``docs/choices.md``).
"""

from .methods import ChannelWeightMethod, channel_weight_methods, gradcam_package_available
from .metrics import (
    average_drop_increase,
    drop_increase,
    mask_images,
    rank_correlation,
    stratified_t_ci,
    top_fraction_mask,
    upsample,
)
from .protocol import (
    EvalConfig,
    Setup,
    evaluate_setup,
    interval_estimable,
    keep_key,
    randomise,
    recompute_intervals,
)
from .selection import choose_default
from .setups import ALL_SETUPS, CHECK_SETUPS, SETUPS, load_setup, markdown_report, run_evaluation

__all__ = [
    "ALL_SETUPS",
    "CHECK_SETUPS",
    "SETUPS",
    "ChannelWeightMethod",
    "EvalConfig",
    "Setup",
    "average_drop_increase",
    "channel_weight_methods",
    "choose_default",
    "drop_increase",
    "evaluate_setup",
    "gradcam_package_available",
    "interval_estimable",
    "keep_key",
    "load_setup",
    "markdown_report",
    "mask_images",
    "randomise",
    "rank_correlation",
    "recompute_intervals",
    "run_evaluation",
    "stratified_t_ci",
    "top_fraction_mask",
    "upsample",
]
