"""A train loader that knows its position within the epoch, for an exact resume.

Lightning restores the weights, optimizer, LR scheduler, loop counters and every callback's state
(EarlyStopping, ModelCheckpoint, GradualUnfreeze); `ResumableLoader` adds the position within
the epoch, so a run killed mid-epoch continues with the batch it had not trained on yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader


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
