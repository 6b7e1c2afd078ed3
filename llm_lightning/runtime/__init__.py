"""Plumbing every entry point shares: torch threads, the precision `auto` picks, and user errors
printed as errors.

A user error (`llm_lightning.errors.UserError`, a missing mandatory config value, a Hydra config
that does not compose: an unknown key, an unknown choice) prints one short message and exits with
status 2, with no traceback; `HYDRA_FULL_ERROR=1` shows the traceback. Anything else is a bug and
keeps its traceback (Hydra prints it and exits with status 1).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf.errors import MissingMandatoryValue

from llm_lightning.errors import MissingFileError, UserError

USAGE_EXIT = 2  # as argparse and most Unix tools exit on bad usage


def conf_dir() -> Path:
    """The repository's `conf/` folder, for code that composes or reads configs outside
    `@hydra.main` (compress, the benchmarks). It sits beside the package, as `@hydra.main`'s
    `config_path="../conf"` expects: a checkout installed editable (`pip install -e .`)."""
    conf = Path(__file__).resolve().parents[2] / "conf"
    if not conf.is_dir():
        raise MissingFileError(
            f"no conf/ folder at {conf}: llm_lightning reads its configs from the repository, so "
            "install it from a checkout with `pip install -e .`."
        )
    return conf


def apply_runtime(runtime) -> None:
    """`runtime.threads`: torch's intra-op threads (null: torch's default, one per core)."""
    if runtime.get("threads"):
        torch.set_num_threads(int(runtime.threads))


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


NATIVE_BF16 = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 BF16 / AMX, Arm's BF16 extension


def resolved_precision(precision, flags: set[str] | None = None, cuda: bool | None = None) -> str | int:
    """Lightning's precision for `trainer.precision`; `auto` picks bf16-mixed only where bf16 is
    computed natively. On an AVX2-only CPU (AMD EPYC, 2 threads, 2026-12-01) a 512^3 bf16 matmul
    ran at 1.3 GFLOP/s against 95 for fp32: bf16 autocast there makes training ~70x slower in its
    matmuls, not faster (docs/BENCHMARKS.md, "bf16 without native bf16")."""
    if str(precision) != "auto":
        return precision
    if torch.cuda.is_available() if cuda is None else cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if (cpu_flags() if flags is None else flags) & NATIVE_BF16 else "32-true"


def full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(message: str) -> None:
    """Print `error: <message>` to stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)


def user_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an entry point's function: its user errors print as one message and exit 2."""

    @functools.wraps(task)
    def wrapped(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except (UserError, MissingMandatoryValue) as err:
            if full_errors():
                raise
            fail(str(err).strip())

    return wrapped


def run_entry(main: Callable[[], Any]) -> None:
    """Call a `@hydra.main` function; a config that does not compose exits 2, not Hydra's 1.

    Hydra prints a composition error (an unknown key or choice, a bad override) as a short message
    and calls `sys.exit(1)` inside its `except`, so the exit carries the error as its context: that
    is how it is told apart from a bug, which Hydra reports the same way with a traceback.
    """
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        main()
    except SystemExit as stop:
        cause = stop.__context__
        if stop.code == 1 and isinstance(cause, (CompactHydraException, OmegaConfBaseException)):
            raise SystemExit(USAGE_EXIT) from None
        raise
