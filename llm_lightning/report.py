"""Measure a run's exported stages again and rewrite its report.

    python -m llm_lightning.report run_dir=outputs/sentiment/<date>/<time>
    python -m llm_lightning.report run_dir=outputs/sentiment/<date>/<time> require_speedup=true

The run's model/ (fp32) and quantized/ folders are measured the same way, on the run's test split,
with the run's own task, seed and bench settings; report.json, report.md, pareto.png and
tensorboard/report are written into the run directory (llm_lightning.measure.stage_report).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from llm_lightning.measure.stage_report import report_for_run
from llm_lightning.runtime import run_entry, user_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
@user_errors
def main(cfg: DictConfig) -> None:
    report_for_run(Path(cfg.run_dir), require_speedup=bool(cfg.require_speedup))


if __name__ == "__main__":
    run_entry(main)
