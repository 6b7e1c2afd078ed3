"""Tensor surgery for pruning a Llama classifier: unstructured masks, width (MLP neurons,
attention heads) and depth (decoder layers). The Lightning callbacks that schedule these live
in `llm_lightning.callbacks.prune`; everything here also works on a bare model."""

from llm_lightning.pruning.depth import block_influence, drop_layers
from llm_lightning.pruning.magnitude import compute_masks, prunable_weights, sparsity_report
from llm_lightning.pruning.schedule import SparsitySchedule
from llm_lightning.pruning.structured import WidthPlan, plan_width, shrink_width, width_importance

__all__ = [
    "SparsitySchedule",
    "WidthPlan",
    "block_influence",
    "compute_masks",
    "drop_layers",
    "plan_width",
    "prunable_weights",
    "shrink_width",
    "sparsity_report",
    "width_importance",
]
