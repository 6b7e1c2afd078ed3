"""How compress composes its chain and each training stage's config, with Hydra.

The chain is conf/compress.yaml with a `recipe` group (conf/recipe/<name>.yaml) and the command
line's overrides (`load_chain`, or `@hydra.main` in llm_lightning.compress). A training stage is a
`train` config: conf/train.yaml composed with `common`, then the stage's own overrides, in which
`${steps.<name>}` splices in a list of overrides several stages share and `{name}` stands for an
earlier stage's exported model/ folder (`stage_config`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from llm_lightning.errors import UserError
from llm_lightning.runtime import conf_dir

FIRST_STAGE = "teacher"  # fine-tuned first; its config gives the report its task, bench and runtime
QUANTIZED = "quantized"  # the last stage's folder, not a training stage
STAGE_REF = re.compile(r"\{([a-z][a-z0-9_]*)\}")  # `{name}`; neither `${a.b}` nor a dict `{k: v}` matches


@contextmanager
def composing() -> Iterator[None]:
    """Where Hydra finds configs for `compose`: under compress's `@hydra.main`, the command's own
    search path (conf/, and any `--config-dir`, where a user's recipe may name its own configs);
    called from Python (tests, notebooks), conf/ (`conf_dir`)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and GlobalHydra.instance().is_initialized():
        yield
        return
    GlobalHydra.instance().clear()  # another caller's search path, left initialized
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield


def hydra_message(err: Exception) -> str:
    """Hydra's error without the config search path it lists after an unknown choice."""
    return str(err).split("Config search path")[0].strip()


def load_chain(overrides: Sequence[str] = ()) -> DictConfig:
    """The chain `python -m llm_lightning.compress <overrides>` runs: conf/compress.yaml, its
    recipe, then `overrides` (Hydra's syntax: `recipe=quick_15_layers`, `quantize.compile=false`)."""
    from hydra import compose
    from hydra.errors import HydraException

    try:
        with composing():
            return compose(config_name="compress", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(f"compress {' '.join(overrides)}: {hydra_message(err)}") from err


def training_stages(chain: DictConfig) -> list[str]:
    """The chain's training stages in the order they run, checked: `teacher` first, then folder-safe
    names, none of them `quantized`."""
    names = list(chain.get("stages") or [])
    bad = [n for n in names if n == QUANTIZED or not re.fullmatch(r"[a-z][a-z0-9_]*", n)]
    if not names or names[0] != FIRST_STAGE or bad:
        raise UserError(
            f"compress stages {names}: the first must be {FIRST_STAGE!r} (the fine-tuned model the others "
            f"start from), and each name lower case letters, digits or '_', not {QUANTIZED!r}"
            + (f" (refused: {bad})" if bad else "")
            + " (key `stages` of the recipe, conf/recipe/; `recipe` picks one)."
        )
    return names


def merged_overrides(*groups: list[str]) -> list[str]:
    """Overrides in order, keeping only the last one for each key (Hydra refuses duplicates)."""
    last: dict[str, str] = {}
    for override in (o for group in groups for o in group):
        key = override.split("=", 1)[0].lstrip("+~")
        last.pop(key, None)
        last[key] = override
    return list(last.values())


def _spliced(node: Any) -> list[str]:
    if isinstance(node, ListConfig | list | tuple):
        return [o for item in node for o in _spliced(item)]
    return [] if node is None else [str(node)]


def stage_overrides(chain: DictConfig, stage: str) -> list[str]:
    """A stage's own overrides, each `${steps.<name>}` replaced by that step's list, in its place."""
    try:
        return _spliced(chain.stages[stage])
    except OmegaConfBaseException as err:
        steps = sorted(chain.get("steps") or {})
        raise UserError(
            f"compress stage {stage!r}: {err} (key `stages.{stage}` of the recipe; the steps of "
            f"conf/compress.yaml are {steps})."
        ) from err


def stage_inputs(chain: DictConfig, stage: str, stages: list[str]) -> list[str]:
    """The stages whose model `stage` reads (`{name}` in its overrides): earlier ones only."""
    named = [n for o in stage_overrides(chain, stage) for n in STAGE_REF.findall(o)]
    earlier = stages[: stages.index(stage)]
    wrong = [n for n in named if n not in earlier]
    if wrong:
        raise UserError(
            f"compress stage {stage!r} reads {{{wrong[0]}}}, which is not a stage that runs before it; "
            f"it can read the model of {earlier} (key `stages.{stage}` of the recipe)."
        )
    return [s for s in earlier if s in named]  # in the chain's order


def stage_config(chain: DictConfig, stage: str, out: Path) -> DictConfig:
    """The composed train config of one training stage, writing into `<out>/<stage>`. A config that
    does not compose, leaves a `???` unset or does not resolve is a UserError naming the stage."""
    from hydra import compose
    from hydra.errors import HydraException

    paths = {name: str(out / name / "model") for name in training_stages(chain)}
    own = [STAGE_REF.sub(lambda m: paths.get(m[1], m[0]), o) for o in stage_overrides(chain, stage)]
    overrides = merged_overrides(list(chain.common), own)
    where = f"compress stage {stage!r} (key `stages.{stage}` of the recipe, or `common`)"
    try:
        with composing():
            cfg = compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(f"{where} does not compose: {hydra_message(err)}") from err
    with open_dict(cfg):
        cfg.output_dir = str(out / stage)
        cfg.quantize.method = "none"  # the chain quantizes once, at the end
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{where} leaves {missing} unset (`???` in conf/): give them a value.")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise UserError(f"{where} does not resolve: {err}") from err
    return cfg
