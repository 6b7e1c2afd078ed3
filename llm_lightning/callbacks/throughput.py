"""Training throughput in real (non-pad) tokens per second, logged as `train/tokens_per_s`."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class TokenThroughput(Callback):
    """Times each training batch (forward, backward, optimizer step) and counts its tokens.

    The first `skip` batches are left out of the run average: they include one-time costs
    (allocator warm-up, lazy init) that would understate the steady rate.
    """

    def __init__(self, skip: int = 2):
        self.skip = skip
        self.tokens = 0
        self.seconds = 0.0
        self._start = 0.0
        self._seen = 0

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._start
        tokens = int(batch["attention_mask"].sum()) * trainer.world_size
        self._seen += 1
        pl_module.log("train/tokens_per_s_step", tokens / max(elapsed, 1e-9), on_step=True, on_epoch=False)
        if self._seen > self.skip:
            self.tokens += tokens
            self.seconds += elapsed

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.tokens_per_s:
            pl_module.log("train/tokens_per_s", self.tokens_per_s)

    @override
    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "seconds": self.seconds}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens, self.seconds = state_dict["tokens"], state_dict["seconds"]
