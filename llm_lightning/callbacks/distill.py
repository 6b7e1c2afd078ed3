"""Knowledge distillation as a callback: a frozen teacher's soft labels added to the student's loss.

    python -m llm_lightning.train distill=kd distill.teacher=outputs/sentiment/<run>/model

    loss = alpha * T² * KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 - alpha) * CE
           + hidden_weight * MSE(proj(student pooled hidden), teacher pooled hidden)

The teacher's outputs come from `TeacherCache`: computed once per example before training, on
disk, reused by later epochs and runs. Once the cache is full the teacher is dropped from memory.
The callback reaches the module through the `extra_losses(logits, batch, ce)` hook of
`SequenceClassifier.training_step`, which logs each returned term as `train/<name>`.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from llm_lightning.callbacks.finetune import _extend_schedulers, decoder_parts
from llm_lightning.callbacks.kd_losses import HiddenStateLoss, KLDivergenceLoss, Schedule, pooled_last_token
from llm_lightning.callbacks.teacher_cache import TeacherCache, teacher_outputs
from llm_lightning.errors import UserError

METHODS = ("none", "kd")


def distillation_callbacks(cfg: DictConfig) -> list[Callback]:
    """The callbacks for `distill=<method>` (train.py's `stage_callbacks` calls this)."""
    d = cfg.distill
    if d.method not in METHODS:
        raise UserError(f"distill.method={d.method!r} is not one of {METHODS} (config group `distill=`).")
    if d.method == "none":
        return []
    return [
        KnowledgeDistillation(
            teacher=d.teacher,
            task=cfg.task.name,
            temperature=d.temperature,
            alpha=d.alpha,
            temperature_schedule=_plain(d.get("temperature_schedule")),
            alpha_schedule=_plain(d.get("alpha_schedule")),
            hidden_weight=d.get("hidden_weight", 0.0),
            use_cache=d.cache.enabled,
            cache_dir=d.cache.get("dir"),
            fill_batch_size=d.cache.get("batch_size") or cfg.eval_batch_size,
            teacher_sha256=d.get("teacher_sha256"),
            teacher_params=d.get("teacher_params"),
            attn_implementation=cfg.model.get("attn_implementation"),
        )
    ]


class KnowledgeDistillation(Callback):
    """Adds the KD (and optional hidden-state) terms to the student's loss.

    Args:
        teacher: what `load_teacher` takes: a `model/` folder, a `.ckpt`, or a model source mapping.
        task: task name, part of the cache key.
        temperature, alpha: T > 0 and the KD weight in [0, 1]; the CE weight is 1 - alpha.
        temperature_schedule, alpha_schedule: optional `{end, shape}` to move T or alpha from its
            value to `end` over training (shape linear or cosine).
        hidden_weight: weight of the pooled hidden-state MSE; 0 turns the term off.
        use_cache: read teacher outputs from disk (filled once); False runs the teacher every step.
        cache_dir: cache root, default `$LLM_LIGHTNING_CACHE/teacher_logits`.
        fill_batch_size: batch size of the one-off teacher pass.
        teacher_sha256: the teacher's weights hash if known (build_student records it), which
            spares loading the teacher when the cache is already full.
        teacher_params: its parameter count, reported beside the student's.
        attn_implementation: attention kernel for a saved teacher (eager is faster on CPU).
    """

    def __init__(
        self,
        teacher: Any,
        task: str,
        temperature: float = 2.0,
        alpha: float = 0.5,
        temperature_schedule: dict | None = None,
        alpha_schedule: dict | None = None,
        hidden_weight: float = 0.0,
        use_cache: bool = True,
        cache_dir: str | None = None,
        fill_batch_size: int = 32,
        teacher_sha256: str | None = None,
        teacher_params: int | None = None,
        attn_implementation: str | None = None,
    ):
        problems = []
        if not temperature > 0:
            problems.append(f"distill.temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            problems.append(f"distill.alpha must be in [0, 1], got {alpha}")
        if hidden_weight < 0:
            problems.append(f"distill.hidden_weight must be >= 0, got {hidden_weight}")
        if problems:
            raise UserError("; ".join(problems) + ".")
        self.teacher_spec, self.task = teacher, task
        self.temperature = Schedule(float(temperature), **(temperature_schedule or {}))
        self.alpha = Schedule(float(alpha), **(alpha_schedule or {}))
        if self.alpha.end is not None and not 0.0 <= self.alpha.end <= 1.0:
            raise UserError(f"distill.alpha_schedule.end must be in [0, 1], got {self.alpha.end}.")
        if self.temperature.end is not None and not self.temperature.end > 0:
            raise UserError(f"distill.temperature_schedule.end must be > 0, got {self.temperature.end}.")
        self.hidden_weight, self.use_cache = float(hidden_weight), bool(use_cache)
        self.cache_dir, self.fill_batch_size, self.teacher_sha256 = (
            cache_dir,
            int(fill_batch_size),
            teacher_sha256,
        )
        self.kd_loss = KLDivergenceLoss()
        self.teacher: torch.nn.Module | None = None  # only while filling, or for use_cache=False
        self.outputs: dict[str, dict[str, torch.Tensor]] = {}  # split -> cached teacher outputs
        self.cache_fill_seconds = 0.0
        self.teacher_params, self.attn_implementation = teacher_params, attn_implementation
        self._module = None
        self._student_hidden: torch.Tensor | None = None
        self._hook = None

    # ---- setup: teacher outputs for train and test, the hidden-state projection, the hook ----

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        splits = ["train", "test"] if stage == "fit" else ["test"] if stage == "test" else []
        if splits:
            self._prepare_outputs(trainer, pl_module, splits)
        if stage != "fit":
            return
        if self.hidden_weight > 0 and not hasattr(pl_module, "distill_hidden"):
            student_width = pl_module.model.config.hidden_size
            teacher_width = (
                self.outputs["train"]["hidden"].shape[-1]
                if self.use_cache
                else self.teacher.config.hidden_size
            )
            # On the module, so it is checkpointed and moved with it; on_fit_start gives it to the optimizer.
            pl_module.distill_hidden = HiddenStateLoss(student_width, teacher_width)
        if self.hidden_weight > 0:
            norm = decoder_parts(pl_module.model)[2][0]
            self._hook = norm.register_forward_hook(self._keep_student_hidden)
        pl_module.extra_losses = self.extra_losses
        self._module = pl_module
        print(
            f"Distilling from {self.teacher_spec}: T={self.temperature}, alpha={self.alpha}, "
            f"hidden_weight={self.hidden_weight}, cache={'on' if self.use_cache else 'off'}",
            flush=True,
        )

    def _prepare_outputs(self, trainer, pl_module, splits: list[str]) -> None:
        dm = trainer.datamodule
        needed = [s for s in splits if s not in self.outputs]
        if not needed or (not self.use_cache and self.teacher is not None):
            return
        if self.teacher_sha256 is None or not self.use_cache:
            self._load_teacher(dm.label_names)
        if not self.use_cache:
            self.teacher.to(trainer.strategy.root_device)
            return
        cache = TeacherCache(
            Path(self.cache_dir) if self.cache_dir else _default_cache_root(),
            self.teacher_sha256,
            self.task,
            dm.max_length,
            str(trainer.precision),
            with_hidden=self.hidden_weight > 0,
        )
        for split in needed:
            ids = dm.splits[split].input_ids
            entry = cache.load(split, ids)
            if entry is None:
                if self.teacher is None:
                    self._load_teacher(dm.label_names)
                self.teacher.to(trainer.strategy.root_device)
                started = time.perf_counter()
                entry = cache.fill(
                    self.teacher,
                    split,
                    ids,
                    dm.tokenizer.pad_token_id,
                    self.fill_batch_size,
                    trainer.precision_plugin.forward_context,
                    trainer.strategy.root_device,
                    log=lambda msg: print(msg, flush=True),
                )
                self.cache_fill_seconds += time.perf_counter() - started
            else:
                print(
                    f"Teacher outputs [{self.task}/{split}]: read from {cache.path(split, ids)}", flush=True
                )
            if entry["logits"].shape[-1] != len(dm.label_names):
                raise UserError(
                    f"The teacher has {entry['logits'].shape[-1]} outputs but the task has "
                    f"{len(dm.label_names)} labels {dm.label_names}; use a teacher for this task."
                )
            self.outputs[split] = entry
        self.teacher = None  # the cache has every example: free the teacher's memory
        gc.collect()

    def _load_teacher(self, label_names: list[str]) -> None:
        from llm_lightning.models.student import load_teacher, weights_sha256

        self.teacher, _ = load_teacher(self.teacher_spec, label_names, self.attn_implementation)
        self.teacher_params = sum(p.numel() for p in self.teacher.parameters())
        sha = weights_sha256(self.teacher)
        if self.teacher_sha256 not in (None, sha):
            raise UserError(
                f"The teacher at {self.teacher_spec} changed since the student was built "
                f"(weights sha256 {sha[:12]}, expected {self.teacher_sha256[:12]})."
            )
        self.teacher_sha256 = sha

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        proj = getattr(pl_module, "distill_hidden", None)
        params = [p for p in proj.parameters() if p.requires_grad] if proj is not None else []
        if params and trainer.optimizers:
            optimizer = trainer.optimizers[0]
            optimizer.add_param_group(
                {"params": params, "weight_decay": 0.0, "lr": optimizer.param_groups[0]["lr"]}
            )
            _extend_schedulers(trainer, optimizer)

    @override
    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if getattr(pl_module, "extra_losses", None) == self.extra_losses:
            del pl_module.extra_losses

    # ---- the loss ----

    def _keep_student_hidden(self, _module, _inputs, output: torch.Tensor) -> None:
        self._student_hidden = output

    def teacher_batch(self, split: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher logits (batch, num_labels) and pooled hidden (batch, width) or None, for `batch`."""
        if self.use_cache:
            entry = self.outputs[split]
            index = batch["index"].cpu()
            device = batch["input_ids"].device
            hidden = entry["hidden"][index].to(device) if "hidden" in entry else None
            return entry["logits"][index].to(device), hidden
        return teacher_outputs(
            self.teacher, batch["input_ids"], batch["attention_mask"], self.hidden_weight > 0
        )

    def extra_losses(self, logits: torch.Tensor, batch: dict, ce: torch.Tensor) -> dict[str, torch.Tensor]:
        """`{"kd", "ce", ["hidden"], "loss"}` for one training batch; "loss" is the total."""
        pl_module = self._module
        trainer = pl_module._trainer if pl_module is not None else None
        progress = (
            trainer.global_step / max(1, trainer.estimated_stepping_batches) if trainer is not None else 0.0
        )
        temperature, alpha = self.temperature(progress), self.alpha(progress)
        teacher_logits, teacher_hidden = self.teacher_batch("train", batch)
        kd = self.kd_loss(logits, teacher_logits, temperature)
        terms = {"kd": kd, "ce": ce}
        total = alpha * kd + (1 - alpha) * ce
        if self.hidden_weight > 0:
            student = pooled_last_token(
                self._student_hidden, batch["input_ids"], pl_module.model.config.pad_token_id
            )
            terms["hidden"] = pl_module.distill_hidden(student, teacher_hidden)
            total = total + self.hidden_weight * terms["hidden"]
        terms["loss"] = total
        if pl_module is not None and trainer is not None:
            pl_module.log_dict(
                {"distill/temperature": temperature, "distill/alpha": alpha}, on_step=True, on_epoch=False
            )
        return terms

    # ---- the teacher's test metrics, beside the student's ----

    @override
    def on_test_epoch_start(self, trainer, pl_module) -> None:
        n = len(trainer.datamodule.label_names)
        self._teacher_metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(n, average="micro"),
                "f1_macro": MulticlassF1Score(n, average="macro"),
            },
            prefix="teacher/test/",
        ).to(pl_module.device)

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if "test" in self.outputs or self.teacher is not None:
            logits, _ = self.teacher_batch("test", batch)
            self._teacher_metrics.update(logits, batch["labels"])

    @override
    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if "test" in self.outputs or self.teacher is not None:
            pl_module.log_dict(self._teacher_metrics.compute())
        if self.teacher_params:
            pl_module.log("teacher/params", float(self.teacher_params))
        if self.cache_fill_seconds:
            pl_module.log("distill/cache_fill_seconds", self.cache_fill_seconds)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"teacher_sha256": self.teacher_sha256}


def _default_cache_root() -> Path:
    from llm_lightning.models.smollm2 import cache_dir

    return cache_dir() / "teacher_logits"


def _plain(node) -> dict | None:
    if node is None:
        return None
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
