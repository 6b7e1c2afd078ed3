"""The LightningModule: a sequence classifier's steps, metrics and optimizer; nothing else.

It is given its training loss (`llm_lightning.distill.losses`: cross-entropy, or distillation,
whose teacher outputs come with the batch), as torchtune's KD recipe is given `ForwardKLLoss`.
Fine-tuning schedules, pruning and the teacher's outputs are callbacks that reach this module
through Lightning hooks. Metrics follow lightning-hydra-template's keys: `train/loss`, `val/acc`,
`val/acc_best`, `test/f1_macro`.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
from transformers import PreTrainedTokenizerBase, get_scheduler
from typing_extensions import override

from llm_lightning.data.transfer import UNLABELED
from llm_lightning.distill.losses import (
    ClassificationLoss,
    DistillationLoss,
    labeled_cross_entropy,
    pooled_last_token,
)
from llm_lightning.errors import UserError
from llm_lightning.models import decoder_parts
from llm_lightning.models.saved import SAVED_MODEL_KEY, checkpoint_entry

SCHEDULES = ("linear", "cosine", "constant_with_warmup")
OLD_PROJECTION_KEY = "distill_hidden."


class SequenceClassifier(L.LightningModule):
    """Wraps an HF sequence classifier (`LlamaForSequenceClassification` or a peft wrapper of it).

    Args:
        model: the classifier; `model(input_ids, attention_mask).logits` has shape (batch, num_labels).
        label_names: class names, index = class id.
        optimizer: `lr`, `weight_decay`, `betas`, `eps` for AdamW.
        scheduler: `name` (one of SCHEDULES) and `warmup_ratio` of the total optimizer steps.
        tokenizer: the model's tokenizer; saved in every checkpoint beside the model's own config,
            so `llm_lightning.models.saved` rebuilds the model from the checkpoint alone.
        criterion: the training loss: `ClassificationLoss` (the default) or a `DistillationLoss`,
            which reads the teacher's outputs from the batch (`teacher_logits`, `teacher_hidden`:
            the distillation callback adds them). Its parameters (the hidden-state projection)
            train with the model and are checkpointed with it. Validation and test report the
            cross-entropy (`loss`) either way.
    """

    def __init__(
        self,
        model: nn.Module,
        label_names: list[str],
        optimizer: DictConfig | dict,
        scheduler: DictConfig | dict,
        tokenizer: PreTrainedTokenizerBase | None = None,
        criterion: ClassificationLoss | DistillationLoss | None = None,
    ):
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode; dropout (if any) must be on
        self.tokenizer = tokenizer
        self.criterion = criterion if criterion is not None else ClassificationLoss()
        self._student_hidden: torch.Tensor | None = None  # the final norm's output, for the hidden term
        self._hidden_hook = None
        self.label_names = list(label_names)
        self.optimizer_cfg = _plain(optimizer)
        self.scheduler_cfg = _plain(scheduler)
        if self.scheduler_cfg["name"] not in SCHEDULES:
            raise UserError(f"scheduler.name={self.scheduler_cfg['name']!r} is not one of {SCHEDULES}.")
        # Plain containers only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "label_names": self.label_names,
                "optimizer": self.optimizer_cfg,
                "scheduler": self.scheduler_cfg,
            }
        )
        n = len(self.label_names)
        metrics = MetricCollection(
            {"acc": MulticlassAccuracy(n, average="micro"), "f1_macro": MulticlassF1Score(n, average="macro")}
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in the checkpoint, so a resumed run keeps its best
        self.confusion = MulticlassConfusionMatrix(n)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits, shape (batch, num_labels), in float32 whatever the autocast dtype."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Cross-entropy over the labeled rows (val/loss, test/loss). Transfer-set texts (label
        UNLABELED) have no CE; a batch of only those gets 0."""
        return labeled_cross_entropy(logits, batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        terms = self.training_terms(logits, batch)
        loss = terms.pop("loss")
        bs = batch["labels"].shape[0]
        for name, term in terms.items():  # distillation's kd, ce (and hidden), each logged on its own
            self.log(f"train/{name}", term.detach(), on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        labeled = batch["labels"] != UNLABELED
        if labeled.any():
            self.train_metrics.update(logits.detach()[labeled], batch["labels"][labeled])
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=bs)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}). Lower optimizer.lr or use precision=32; the last good checkpoint is kept."
            )
        return loss

    def training_terms(self, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """The criterion on one training batch: `{"loss": total}`, plus distillation's own terms."""
        if not isinstance(self.criterion, DistillationLoss):
            return {"loss": self.criterion(logits, batch["labels"])}
        if "teacher_logits" not in batch:
            raise RuntimeError(
                "A DistillationLoss needs the teacher's outputs in the batch (`teacher_logits`); the "
                "KnowledgeDistillation callback (llm_lightning/callbacks/distill.py) adds them."
            )
        progress = self.global_step / max(1, self.trainer.estimated_stepping_batches)
        schedule = self.criterion.settings.at(progress)
        self.log_dict({f"distill/{k}": v for k, v in schedule.items()}, on_step=True, on_epoch=False)
        student_hidden = None
        if self.criterion.wants_hidden:
            student_hidden = pooled_last_token(
                self._student_hidden, batch["input_ids"], self.model.config.pad_token_id
            )
        return self.criterion(
            logits,
            batch["teacher_logits"],
            batch["labels"],
            progress,
            student_hidden=student_hidden,
            teacher_hidden=batch.get("teacher_hidden"),
        )

    @override
    def setup(self, stage: str) -> None:
        # After the callbacks' setup (Lightning's order), so after pruning reshaped the model.
        if stage == "fit" and isinstance(self.criterion, DistillationLoss) and self.criterion.wants_hidden:
            norm = decoder_parts(self.model)[2][0]
            self._hidden_hook = norm.register_forward_hook(self._keep_student_hidden)

    @override
    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._hidden_hook is not None:
            self._hidden_hook.remove()
            self._hidden_hook, self._student_hidden = None, None

    def _keep_student_hidden(self, _module, _inputs, output: torch.Tensor) -> None:
        self._student_hidden = output

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        bs = batch["labels"].shape[0]
        self.log("val/loss", self.loss(logits, batch), prog_bar=True, batch_size=bs, sync_dist=True)
        self.val_metrics.update(logits, batch["labels"])
        self.log_dict(self.val_metrics, prog_bar=True, batch_size=bs)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_metrics["acc"].compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        bs = batch["labels"].shape[0]
        self.log("test/loss", self.loss(logits, batch), batch_size=bs, sync_dist=True)
        self.test_metrics.update(logits, batch["labels"])
        self.log_dict(self.test_metrics, batch_size=bs)
        self.confusion.update(logits.argmax(-1), batch["labels"])

    def on_test_epoch_start(self) -> None:
        self.confusion.reset()

    def on_test_epoch_end(self) -> None:
        # compute() is a collective under DDP, so every rank calls it here; rank 0's plot
        # (report.log_confusion_matrix, rank-zero only) then reads the cached result.
        self.confusion.compute()

    def on_train_start(self) -> None:
        # After the fine-tuning callbacks froze what they freeze (they act in `setup`).
        trainable, total = self.trainable_parameters(), sum(p.numel() for p in self.model.parameters())
        rank_zero_info(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.1f}%)")
        self.log("train/trainable_params", float(trainable), rank_zero_only=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The model's own config (as trained: pruned, distilled), its tokenizer and the LoRA
        # settings: a checkpoint is rebuilt from these, never from the run's config, which can
        # name remote code or a hub id (llm_lightning/models/saved.py).
        checkpoint[SAVED_MODEL_KEY] = checkpoint_entry(self.model, self.tokenizer)

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints written while the distillation callback set the projection on the module
        # as `distill_hidden` (before issue 20) resume into the criterion that now holds it.
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(OLD_PROJECTION_KEY)]:
            state["criterion.hidden." + key.removeprefix(OLD_PROJECTION_KEY)] = state.pop(key)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _use_fused(self) -> bool:
        # fp16 AMP unscales gradients through the optimizer; Lightning only does that for unfused ones.
        return bool(self.optimizer_cfg.get("fused", True)) and self.trainer.precision != "16-mixed"

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning refuses to clip for fused optimizers, fearing scaled fp16 gradients; with no
        GradScaler (fp32, bf16) the gradients are true values, so clip them directly."""
        if (
            gradient_clip_val
            and getattr(optimizer, "defaults", {}).get("fused")
            and gradient_clip_algorithm != "value"
        ):
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        cfg = self.optimizer_cfg
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:  # gradual unfreezing adds the rest as new param groups later
                (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": cfg["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            groups,
            lr=cfg["lr"],
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            eps=cfg.get("eps", 1e-8),
            fused=self._use_fused(),
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(self.scheduler_cfg.get("warmup_ratio", 0.0) * total)
        scheduler = get_scheduler(
            self.scheduler_cfg["name"], optimizer, num_warmup_steps=warmup, num_training_steps=total
        )
        self._add_criterion_parameters(optimizer, scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _add_criterion_parameters(self, optimizer: torch.optim.Optimizer, scheduler) -> None:
        """The loss's own parameters (the hidden-state projection) as a last group, without weight
        decay, under the model's LR schedule: the configured LR as its base, scaled step by step
        like the model's groups.

        The group joins after the scheduler set the first step's LR, so it starts from that LR (0
        with warmup) and keeps the model's base LR as its own (`initial_lr`). Until 2026-12-02 it took
        the first step's LR as its base: with warmup that was 0, and the projection never trained.
        """
        params = [p for p in self.criterion.parameters() if p.requires_grad]
        if not params:
            return
        first = optimizer.param_groups[0]
        optimizer.add_param_group(
            {"params": params, "weight_decay": 0.0, "lr": first["lr"], "initial_lr": first["initial_lr"]}
        )
        # LambdaLR keeps one base LR and one lambda per group: give the new group the others'.
        scheduler.base_lrs.append(first["initial_lr"])
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
