"""LoRA through peft: adapters on the attention and MLP projections, the head trained in full."""

from __future__ import annotations

from torch import nn


def add_lora(model: nn.Module, cfg) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # keeps `score` trainable and saved (modules_to_save)
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
    )
    return get_peft_model(model, config)


def merged(model: nn.Module) -> nn.Module:
    """A plain transformers model with the adapters folded into the weights (for export)."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model
