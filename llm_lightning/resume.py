"""Exact resume: which checkpoint `ckpt_path` means, and a train loader that knows its position.

    python -m llm_lightning.train hydra.run.dir=<interrupted run dir> ckpt_path=last

Hydra makes a new run directory for every launch, so `last` is looked up inside `output_dir`:
resume in the interrupted run's own directory by passing it as `hydra.run.dir`. Lightning
restores the weights, optimizer, LR scheduler, loop counters and every callback's state
(EarlyStopping, ModelCheckpoint, GradualUnfreeze); `ResumableLoader` adds the position within
the epoch, so a run killed mid-epoch continues with the batch it had not trained on yet.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from llm_lightning.errors import MissingFileError, UserError


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


class ResumableLoader(DataLoader):
    """A DataLoader over a batch sampler with `set_epoch(epoch)` and `resume_at(epoch, batches_done)`.

    Its iterator is lazy: the epoch and the position are read at the first batch, from the fit
    loop (`epoch()`, `position()`), whose counters the checkpoint restores. Reading them any
    earlier is wrong twice over in Lightning 2.6: `estimated_stepping_batches` builds and iterates
    the train loader before the checkpoint is restored (and `load_state_dict` is then never
    called), and `set_epoch` is only called on `loader.sampler` and `loader.batch_sampler.sampler`,
    never on the batch sampler itself, so every epoch would repeat the first one's order.
    `state_dict` still records both numbers in the checkpoint, and marks the loader resumable.
    """

    def __init__(self, *args: Any, position: Callable[[], int], epoch: Callable[[], int], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.position, self.epoch = position, epoch

    def __iter__(self):
        epoch, done = int(self.epoch()), int(self.position())
        self.batch_sampler.set_epoch(epoch)
        if done:  # restored mid-epoch: the fit loop has already trained `done` batches of this epoch
            self.batch_sampler.resume_at(epoch, done)
        yield from super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch()), "batches_done": int(self.position())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Nothing to load: the position is the fit loop's own restored counter (see the class doc)."""
