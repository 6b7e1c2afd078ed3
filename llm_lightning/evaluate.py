"""Evaluate a saved model (a run's `model/` folder or a checkpoint) on a task's test split.

    python -m llm_lightning.evaluate model_path=outputs/sentiment/<date>/<time>/model task=sentiment

Writes `metrics.json` (test/acc, test/f1_macro, test/loss) and the confusion matrix into the run dir.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from llm_lightning.artifacts import write_json
from llm_lightning.data import ClassificationDataModule, load_task
from llm_lightning.data.provenance import check_split
from llm_lightning.errors import UserError
from llm_lightning.measure.run_report import log_confusion_matrix
from llm_lightning.models.saved import load_saved
from llm_lightning.module import SequenceClassifier
from llm_lightning.runtime import apply_runtime, resolved_precision, run_entry, user_errors

SPLITS = ("test", "val")


def evaluate(cfg: DictConfig) -> dict:
    if cfg.split not in SPLITS:
        raise UserError(f"split={cfg.split!r} is not one of {SPLITS}.")
    apply_runtime(cfg.runtime)
    out = Path(cfg.output_dir)
    model, tokenizer, names = load_saved(cfg.model_path)
    data = load_task(cfg.task, cfg.seed)
    check_split(cfg.model_path, cfg.task, cfg.seed, data, allow=bool(cfg.get("allow_split_mismatch")))
    if list(data.label_names) != list(names):
        raise UserError(
            f"The model's labels {names} differ from the task's labels {data.label_names} "
            f"(task={cfg.task.name}); evaluate on the task the model was trained for, or set task.labels."
        )
    module = SequenceClassifier(
        model, names, {"lr": 0.0, "weight_decay": 0.0}, {"name": "constant_with_warmup"}
    )
    dm = ClassificationDataModule(
        data, tokenizer, cfg.task.max_length, cfg.eval_batch_size, cfg.eval_batch_size, cfg.seed
    )
    dm.setup()
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        precision=resolved_precision(cfg.trainer.precision),
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
    )
    loader = dm.eval_loader(cfg.split)
    results = trainer.test(module, dataloaders=loader)[0]
    metrics = {k.replace("test/", f"{cfg.split}/"): float(v) for k, v in results.items()}
    metrics["model_path"] = str(cfg.model_path)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    log_confusion_matrix(trainer, module, out)
    print(
        f"{cfg.split}/acc {metrics[f'{cfg.split}/acc']:.4f}  {cfg.split}/f1_macro "
        f"{metrics[f'{cfg.split}/f1_macro']:.4f}\nWrote {out / 'metrics.json'}",
        flush=True,
    )
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@user_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    run_entry(main)
