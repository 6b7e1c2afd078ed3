"""What a run shows: the confusion matrix, hparams next to the final metrics, and where it all is."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


@rank_zero_only
def log_confusion_matrix(trainer, module, out: Path) -> None:
    """Test-split confusion matrix: to TensorBoard (IMAGES tab) and confusion_matrix.png."""
    import matplotlib.pyplot as plt

    fig, ax = module.confusion.plot(labels=module.label_names)
    ax.set_title("Test confusion matrix (rows: true, columns: predicted)")
    if fig.get_layout_engine() is None:  # torchmetrics' figure may come laid out already
        fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "confusion_matrix.png", dpi=120)
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            lg.experiment.add_figure("test/confusion_matrix", fig, global_step=trainer.global_step)
    plt.close(fig)


def flat_hparams(cfg) -> dict:
    """The config as flat `a/b` keys with scalar values, for TensorBoard's HPARAMS tab."""
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}/" if not prefix else f"{prefix}{k}/")
        elif isinstance(node, list):
            flat[prefix.rstrip("/")] = str(node)
        elif node is None or isinstance(node, (int, float, str, bool)):
            flat[prefix.rstrip("/")] = "null" if node is None else node

    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    container.pop("hydra", None)
    for key in (
        "task",
        "model",
        "finetune",
        "optimizer",
        "scheduler",
        "trainer",
        "runtime",
        "distill",
        "prune",
        "quantize",
    ):
        if key in container:
            walk(container[key], f"{key}/")
    for key in ("seed", "batch_size", "group_by_length"):
        if key in container:
            flat[key] = container[key]
    return flat


def log_final_hparams(logger: TensorBoardLogger, cfg, metrics: dict, step: int) -> None:
    """hparams with the final metrics, so runs of a sweep compare in one HPARAMS table.

    Lightning's `log_hyperparams(params, metrics)` writes the metrics again at step 0, which puts
    a stray point at the start of every curve. Here, metrics not yet in TensorBoard (train time,
    parameter counts) are written at the last step, and the HPARAMS plugin, which shows each
    metric's latest value, gets the config alone.
    """
    from torch.utils.tensorboard.summary import hparams

    final = {k: v for k, v in metrics.items() if isinstance(v, float) and "/" in k}
    params = flat_hparams(cfg)
    logger.log_metrics({k: v for k, v in final.items() if k not in _logged_tags(logger)}, step=step)
    writer = logger.experiment._get_file_writer()  # as Lightning's own log_hyperparams does
    for summary in hparams(params, {k: 0.0 for k in final}):  # values come from the scalars
        writer.add_summary(summary)
    logger.log_hyperparams(params)  # hparams.yaml beside the events
    logger.save()


def _logged_tags(logger: TensorBoardLogger) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 1})
    # its directory watcher logs every event file it passes at INFO, dozens of lines under
    # Hydra's root INFO level at the end of every run
    tb_log = logging.getLogger("tensorboard")
    level = tb_log.level
    tb_log.setLevel(logging.WARNING)
    try:
        acc.Reload()
    finally:
        tb_log.setLevel(level)
    return set(acc.Tags().get("scalars", []))


def print_summary(cfg, out: Path, metrics: dict) -> None:
    def fmt(key: str) -> str:
        v = metrics.get(key)
        return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    lines = [
        "",
        f"test/acc {fmt('test/acc')}  test/f1_macro {fmt('test/f1_macro')}  val/acc_best {fmt('val/acc_best')}  "
        f"train/tokens_per_s {fmt('train/tokens_per_s')}  train time {fmt('train/seconds')} s",
        f"Run directory:   {out}",
        f"  metrics:       {out / 'metrics.json'}",
        f"  model:         {out / 'model'}  (transformers.AutoModelForSequenceClassification.from_pretrained)",
        f"  checkpoints:   {out / 'checkpoints'}",
        f"  config:        {out / '.hydra' / 'config.yaml'}",
        f"  confusion:     {out / 'confusion_matrix.png'}",
        f"TensorBoard:     tensorboard --logdir {out}",
    ]
    print("\n".join(lines), flush=True)
