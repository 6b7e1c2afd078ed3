"""What compress checks before its first stage trains: its keys, each stage's callbacks, task
and teacher, and the quantized stage's settings; each error names the stage (llm_lightning.compress).

Only what needs no model: a layer count, a `quantize.skip` pattern or a transfer set's size is
checked by the stage itself, when its model and data are loaded.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llm_lightning.errors import MissingFileError, UserError


def task_labels(task: DictConfig) -> tuple[str, list | None]:
    """A task's name and label names in order (their ids); None: found in the data at run time."""
    labels = task.get("label_names", task.get("labels"))
    return str(task.name), None if labels is None else list(labels)


def check_stage(cfg: DictConfig, stage: str, teacher: DictConfig, chain_models: set[str]) -> None:
    """What can be checked before any model exists: callbacks, task and labels, an outside teacher."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from llm_lightning.callbacks import finetune_callbacks, stage_callbacks

    try:
        # Building them checks their arguments (choices, ranges) in __init__; none needs a model.
        for callback in (cfg.get("callbacks") or {}).values():
            if callback and "_target_" in callback:
                instantiate(callback)
        stage_callbacks(cfg)
        finetune_callbacks(cfg.finetune)
    except (UserError, InstantiationException) as err:
        raise UserError(f"compress stage {stage!r}: {err}") from err
    # Every stage is scored on one test split and distillation matches logits class by class, so each
    # must learn the teacher's classes in the teacher's order. A teacher named `{name}` is an earlier
    # stage's model, trained on this same task, so its labels fit by construction; a teacher from
    # outside the chain is compared with the task's labels when it loads (models/student.py).
    if task_labels(cfg.task) != task_labels(teacher.task):
        (name, labels), (first, first_labels) = task_labels(cfg.task), task_labels(teacher.task)
        raise UserError(
            f"compress stage {stage!r} trains on task {name!r} with labels {labels}, but the teacher on "
            f"{first!r} with labels {first_labels}: every stage must learn the teacher's classes. Choose "
            "the task in `common`, not in a stage's overrides."
        )
    outside = cfg.distill.get("teacher") if cfg.distill.method != "none" else None
    if isinstance(outside, str) and outside not in chain_models and not Path(outside).expanduser().exists():
        raise MissingFileError(
            f"compress stage {stage!r}: distill.teacher={outside} does not exist; name an earlier stage's "
            f"model as {{name}} (e.g. {{teacher}}) or give a run's model/ folder."
        )


def check_quantize(q: DictConfig) -> None:
    """The quantized stage's settings, checked with quantize.py's own checks, before anything trains."""
    from llm_lightning.quantization.settings import check_settings

    try:  # method (not none), platform, SmoothQuant, activations, attention: quantize.py's own checks
        check_settings(q, require_method=True)
    except UserError as err:
        raise UserError(f"compress stage 'quantized' (key `quantize` of conf/compress.yaml): {err}") from err


def chain_keys(compress_yaml: Path, quantize_choices: Path) -> dict[str, set[str]]:
    """The keys a chain may have: conf/compress.yaml's; under `quantize`, those of every
    `quantize_choices` file too (the quantized stage merges them over conf/quantize/none.yaml)."""
    top = OmegaConf.load(compress_yaml)
    quantize = set(top.quantize.keys())
    for choice in Path(quantize_choices).glob("*.yaml"):
        quantize.update(OmegaConf.load(choice).keys())
    return {
        "": {str(k) for k in top if k not in ("defaults", "hydra")},
        "quantize": {str(k) for k in quantize},
    }


def check_keys(chain: DictConfig, valid: dict[str, set[str]]) -> None:
    """Hydra refuses an unknown key on the command line; one added with `+key=` or written in a
    recipe reaches here, and is a UserError naming the nearest valid key."""
    quantize = chain.get("quantize")
    for parent, names in (("", chain.keys()), ("quantize", quantize.keys() if quantize else ())):
        for name in map(str, names):
            if name in valid[parent]:
                continue
            prefix = f"{parent}." if parent else ""
            choices = sorted(prefix + k for k in valid[parent])
            near = difflib.get_close_matches(prefix + name, choices, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UserError(
                f"compress: unknown key {prefix + name!r}{hint}; valid keys: {', '.join(choices)} "
                "(conf/compress.yaml)."
            )
