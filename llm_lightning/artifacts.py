"""What a run writes, written so that a crash never leaves half a file where a good one was,
and read back as data only.

- Folders (`atomic_dir`) and JSON files (`write_json`) are written beside the target and renamed
  over it; checkpoints likewise (`atomic_torch_save`, `SafeCheckpointIO`), fsynced first: a kill
  during a save leaves the previous `last.ckpt` whole (rename is atomic on POSIX).
- Reads use `torch.load(weights_only=True)`: tensors, numbers, strings and plain containers load;
  anything else in the pickle (a class, a function, `os.system`) is refused before it runs.
- `resolve_ckpt_path`: which checkpoint `ckpt_path` means, for an exact resume
  (`python -m llm_lightning.train hydra.run.dir=<interrupted run dir> ckpt_path=last`). Hydra
  makes a new run directory for every launch, so `last` is looked up inside `output_dir`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from llm_lightning.errors import MissingFileError, UserError


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """A checkpoint holds pickled objects beyond tensors and plain containers."""


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`, with an error that says what was refused and why."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it holds pickled objects other than tensors and plain containers, "
            f"and unpickling them could run code from the file. torch.load(weights_only=True) said: "
            f"{str(err).splitlines()[0]} Only checkpoints written by llm_lightning (or state dicts of "
            "plain tensors) load; re-save a file you trust as a state dict, or use the run's model/ "
            "folder (safetensors)."
        ) from err


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` to `.<name>.tmp-<pid>` beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin, with atomic local writes and data-only reads.

    Set in `conf/trainer/default.yaml` (`plugins:`), so `fit(ckpt_path=...)`, `test(ckpt_path=...)`
    and every `ModelCheckpoint` save go through it.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec's transaction
        atomic_torch_save(checkpoint, path)

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any = None, weights_only: bool | None = None
    ) -> dict:
        # weights_only is always True here: a resumed or tested checkpoint is data, never code.
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return safe_load(path, map_location=map_location or "cpu")


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` and only then swap the folder into `target` (the old one goes last)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the result should look like a plain mkdir
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


METRICS_FILE = "metrics.json"  # a training run's final metrics (llm_lightning.train)
BEST_VALIDATION = "val/acc_best"  # in it: the figure stages and runs are chosen by


def best_validation_accuracy(run_dir: Path) -> float | None:
    """`val/acc_best` of the training run in `run_dir`, or None if it wrote none (or is no run)."""
    metrics = Path(run_dir) / METRICS_FILE
    value = json.loads(metrics.read_text()).get(BEST_VALIDATION) if metrics.is_file() else None
    return None if value is None else float(value)


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def checkpoint_dir(cfg) -> Path:
    """Where `ModelCheckpoint` writes: its configured `dirpath`, else `<output_dir>/checkpoints`."""
    configured = ((cfg.get("callbacks") or {}).get("model_checkpoint") or {}).get("dirpath")
    return Path(configured) if configured else Path(cfg.output_dir) / "checkpoints"


def resolve_ckpt_path(cfg) -> str | None:
    """`ckpt_path` as a file to resume from: null (fresh run), `last`, or a `.ckpt` path.

    Raises instead of starting from scratch when the checkpoint is missing, which is what
    Lightning itself does for a missing `last` (a warning, then a fresh run in a new directory).
    """
    value = cfg.get("ckpt_path")
    if value is None or str(value) == "":
        return None
    if str(value) == "last":
        last = checkpoint_dir(cfg) / "last.ckpt"
        if not last.is_file():
            raise MissingFileError(
                f"ckpt_path=last but there is no {last}. Hydra starts every launch in a new directory; "
                "resume in the interrupted run's directory: "
                "`python -m llm_lightning.train hydra.run.dir=<run dir> ckpt_path=last` "
                "(with the run's other overrides)."
            )
        return str(last)
    path = Path(str(value)).expanduser()
    if path.is_dir():
        raise UserError(
            f"ckpt_path={value} is a directory; pass a .ckpt file, or resume that run with "
            f"`hydra.run.dir={path} ckpt_path=last`."
        )
    if not path.is_file():
        raise MissingFileError(f"ckpt_path={value}: no such checkpoint file.")
    return str(path)
