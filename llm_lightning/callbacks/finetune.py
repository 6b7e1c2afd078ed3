"""Freezing schedules as Lightning `BaseFinetuning` callbacks.

`LayerFreeze` trains only the top `k` decoder layers, the final norm and the head. Frozen
parameters have `requires_grad=False`, so autograd stops at the lowest trainable layer and
never pays for backward through the frozen ones.

`GradualUnfreeze` starts like `LayerFreeze` and unfreezes `layers_per_step` more layers,
top-down, every `every_n_epochs` epochs (ULMFiT-style). Its position is part of the
checkpoint, so a resumed run continues the schedule.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from typing_extensions import override

from llm_lightning.errors import UserError
from llm_lightning.models import decoder_parts


class LayerFreeze(BaseFinetuning):
    """Freeze the embeddings and all but the top `trainable_layers` decoder layers."""

    def __init__(self, trainable_layers: int | None, freeze_embeddings: bool = True):
        super().__init__()
        if trainable_layers is not None and trainable_layers < 0:
            raise UserError(f"finetune.trainable_layers must be >= 0, got {trainable_layers}.")
        self.trainable_layers = trainable_layers
        self.freeze_embeddings = freeze_embeddings

    def _check(self, layers: nn.ModuleList) -> None:
        if self.trainable_layers is None:  # all layers
            self.trainable_layers = len(layers)
        if self.trainable_layers > len(layers):
            raise UserError(
                f"finetune.trainable_layers={self.trainable_layers} but the model has only {len(layers)} "
                f"decoder layers; choose 0..{len(layers)}."
            )

    @override
    def freeze_before_training(self, pl_module) -> None:
        embeddings, layers, _ = decoder_parts(pl_module.model)
        self._check(layers)
        if self.freeze_embeddings:
            self.freeze(embeddings)
        self.freeze(list(layers)[: len(layers) - self.trainable_layers])

    @override
    def finetune_function(self, pl_module, current_epoch: int, optimizer) -> None:
        pass


class GradualUnfreeze(LayerFreeze):
    """Unfreeze `layers_per_step` more layers top-down every `every_n_epochs` epochs."""

    def __init__(
        self,
        trainable_layers: int = 2,
        layers_per_step: int = 2,
        every_n_epochs: int = 1,
        freeze_embeddings: bool = True,
        lr_factor: float = 1.0,
    ):
        super().__init__(trainable_layers, freeze_embeddings)
        if layers_per_step < 1 or every_n_epochs < 1:
            raise UserError(
                f"finetune.layers_per_step and finetune.every_n_epochs must be >= 1, "
                f"got {layers_per_step} and {every_n_epochs}."
            )
        self.layers_per_step, self.every_n_epochs, self.lr_factor = layers_per_step, every_n_epochs, lr_factor
        self.unfrozen = trainable_layers  # layers trained now, counted from the top

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "unfrozen": self.unfrozen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unfrozen = state_dict.get("unfrozen", self.trainable_layers)
        super().load_state_dict(state_dict)

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        # `setup` froze layers before the checkpoint said how many were unfrozen: unfreeze those again.
        _, layers, _ = decoder_parts(pl_module.model)
        self.make_trainable(list(layers)[len(layers) - self.unfrozen :])
        super().on_fit_start(trainer, pl_module)  # on resume: puts back the unfrozen layers' param groups
        for optimizer in trainer.optimizers:  # and one LR lambda per group, before the scheduler state loads
            extend_schedulers(trainer, optimizer)

    @override
    def freeze_before_training(self, pl_module) -> None:
        embeddings, layers, _ = decoder_parts(pl_module.model)
        self._check(layers)
        if self.freeze_embeddings:
            self.freeze(embeddings)
        # On resume, `unfrozen` comes from the checkpoint; BaseFinetuning restores the param groups.
        self.freeze(list(layers)[: len(layers) - self.unfrozen])

    @override
    def finetune_function(self, pl_module, current_epoch: int, optimizer) -> None:
        _, layers, _ = decoder_parts(pl_module.model)
        due = self.trainable_layers + (current_epoch // self.every_n_epochs) * self.layers_per_step
        target = min(due, len(layers))
        if target <= self.unfrozen:
            return
        newly = list(layers)[len(layers) - target : len(layers) - self.unfrozen]
        lr = optimizer.param_groups[0]["lr"] * self.lr_factor
        self.unfreeze_and_add_param_group(newly, optimizer, lr=lr)
        extend_schedulers(pl_module.trainer, optimizer)
        self.unfrozen = target
        pl_module.log("train/trainable_params", float(pl_module.trainable_parameters()))


def extend_schedulers(trainer, optimizer) -> None:
    """LambdaLR keeps one base LR per param group; give the new groups the same schedule
    (otherwise `zip` in LambdaLR.step silently leaves them at a constant LR)."""
    for config in trainer.lr_scheduler_configs:
        sched = config.scheduler
        if getattr(sched, "optimizer", None) is not optimizer or not hasattr(sched, "lr_lambdas"):
            continue
        while len(sched.base_lrs) < len(optimizer.param_groups):
            group = optimizer.param_groups[len(sched.base_lrs)]
            group.setdefault("initial_lr", group["lr"])
            sched.base_lrs.append(group["initial_lr"])
            sched.lr_lambdas.append(sched.lr_lambdas[0])
