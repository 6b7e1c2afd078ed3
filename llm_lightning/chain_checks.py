"""What compress checks before its first stage trains: its arguments, each stage's callbacks, task
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

    from llm_lightning.train import finetune_callbacks, stage_callbacks

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
    from llm_lightning.quantize import METHODS, check_settings

    try:
        if q.method == "none":
            raise UserError(
                f"quantize.method='none' leaves nothing to quantize; choose one of {METHODS[1:]}."
            )
        check_settings(q)  # method, platform, SmoothQuant, activations, attention: quantize.py's own
    except UserError as err:
        raise UserError(f"compress stage 'quantized' (key `quantize` of conf/compress.yaml): {err}") from err


def valid_keys(defaults: DictConfig, recipe: DictConfig, quantize_choices: Path) -> dict[str, set[str]]:
    """The keys a compress argument may set: conf/compress.yaml's and the recipe's, `stages`; under
    `quantize`, those of every `quantize_choices` file too (the stage merges them over the choice)."""
    top = {*defaults.keys(), *recipe.keys(), "stages"}
    quantize = {*(defaults.get("quantize") or {}).keys(), *(recipe.get("quantize") or {}).keys()}
    for choice in Path(quantize_choices).glob("*.yaml"):
        quantize.update(OmegaConf.load(choice).keys())
    return {"": {str(k) for k in top}, "quantize": {str(k) for k in quantize}}


def check_arguments(args: list[str], valid: dict[str, set[str]]) -> None:
    """Each argument is `key=value` with a key compress reads; else a UserError naming the nearest."""
    for arg in args:
        if "=" not in arg:
            raise UserError(f"argument {arg!r} is not key=value; valid keys: {', '.join(sorted(valid['']))}.")
        key = arg.split("=", 1)[0]
        head, _, rest = key.partition(".")
        if head == "quantize" and rest:
            parent, name = "quantize", rest.split(".")[0]
        elif head in ("stages", "common") and rest:
            continue  # a stage's name, or a list index: checked when the stages are composed
        else:
            parent, name = "", key
        if name in valid[parent]:
            continue
        prefix = f"{parent}." if parent else ""
        choices = sorted(prefix + k for k in valid[parent])
        near = difflib.get_close_matches(prefix + name, choices, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UserError(f"unknown key {prefix + name!r}{hint}; valid keys: {', '.join(choices)}.")
