"""Checkpoints that are written atomically and read as data only.

Writes go to a temporary file in the same folder, are fsynced, and are renamed over the
target: a kill during a save leaves the previous `last.ckpt` whole (rename is atomic on POSIX).

Reads use `torch.load(weights_only=True)`: tensors, numbers, strings and plain containers load;
anything else in the pickle (a class, a function, `os.system`) is refused before it runs.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from llm_lightning.errors import UserError


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
