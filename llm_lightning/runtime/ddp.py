"""Hydra + DDP: one run directory and one config for every rank.

    python -m llm_lightning.train trainer=ddp trainer.devices=2            # CPU: gloo; GPU: nccl
    python -m llm_lightning.train -m trainer=ddp optimizer.lr=1e-5,3e-5    # a sweep of DDP jobs

Lightning's `ddp` strategy starts ranks 1..N-1 by re-running the command line. Under Hydra that
goes wrong in two ways, both handled here:

1. Each rank composes the config again, so anything resolved lazily can differ between ranks:
   `${now:...}` in `hydra.run.dir` (a second of difference gives a second run directory),
   `${hydra:runtime.output_dir}`, anything random. `shared_config` resolves the config once in
   the launching process and hands it to the ranks it starts, through the environment.
2. Lightning re-runs `sys.argv`, which in a multirun still holds `-m` and the sweep lists: every
   rank would launch the whole sweep again. `child_command` starts each rank as a single run of
   the job's own overrides, in the job's own directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

RUN_CONFIG_ENV = "LLM_LIGHTNING_RUN_CONFIG"  # the launching process's resolved config, as YAML


def shared_config(cfg: DictConfig) -> DictConfig:
    """The config every rank uses: resolved once by the launching process.

    A process started by Lightning's DDP launcher (it sets `LOCAL_RANK`) takes the launcher's
    config from the environment; any other process resolves its own and publishes it for the
    ranks it will start.
    """
    inherited = os.environ.get(RUN_CONFIG_ENV)
    if inherited and "LOCAL_RANK" in os.environ and os.environ["LOCAL_RANK"] != "0":
        return OmegaConf.create(inherited)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    os.environ[RUN_CONFIG_ENV] = OmegaConf.to_yaml(resolved)
    return resolved


def child_command(local_rank: int) -> tuple[Sequence[str], str]:
    """Command and cwd for DDP rank `local_rank`: this Hydra job's overrides as a single run in its directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hydra_cfg.overrides.task)  # this job's overrides only: no -m, no sweep lists
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        "hydra.mode=RUN",  # an Optuna hparams_search sets MULTIRUN; a rank is one run
        "hydra.output_subdir=null",  # rank 0 alone writes .hydra/
        f"hydra.job.name=train_ddp_rank_{local_rank}",
    ]
    return command, get_original_cwd()


def use_child_command() -> None:
    """Make Lightning's DDP launcher start ranks with `child_command` (it reads `_hydra_subprocess_cmd`)."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    if not hasattr(subprocess_script, "_hydra_subprocess_cmd"):
        raise RuntimeError(
            "lightning.pytorch.strategies.launchers.subprocess_script._hydra_subprocess_cmd is gone in this "
            "Lightning version: update llm_lightning/runtime/ddp.py, or run DDP with trainer=ddp_spawn."
        )
    subprocess_script._hydra_subprocess_cmd = child_command


def fsdp_strategy(layer_class: str, **kwargs):
    """`FSDPStrategy` wrapping each `layer_class` (a dotted class path, as YAML can only name it)."""
    from hydra.utils import get_class
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(auto_wrap_policy={get_class(layer_class)}, **kwargs)
