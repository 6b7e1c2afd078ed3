"""`ModelCheckpoint` that refreshes `last.ckpt` at every validation, not only on improvement.

Lightning 2.6 writes `last.ckpt` only when a top-k checkpoint was saved at the same step, so
after a run stops improving `last` falls behind and a resume repeats (or loses) that work.
Here `last.ckpt` always holds the latest validated state; resuming from it is exact.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class LastCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose `last.ckpt` follows every save point (validation or epoch end)."""

    def _refresh_last(self, trainer, on_train_epoch_end: bool) -> None:
        if (
            self.save_last
            and self._should_save_on_train_epoch_end(trainer) == on_train_epoch_end
            and not self._should_skip_saving_checkpoint(trainer)  # i.e. the parent saved nothing at this step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer, on_train_epoch_end=False)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer, on_train_epoch_end=True)
