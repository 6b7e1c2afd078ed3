"""A sweep's summary: one row per job with its overrides and final metrics.

    python -m llm_lightning.train -m optimizer.lr=1e-5,3e-5 finetune=freeze,lora
    python -m llm_lightning.train -m hparams_search=sentiment_optuna      # Optuna, 20 trials

Hydra runs every job in `multirun/<date>/<time>/<job number>`; when the sweep ends, the
`SweepSummary` callback (registered under `hydra.callbacks` in conf/train.yaml) writes
`sweep.csv` there and prints a line per job. `tensorboard --logdir multirun/<date>/<time>` shows
all jobs together; its HPARAMS tab compares them (each run logs its config with its final metrics).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# Columns shown first, in this order; any other numeric metric a job wrote follows.
HEADLINE = ("val/acc_best", "val/acc", "test/acc", "test/f1_macro", "train/tokens_per_s", "train/seconds")


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder under `sweep_dir` (those with a `.hydra/overrides.yaml`), by job number."""
    rows = []
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        job = overrides_file.parent.parent
        row: dict[str, Any] = {"job": job.name, "overrides": " ".join(OmegaConf.load(overrides_file))}
        metrics_file = job / "metrics.json"
        if metrics_file.exists():
            metrics = json.loads(metrics_file.read_text())
            row["status"] = "done"
            row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        else:
            row["status"] = "failed"  # crashed or killed before writing metrics.json
        rows.append(row)
    return sorted(
        rows, key=lambda r: (not r["job"].isdigit(), int(r["job"]) if r["job"].isdigit() else r["job"])
    )


def write_summary(sweep_dir: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Write `<sweep_dir>/sweep.csv`; return its path and rows."""
    rows = job_rows(sweep_dir)
    seen = {k for r in rows for k in r}
    columns = ["job", "status", "overrides"] + [k for k in HEADLINE if k in seen]
    columns += sorted(seen - set(columns))
    path = sweep_dir / "sweep.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path, rows


def format_line(row: dict[str, Any], common: set[str] = frozenset()) -> str:
    """`job N [status]  metrics  | the overrides that set this job apart from the others`."""

    def fmt(v) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    metrics = "  ".join(f"{k} {fmt(row.get(k))}" for k in HEADLINE[:4])
    own = " ".join(o for o in row["overrides"].split() if o not in common)
    return f"job {row['job']:>3} [{row['status']}]  {metrics}  | {own or '(no overrides)'}"


class SweepSummary(Callback):
    """Hydra callback: after a multirun, `sweep.csv` and a printed line per job."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        path, rows = write_summary(sweep_dir)
        common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if len(rows) > 1 else set()
        lines = [
            "",
            f"Sweep: {len(rows)} jobs in {sweep_dir}",
            *(format_line(r, common) for r in rows),
            f"Summary:     {path}",
            f"TensorBoard: tensorboard --logdir {sweep_dir}  (HPARAMS tab compares jobs)",
        ]
        print("\n".join(lines), flush=True)
