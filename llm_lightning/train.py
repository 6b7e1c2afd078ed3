"""Fine-tune, test and export a sequence classifier.

    python -m llm_lightning.train task=sentiment
    python -m llm_lightning.train -m optimizer.lr=1e-5,3e-5 finetune=freeze,lora

`train(cfg)` does the work and is what tests call; `main` is the thin Hydra entry point.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from llm_lightning.artifacts import BEST_VALIDATION, METRICS_FILE, resolve_ckpt_path, write_json
from llm_lightning.callbacks import TokenThroughput, finetune_callbacks, stage_callbacks
from llm_lightning.data import ClassificationDataModule, load_task
from llm_lightning.data.provenance import PROVENANCE_FILE, check_split, provenance, write_provenance
from llm_lightning.errors import UserError
from llm_lightning.measure.run_report import log_confusion_matrix, log_final_hparams, print_summary
from llm_lightning.models import load_classifier
from llm_lightning.models.export import export_model
from llm_lightning.module import SequenceClassifier
from llm_lightning.runtime import apply_runtime, resolved_precision, run_entry, user_errors

log = logging.getLogger(__name__)


def build_classifier(cfg: DictConfig, label_names):
    """The model to train and its tokenizer: the `model=` source, or under `distill=kd` the
    student, then with what loading its teacher told (a `TeacherRef`; None without distillation)."""
    if cfg.get("distill") and cfg.distill.method != "none":
        from llm_lightning.distill.student import build_student

        student = build_student(cfg, label_names)
        return student.model, student.tokenizer, student.teacher
    return (*load_classifier(cfg.model, label_names), None)


def build_criterion(cfg: DictConfig, model, teacher):
    """The loss the module trains with: under `distill=kd` a `DistillationLoss`, its hidden-state
    projection sized from the student's and teacher's widths; else None (cross-entropy)."""
    if teacher is None:
        return None
    from llm_lightning.distill.losses import DistillationLoss, KDSettings

    settings = KDSettings.from_config(cfg.distill)
    cache = "on" if cfg.distill.cache.enabled else "off"
    print(f"Distilling from {teacher.spec}: {settings}, cache={cache}", flush=True)
    return DistillationLoss(settings, model.config.hidden_size, teacher.hidden_size)


def with_transfer_set(cfg: DictConfig, data):
    """`data`, plus the unlabeled texts of `distill.transfer` when distillation asks for them."""
    transfer = cfg.distill.get("transfer") if cfg.get("distill") and cfg.distill.method != "none" else None
    if not (transfer and transfer.source):
        return data
    from llm_lightning.data.transfer import with_transfer_set as append_transfer

    if float(cfg.distill.alpha) == 0 and not cfg.distill.get("alpha_schedule"):
        raise UserError(
            f"distill.transfer.source={transfer.source} adds unlabeled texts, but distill.alpha=0 "
            "gives them no loss (only the KD term learns from them). Set distill.alpha > 0, or "
            "distill.transfer.source=null."
        )
    labeled = len(data.train)
    data = append_transfer(data, transfer, cfg.seed)
    print(f"Transfer set ({transfer.source}): {len(data.train) - labeled:,} unlabeled texts", flush=True)
    return data


def check_teacher_split(cfg: DictConfig, data) -> None:
    """A teacher trained on other splits may have learnt this run's val/test texts, and the
    student would inherit that: its teacher is checked like a model about to be scored."""
    teacher = cfg.distill.get("teacher") if cfg.get("distill") and cfg.distill.method != "none" else None
    if isinstance(teacher, str) and Path(teacher).expanduser().exists():
        check_split(teacher, cfg.task, cfg.seed, data, allow=bool(cfg.get("allow_split_mismatch")))


def build(cfg: DictConfig):
    """Everything `trainer.fit` needs, from the composed config."""
    data = load_task(cfg.task, cfg.seed)
    check_teacher_split(cfg, data)
    data = with_transfer_set(cfg, data)
    log.info("Data: %s", data.sizes())
    print(f"Data ({cfg.task.name}): {data.sizes()}", flush=True)
    model, tokenizer, teacher = build_classifier(cfg, data.label_names)
    if cfg.finetune.method == "lora":
        from llm_lightning.models.lora import add_lora

        model = add_lora(model, cfg.finetune)
    # After LoRA: its adapters draw from the RNG before the hidden-state projection does, as when
    # the distillation callback made the projection in `setup`, so both start from the same weights.
    criterion = build_criterion(cfg, model, teacher)
    module = SequenceClassifier(
        model, data.label_names, cfg.optimizer, cfg.scheduler, tokenizer=tokenizer, criterion=criterion
    )
    datamodule = ClassificationDataModule(
        data,
        tokenizer,
        cfg.task.max_length,
        cfg.batch_size,
        cfg.eval_batch_size,
        cfg.seed,
        group_by_length=cfg.group_by_length,
    )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    stages = stage_callbacks(cfg, teacher)
    # Structured/depth pruning reshape the layer stack in `setup`: run them before freezing counts layers.
    first = [c for c in stages if getattr(c, "reshapes_model", False)]
    callbacks += first + finetune_callbacks(cfg.finetune) + [c for c in stages if c not in first]
    return module, datamodule, tokenizer, callbacks


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit, test the best checkpoint, export `model/`, write `metrics.json`. Returns (metrics, objects)."""
    out = Path(cfg.output_dir)
    apply_runtime(cfg.runtime)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("quantize") and cfg.quantize.method != "none":  # quantized after training: check now
        from llm_lightning.quantization.settings import check_settings

        check_settings(cfg.quantize)
    module, datamodule, tokenizer, callbacks = build(cfg)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    precision = resolved_precision(cfg.trainer.precision)
    if str(cfg.trainer.precision) == "auto":
        print(f"Precision (auto): {precision}", flush=True)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=precision
    )
    training = training_record(cfg, datamodule.data)
    _save_config(cfg, out, training)

    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
    train_seconds = time.perf_counter() - started
    if trainer.interrupted:
        raise KeyboardInterrupt("Training was interrupted; resume with ckpt_path=last.")

    metrics = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if v.numel() == 1 and not k.startswith("lr-") and not k.endswith("_step")
    }
    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    if cfg.get("test"):
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
        metrics.update({k: float(v) for k, v in results[0].items()})
        log_confusion_matrix(trainer, module, out)
    throughput = next((c for c in callbacks if isinstance(c, TokenThroughput)), None)
    if throughput is not None and throughput.tokens_per_s:
        metrics["train/tokens_per_s"] = throughput.tokens_per_s
    metrics.update(
        {
            "train/seconds": train_seconds,
            "train/trainable_params": float(module.trainable_parameters()),
            "train/total_params": float(sum(p.numel() for p in module.model.parameters())),
            "best_checkpoint": best,
        }
    )
    _finish(cfg, trainer, module, tokenizer, metrics, out, training)
    if cfg.get("quantize") and cfg.quantize.method != "none" and trainer.is_global_zero:
        from llm_lightning.quantize import quantize_run

        metrics.update(quantize_run(cfg, out))
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule, "tokenizer": tokenizer}


def training_record(cfg: DictConfig, data) -> dict:
    """What the model is trained against (training.json, llm_lightning.data.provenance)."""
    transfer = cfg.distill.get("transfer") if cfg.get("distill") and cfg.distill.method != "none" else None
    settings = OmegaConf.to_container(transfer, resolve=True) if transfer and transfer.source else None
    return provenance(cfg.task, cfg.seed, data, transfer=settings)


@rank_zero_only
def _save_config(cfg: DictConfig, out: Path, training: dict) -> None:
    """The composed config, also when train() is called without Hydra (tests, notebooks), and the
    data record beside it, which a checkpoint of this run is checked against."""
    hydra_dir = out / ".hydra"
    if not (hydra_dir / "config.yaml").exists():
        hydra_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, hydra_dir / "config.yaml", resolve=False)
    write_provenance(out, training)


@rank_zero_only
def _finish(cfg, trainer, module, tokenizer, metrics: dict, out: Path, training: dict) -> None:
    if cfg.get("export") and not trainer.fast_dev_run:
        export_model(module.model, tokenizer, out / "model", {PROVENANCE_FILE: training})
    write_json(out / METRICS_FILE, metrics)
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            log_final_hparams(lg, cfg, metrics, trainer.global_step)
    print_summary(cfg, out, metrics)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@user_errors
def main(cfg: DictConfig) -> float | None:
    from llm_lightning.runtime.ddp import shared_config, use_child_command

    use_child_command()  # DDP ranks rerun this job's overrides in its directory, never the whole sweep
    metrics, _ = train(shared_config(cfg))  # one resolved config (run dir, ${now:}) for every rank
    # Returned for Hydra sweepers (Optuna) to optimise.
    return metrics.get(cfg.get("optimized_metric", BEST_VALIDATION))


if __name__ == "__main__":
    run_entry(main)
