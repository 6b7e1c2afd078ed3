"""Knowledge distillation, the Lightning side: the teacher's outputs travel with each training batch.

    python -m llm_lightning.train distill=kd distill.teacher=outputs/sentiment/<run>/model

The loss is not here: the module is given a `DistillationLoss` (llm_lightning/distill/losses.py)
and reads the teacher's outputs from the batch. This callback puts them there
(`batch["teacher_logits"]`, and `batch["teacher_hidden"]` for the hidden-state term) in
`on_train_batch_start`: from `TeacherCache`, computed once per example before training, on disk,
reused by later epochs and runs (the teacher then leaves memory), or from the teacher itself
when the cache is off. It also scores the teacher on the test split, beside the student.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from llm_lightning.distill.losses import KDSettings
from llm_lightning.distill.student import TeacherRef, load_teacher, weights_sha256
from llm_lightning.distill.teacher_cache import TeacherCache, teacher_outputs
from llm_lightning.errors import UserError

METHODS = ("none", "kd")


@dataclass(frozen=True)
class CacheSettings:
    """`distill.cache`: read the teacher's outputs from disk (filled once) or run it every step.

    `dir`: cache root, default `$LLM_LIGHTNING_CACHE/teacher_logits`; `batch_size`: of the
    one-off teacher pass.
    """

    enabled: bool = True
    dir: str | None = None
    batch_size: int = 32


def distillation_callbacks(cfg: DictConfig, teacher: TeacherRef | None = None) -> list[Callback]:
    """The callbacks for `distill=<method>`. `teacher`: what `build_student` found; None (when
    only checking the settings, as compress does before anything trains) loads and hashes it."""
    d = cfg.distill
    if d.method not in METHODS:
        raise UserError(f"distill.method={d.method!r} is not one of {METHODS} (config group `distill=`).")
    if d.method == "none":
        return []
    settings = KDSettings.from_config(d)  # checked here too: compress checks stages through this
    cache = CacheSettings(
        bool(d.cache.enabled), d.cache.get("dir"), int(d.cache.get("batch_size") or cfg.eval_batch_size)
    )
    if teacher is None:
        teacher = TeacherRef(d.teacher, attn_implementation=cfg.model.get("attn_implementation"))
    return [KnowledgeDistillation(teacher, cfg.task.name, cache, with_hidden=settings.hidden_weight > 0)]


class KnowledgeDistillation(Callback):
    """The teacher's outputs for each training batch, and the teacher's test metrics.

    Args:
        teacher: which teacher (`TeacherRef`); its `sha256`, when known, spares loading it when
            the cache already holds this split.
        task: task name, part of the cache key.
        cache: `CacheSettings`; disabled, the teacher stays in memory and runs every step.
        with_hidden: also give the pooled hidden states (`distill.hidden_weight > 0`).
    """

    def __init__(
        self, teacher: TeacherRef, task: str, cache: CacheSettings | None = None, with_hidden: bool = False
    ):
        self.ref, self.task = teacher, task
        self.cache = cache if cache is not None else CacheSettings()
        self.with_hidden = bool(with_hidden)
        self.teacher: torch.nn.Module | None = None  # only while filling, or with the cache off
        self.outputs: dict[str, dict[str, torch.Tensor]] = {}  # split -> cached teacher outputs
        self.cache_fill_seconds = 0.0
        self._teacher_metrics: MetricCollection | None = None

    # ---- setup: the teacher's outputs for train and test ----

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        splits = ["train", "test"] if stage == "fit" else ["test"] if stage == "test" else []
        if splits:
            self._prepare_outputs(trainer, splits)

    def _prepare_outputs(self, trainer, splits: list[str]) -> None:
        dm = trainer.datamodule
        needed = [s for s in splits if s not in self.outputs]
        if not needed or (not self.cache.enabled and self.teacher is not None):
            return
        if self.ref.sha256 is None or not self.cache.enabled:
            self._load_teacher(dm.label_names)
        if not self.cache.enabled:
            self.teacher.to(trainer.strategy.root_device)
            return
        cache = TeacherCache(
            Path(self.cache.dir) if self.cache.dir else _default_cache_root(),
            self.ref.sha256,
            self.task,
            dm.max_length,
            str(trainer.precision),
            with_hidden=self.with_hidden,
        )
        for split in needed:
            self.outputs[split] = self._cached(trainer, cache, split)
        self.teacher = None  # the cache has every example: free the teacher's memory
        gc.collect()

    def _cached(self, trainer, cache: TeacherCache, split: str) -> dict[str, torch.Tensor]:
        """One split's teacher outputs: read from the cache, or computed now and written to it."""
        dm = trainer.datamodule
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
                self.cache.batch_size,
                trainer.precision_plugin.forward_context,
                trainer.strategy.root_device,
                log=lambda msg: print(msg, flush=True),
            )
            self.cache_fill_seconds += time.perf_counter() - started
        else:
            print(f"Teacher outputs [{self.task}/{split}]: read from {cache.path(split, ids)}", flush=True)
        if entry["logits"].shape[-1] != len(dm.label_names):
            raise UserError(
                f"The teacher has {entry['logits'].shape[-1]} outputs but the task has "
                f"{len(dm.label_names)} labels {dm.label_names}; use a teacher for this task."
            )
        return entry

    def _load_teacher(self, label_names: list[str]) -> None:
        self.teacher, _ = load_teacher(self.ref.spec, label_names, self.ref.attn_implementation)
        sha = weights_sha256(self.teacher)
        if self.ref.sha256 not in (None, sha):
            raise UserError(
                f"The teacher at {self.ref.spec} changed since the student was built "
                f"(weights sha256 {sha[:12]}, expected {self.ref.sha256[:12]})."
            )
        params = sum(p.numel() for p in self.teacher.parameters())
        self.ref = dataclasses.replace(self.ref, sha256=sha, params=params)

    # ---- the teacher's outputs, with the batch ----

    def teacher_batch(self, split: str, batch: dict) -> dict[str, torch.Tensor]:
        """`{"teacher_logits": (batch, num_labels)[, "teacher_hidden": (batch, width)]}` for `batch`."""
        if self.cache.enabled:
            entry = self.outputs[split]
            index = batch["index"].cpu()
            device = batch["input_ids"].device
            found = {"teacher_logits": entry["logits"][index].to(device)}
            if "hidden" in entry:
                found["teacher_hidden"] = entry["hidden"][index].to(device)
            return found
        logits, hidden = teacher_outputs(
            self.teacher, batch["input_ids"], batch["attention_mask"], self.with_hidden
        )
        return {"teacher_logits": logits} | ({"teacher_hidden": hidden} if hidden is not None else {})

    @override
    def on_train_batch_start(self, trainer, pl_module, batch: dict, batch_idx: int) -> None:
        # The batch Lightning passes on to `training_step`. The teacher runs under the same
        # autocast as the student's step (the precision plugin's), as it did inside the loss.
        with trainer.precision_plugin.forward_context():
            batch.update(self.teacher_batch("train", batch))

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
            self._teacher_metrics.update(self.teacher_batch("test", batch)["teacher_logits"], batch["labels"])

    @override
    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if "test" in self.outputs or self.teacher is not None:
            pl_module.log_dict(self._teacher_metrics.compute())
        if self.ref.params:
            pl_module.log("teacher/params", float(self.ref.params))
        if self.cache_fill_seconds:
            pl_module.log("distill/cache_fill_seconds", self.cache_fill_seconds)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"teacher_sha256": self.ref.sha256}


def _default_cache_root() -> Path:
    from llm_lightning.models.smollm2 import cache_dir

    return cache_dir() / "teacher_logits"
