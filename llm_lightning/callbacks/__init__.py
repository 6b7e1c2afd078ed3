"""The Lightning side of fine-tuning, distillation and pruning: which callbacks a config asks for."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from llm_lightning.callbacks.finetune import GradualUnfreeze, LayerFreeze
from llm_lightning.callbacks.throughput import TokenThroughput
from llm_lightning.errors import UserError

__all__ = ["GradualUnfreeze", "LayerFreeze", "TokenThroughput", "finetune_callbacks", "stage_callbacks"]

METHODS = ("full", "freeze", "gradual_unfreeze", "lora")


def finetune_callbacks(cfg) -> list[Callback]:
    method = cfg.method
    if method not in METHODS:
        raise UserError(f"finetune.method={method!r} is not one of {METHODS} (config group `finetune=`).")
    if method == "full":
        return [LayerFreeze(None, freeze_embeddings=True)] if cfg.freeze_embeddings else []
    if method == "freeze":
        return [LayerFreeze(cfg.trainable_layers, cfg.freeze_embeddings)]
    if method == "gradual_unfreeze":
        return [
            GradualUnfreeze(
                cfg.trainable_layers,
                cfg.layers_per_step,
                cfg.every_n_epochs,
                cfg.freeze_embeddings,
                cfg.lr_factor,
            )
        ]
    return []  # lora: peft freezes everything but the adapters and the head


def stage_callbacks(cfg: DictConfig, teacher=None) -> list[Callback]:
    """Distillation and pruning callbacks, chosen by the `distill=` and `prune=` groups.

    `teacher`: what `build_student` found (llm_lightning.distill.student.TeacherRef); without it
    (compress's checks before any stage runs) the distillation settings are only checked."""
    # imported here: both import llm_lightning.callbacks.finetune, so this package's __init__ runs first
    from llm_lightning.callbacks.distill import distillation_callbacks
    from llm_lightning.callbacks.prune import pruning_callbacks

    found: list[Callback] = []
    if cfg.get("distill") and cfg.distill.method != "none":
        found += distillation_callbacks(cfg, teacher)
    if cfg.get("prune") and cfg.prune.method != "none":
        found += pruning_callbacks(cfg)
    return found
