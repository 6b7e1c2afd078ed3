"""Pruning as Lightning callbacks, chosen by the `prune=` config group.

- `MagnitudePruning` (prune=magnitude): unstructured masks, L1 or random, global or per
  layer, on a one-shot / at-epochs / gradual cubic schedule. Zeros only: no speedup.
- `StructuredPruning` (prune=structured): removes MLP neurons and attention heads for real.
- `DepthPruning` (prune=depth): removes whole decoder layers.

Structured and depth pruning act once, in `setup`, before the optimizer is built: importance is
measured on task training batches, the tensors are shrunk, and fine-tuning then recovers.
Their plan (which units were kept) is in the checkpoint, so a resumed run rebuilds the same
shapes before the weights load; a checkpoint loaded for evaluation needs no plan, since it carries
the pruned model's own config (llm_lightning.models.saved). Magnitude masks and the schedule
position are in the checkpoint too.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from llm_lightning.errors import UserError
from llm_lightning.pruning.depth import block_influence, check_remove_layers, drop_layers, layers_to_keep
from llm_lightning.pruning.loadable import check_saveable
from llm_lightning.pruning.magnitude import (
    IMPORTANCES,
    SCOPES,
    apply_masks,
    compute_masks,
    prunable_weights,
    sparsity_report,
)
from llm_lightning.pruning.schedule import SparsitySchedule, check_sparsity
from llm_lightning.pruning.structured import (
    HEAD_MODES,
    WidthPlan,
    check_width_args,
    plan_width,
    shrink_width,
    width_importance,
)
from llm_lightning.pruning.structured import IMPORTANCES as WIDTH_IMPORTANCES

log = logging.getLogger(__name__)
METHODS = ("none", "magnitude", "structured", "depth")


class MagnitudePruning(Callback):
    """Unstructured pruning on a schedule; weights stay plain tensors (zeros), masks live here."""

    def __init__(
        self,
        schedule: SparsitySchedule,
        importance: str = "l1",
        scope: str = "global",
        seed: int = 0,
        log_per_layer: bool = True,
    ):
        if importance not in IMPORTANCES:
            raise UserError(f"prune.importance={importance!r} is not one of {IMPORTANCES}.")
        if scope not in SCOPES:
            raise UserError(f"prune.scope={scope!r} is not one of {SCOPES}.")
        self.schedule, self.importance, self.scope = schedule, importance, scope
        self.seed, self.log_per_layer = seed, log_per_layer
        self.sparsity = 0.0  # the target the current masks were made for
        self.masks: dict[str, torch.Tensor] | None = None

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self.schedule.resolve(int(trainer.estimated_stepping_batches))  # no-op if restored

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        weights = prunable_weights(pl_module.model)
        target = self.schedule.sparsity_at(trainer.global_step, trainer.current_epoch)
        if target != self.sparsity or (self.masks is None and target > 0):
            self.masks = compute_masks(weights, target, self.importance, self.scope, self.masks, self.seed)
            self.sparsity = target
        if self.masks is not None:
            apply_masks(weights, self.masks)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        weights = prunable_weights(pl_module.model)
        if self.masks is not None:
            apply_masks(weights, self.masks)  # the optimizer step moved pruned weights off zero
        report = sparsity_report(weights)
        pl_module.log("prune/sparsity", report.pop("overall"), on_step=True, on_epoch=False)
        pl_module.log("prune/target_sparsity", self.sparsity, on_step=True, on_epoch=False)
        if self.log_per_layer:
            pl_module.log_dict(
                {f"prune/sparsity_{k}": v for k, v in report.items()}, on_step=True, on_epoch=False
            )

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        # The weights hold the zeros; nothing is reparametrised, so checkpoints and the exported
        # model/ are plain. The masks stay in this callback's state for a run that is extended.
        if self.masks is not None:
            apply_masks(prunable_weights(pl_module.model), self.masks)

    @override
    def on_test_start(self, trainer, pl_module) -> None:
        measured = sparsity_report(prunable_weights(pl_module.model))["overall"]
        if measured < self.schedule.final_sparsity - 1e-3:
            log.warning(
                "The tested checkpoint has sparsity %.3f, below the final %.3f: it was saved before "
                "the schedule ended. Set prune.schedule.end_step earlier or test the last weights.",
                measured,
                self.schedule.final_sparsity,
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "masks": self.masks, "schedule": self.schedule.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sparsity = float(state_dict["sparsity"])
        self.masks = state_dict.get("masks")
        self.schedule.load_state_dict(state_dict.get("schedule", {}))


def _resumed_state(trainer, callback: Callback) -> dict | None:
    """This callback's state in the checkpoint being resumed, read before the weights load.

    Lightning restores callback state only after `setup`, but the shapes must change in `setup`
    (before the optimizer exists and the checkpoint's smaller tensors are copied in).
    """
    loaded = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None) or {}
    return (loaded.get("callbacks") or {}).get(callback.state_key)


def _task_batches(trainer, pl_module, n: int) -> list[dict]:
    datamodule = trainer.datamodule
    if datamodule is None:
        raise UserError(
            "Structured/depth pruning measures importance on task data: pass a datamodule to fit."
        )
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append({k: v.to(pl_module.device) for k, v in batch.items() if torch.is_tensor(v)})
        if len(batches) == n:
            break
    return batches


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


class StructuredPruning(Callback):
    """Remove MLP neurons and attention heads (same count in every layer) before fine-tuning."""

    reshapes_model = True  # train.py runs it before the freezing callbacks

    def __init__(
        self,
        mlp_sparsity: float = 0.5,
        remove_heads: int = 0,
        heads_mode: str = "query",
        importance: str = "activation",
        batches: int = 8,
    ):
        problems = []
        for check in (lambda: check_sparsity(mlp_sparsity, "prune.mlp_sparsity"),):
            try:
                check()
            except ValueError as e:
                problems.append(str(e))
        if heads_mode not in HEAD_MODES:
            problems.append(f"prune.heads_mode={heads_mode!r} is not one of {HEAD_MODES}.")
        if importance not in WIDTH_IMPORTANCES:
            problems.append(f"prune.importance={importance!r} is not one of {WIDTH_IMPORTANCES}.")
        if not isinstance(remove_heads, int) or remove_heads < 0:
            problems.append(f"prune.remove_heads={remove_heads!r} must be an integer >= 0.")
        if not isinstance(batches, int) or batches < 1:
            problems.append(f"prune.batches={batches!r} must be an integer >= 1.")
        if problems:
            raise UserError("Bad structured pruning config:\n  " + "\n  ".join(problems))
        self.mlp_sparsity, self.remove_heads, self.heads_mode = mlp_sparsity, remove_heads, heads_mode
        self.importance, self.batches = importance, batches
        self.plan: WidthPlan | None = None
        self.applied = False

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.applied:
            return
        model = pl_module.model
        resumed = _resumed_state(trainer, self)
        if resumed is not None:
            self.plan = WidthPlan(**resumed["plan"])
        else:
            self.check_model(model.config)
            mlp, heads = width_importance(
                model, _task_batches(trainer, pl_module, self.batches), self.importance
            )
            self.plan = plan_width(
                mlp, heads, model.config, self.mlp_sparsity, self.remove_heads, self.heads_mode
            )
        before = _count(model)
        self.cut(model)
        # what export's save_pretrained will check, asked now rather than after the whole run
        check_saveable(model.config, f"prune=structured (remove_heads={self.remove_heads})")
        self.applied = True
        log.info(
            "Structured pruning: %d -> %d parameters (intermediate_size=%d, heads=%d, kv_heads=%d)",
            before,
            _count(model),
            model.config.intermediate_size,
            model.config.num_attention_heads,
            model.config.num_key_value_heads,
        )

    def check_model(self, config) -> None:
        """Refuse a request this model cannot take (GQA grouping, a config transformers would not
        save or load), listing the values that work; `setup` runs it before any other work."""
        check_width_args(config, self.mlp_sparsity, self.remove_heads, self.heads_mode)

    def cut(self, model) -> None:
        """Shrink `model` to the plan; the same cut in `setup` and when a checkpoint is loaded."""
        shrink_width(model, self.plan)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict() if self.plan else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("plan"):
            self.plan = WidthPlan(**state_dict["plan"])


class DepthPruning(Callback):
    """Remove the `remove_layers` decoder layers with the lowest block influence before fine-tuning."""

    reshapes_model = True  # train.py runs it before the freezing callbacks

    def __init__(self, remove_layers: int = 1, batches: int = 8):
        if not isinstance(remove_layers, int) or remove_layers < 0:
            raise UserError(f"prune.remove_layers={remove_layers!r} must be an integer >= 0.")
        if not isinstance(batches, int) or batches < 1:
            raise UserError(f"prune.batches={batches!r} must be an integer >= 1.")
        self.remove_layers, self.batches = remove_layers, batches
        self.keep: list[int] | None = None
        self.applied = False

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.applied:
            return
        model = pl_module.model
        resumed = _resumed_state(trainer, self)
        if resumed is not None:
            self.keep = list(resumed["keep"])
        else:
            self.check_model(model.config)
            influence = block_influence(model, _task_batches(trainer, pl_module, self.batches))
            log.info("Block influence per layer: %s", [round(x, 4) for x in influence.tolist()])
            self.keep = layers_to_keep(influence, self.remove_layers)
        self.cut(model)
        check_saveable(model.config, f"prune=depth (remove_layers={self.remove_layers})")
        self.applied = True
        log.info("Depth pruning kept layers %s", model.config.kept_layers)

    def check_model(self, config) -> None:
        """Refuse a layer count this model cannot lose; `setup` runs it before any other work."""
        check_remove_layers(config.num_hidden_layers, self.remove_layers)

    def cut(self, model) -> None:
        """Keep the planned layers of `model`; the same cut in `setup` and when a checkpoint is loaded."""
        drop_layers(model, self.keep)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"keep": self.keep}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.keep = state_dict.get("keep")


def pruning_callbacks(cfg) -> list[Callback]:
    """The callback for `cfg.prune.method` (the `prune=` config group)."""
    p = cfg.prune
    if p.method not in METHODS:
        raise UserError(f"prune.method={p.method!r} is not one of {METHODS} (config group `prune=`).")
    if cfg.finetune.method == "lora" and p.method in ("structured", "depth"):
        raise UserError(
            f"prune={p.method} changes tensor shapes and cannot run with finetune=lora; "
            "use finetune=full or finetune=freeze."
        )
    if p.method == "magnitude":
        s = p.schedule
        schedule = SparsitySchedule(
            kind=s.kind,
            final_sparsity=p.sparsity,
            initial_sparsity=s.initial_sparsity,
            start_step=s.start_step,
            end_step=s.end_step,
            frequency=s.frequency,
            epochs=list(s.epochs),
        )
        return [MagnitudePruning(schedule, p.importance, p.scope, p.seed, p.log_per_layer)]
    if p.method == "structured":
        return [StructuredPruning(p.mlp_sparsity, p.remove_heads, p.heads_mode, p.importance, p.batches)]
    if p.method == "depth":
        return [DepthPruning(p.remove_layers, p.batches)]
    return []
