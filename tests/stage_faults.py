"""A fault for a compress stage that must keep its settings across the kill and the rerun (test helper)."""

from __future__ import annotations

from pathlib import Path

from tests.faults import KillAtStep


class KillOnceAtStep(KillAtStep):
    """`KillAtStep` in the first fit only, and a log of the global step each fit starts from.

    compress resumes an interrupted stage only if its settings are unchanged, callbacks included, so
    the rerun keeps this callback: it sees its log and lets the run go on. `log`, a file, gets one line per
    fit: 0 for a fresh run, the restored checkpoint's step for a resumed one.
    """

    def __init__(self, step: int, log: str):
        super().__init__(step)
        self.starts = Path(log)

    def on_train_start(self, trainer, pl_module) -> None:
        with self.starts.open("a") as f:
            f.write(f"{trainer.global_step}\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if len(self.starts.read_text().split()) == 1:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
