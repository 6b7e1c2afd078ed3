"""A finished `train` run taken in as a compress stage (`reuse: {teacher: <run folder>}`).

A user who ran `make train` has the chain's teacher already: the same composed config, written
elsewhere. Retraining it costs the chain's first 15-30 minutes on 2 cores. A run is taken in only
when its settings are the stage's own, compared as the stage's record compares them (chain.record:
everything but where it writes and how it is watched), with `output_dir` set to the stage's folder
first, so the paths derived from it match. Otherwise it is a UserError naming the settings that
differ: a model trained another way is not this chain's stage, whatever its folder is called.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from llm_lightning.chain.record import RECORD, Fingerprint, changes, settings_of
from llm_lightning.errors import MissingFileError, UserError

RUN_CONFIG = Path(".hydra") / "config.yaml"  # where `train` (Hydra) keeps a run's composed config
MODEL_FILE = Path("model") / "config.json"  # written by the export, the last thing a run does


def check_reused(
    reuse: DictConfig | None, stages: list[str], inputs: dict[str, list[str]]
) -> dict[str, Path]:
    """`reuse` (stage -> run folder) checked against the chain's stages: each a stage, each folder a
    finished train run. Only a stage that reads no earlier stage can be taken in: the others' runs
    would have read models this chain has not made yet."""
    runs: dict[str, Path] = {}
    if reuse is not None and not hasattr(reuse, "items"):
        raise UserError(
            f"compress: reuse={reuse!r} must map a stage to a run folder, e.g. reuse.teacher=<run folder>."
        )
    for stage, folder in (reuse or {}).items():
        if folder is None:
            continue  # the stage is the chain's to train
        where = f"compress: reuse.{stage}={folder}"
        if stage not in stages:
            raise UserError(
                f"{where}: {stage!r} is not a stage of this chain; its stages: {', '.join(stages)}."
            )
        if inputs[stage]:
            raise UserError(
                f"{where}: stage {stage!r} reads {', '.join(inputs[stage])}, made by this chain; only a "
                f"stage that reads no earlier stage can be taken from another run (e.g. teacher)."
            )
        run = Path(str(folder)).expanduser()
        for needed in (RUN_CONFIG, MODEL_FILE):
            if not (run / needed).is_file():
                raise MissingFileError(
                    f"{where}: no {needed} there; give the folder of a finished `train` run "
                    "(e.g. outputs/sentiment/<date>/<time>, which holds .hydra/ and model/)."
                )
        runs[stage] = run
    return runs


def check_same_settings(
    run: Path, stage: str, stage_folder: Path, fingerprint: Fingerprint, out: Path
) -> None:
    """The run's composed config, had it written into `stage_folder`, has the stage's settings."""
    cfg = OmegaConf.load(run / RUN_CONFIG)
    with open_dict(cfg):  # a copy read from disk: where the stage writes, so derived paths compare
        cfg.output_dir = str(stage_folder)
    ran = settings_of(cfg, out)
    if ran != fingerprint.settings:
        differ = changes({"settings": ran}, fingerprint, shown=8)
        raise UserError(
            f"compress: reuse.{stage}={run} was trained with other settings than stage {stage!r} "
            f"(the run's -> the stage's): {differ}. Train it with the stage's settings, or drop reuse.{stage}."
        )


def take_in(run: Path, stage_folder: Path) -> None:
    """The run's files under `stage_folder`, hard-linked where the file system allows (no second copy
    of the weights), copied where not; the run's own folder is left as it was."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    scratch = stage_folder.with_name(stage_folder.name + ".taking")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(run, scratch, copy_function=link_or_copy, ignore=shutil.ignore_patterns(RECORD))
    os.replace(scratch, stage_folder)  # whole or not at all: an interrupted copy leaves no stage behind
