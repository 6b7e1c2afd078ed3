"""Progress that shows both in a terminal and in a log file.

Lightning's `RichProgressBar` draws a live bar, and rich draws nothing while its output is not a
terminal (`nohup ... > log`, CI, `| tee`): a 50-minute distillation showed no progress at all in
its log, only the finished bar at the end. `progress_bar()` keeps the rich bar on a terminal and
otherwise returns `LogProgress`, which prints one plain line every `every_s` seconds — the
batch, the percentage, the rate, the time left and the metrics shown on the bar — so that
`tail -f` on a log answers "how far along is it".
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from typing_extensions import override

from llm_lightning.errors import UserError

STYLES = ("auto", "rich", "log")


def progress_bar(style: str = "auto", every_s: float = 60.0, leave: bool = True) -> ProgressBar:
    """The rich bar where stdout is a terminal (`style=auto`), else `LogProgress`; `rich` or `log`
    pick one whatever stdout is. Config: `callbacks.progress_bar.style`, `.every_s`."""
    if style not in STYLES:
        raise UserError(
            f"callbacks.progress_bar.style={style!r} is not a progress style; choose one of "
            f"{', '.join(STYLES)} (auto: the rich bar on a terminal, log lines otherwise)"
        )
    if style == "rich" or (style == "auto" and sys.stdout.isatty()):
        return RichProgressBar(leave=leave)
    return LogProgress(every_s=every_s)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass
class _Clock:
    """One loop's progress: when it started, and when and at which batch it last printed."""

    started: float = field(default_factory=time.monotonic)
    printed_at: float = field(default_factory=time.monotonic)
    done: int = 0
    printed_done: int = -1


class LogProgress(ProgressBar):
    """One line per `every_s` seconds of a loop's batches, and one when the loop ends. Training,
    validation and testing keep clocks of their own: a validation pass inside an epoch does not
    reset the epoch's time left."""

    def __init__(self, every_s: float = 60.0):
        super().__init__()
        if every_s <= 0:
            raise UserError(f"callbacks.progress_bar.every_s={every_s} must be > 0 (seconds between lines)")
        self.every_s = float(every_s)
        self._enabled = True
        self._clocks: dict[str, _Clock] = {}  # "train", "validate", "test"

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    def _start(self, loop: str) -> None:
        self._clocks[loop] = _Clock()

    def _line(
        self, loop: str, label: str, done: int | None, total: int | float, pl_module, final=False
    ) -> None:
        clock = self._clocks[loop]
        if done is not None:
            clock.done = done
        done, now = clock.done, time.monotonic()
        due = done != clock.printed_done if final else now - clock.printed_at >= self.every_s
        if not self._enabled or not due:
            return
        clock.printed_at, clock.printed_done = now, done
        elapsed = now - clock.started
        parts = [f"[{label}] batch {done}"]
        if total != float("inf"):
            total = int(total)
            parts[0] += f"/{total} ({done / max(total, 1):.0%})"
            if 0 < done < total:
                parts.append(f"~{_duration(elapsed * (total - done) / done)} left")
        parts.append(f"{_duration(elapsed)} elapsed")
        if elapsed > 0 and done:
            parts.append(f"{done / elapsed:.2f} batch/s")
        metrics = {k: v for k, v in self.get_metrics(self.trainer, pl_module).items() if k != "v_num"}
        if metrics:
            parts.append(" ".join(f"{k}={_value(v)}" for k, v in metrics.items()))
        print(" · ".join(parts), flush=True)

    def _epoch(self) -> str:
        trainer = self.trainer
        limit = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
        return f"train epoch {trainer.current_epoch + 1}/{limit}"

    def _start_train(self, trainer, done: int = 0) -> None:
        """The epoch's clock and batch count; `done`: batches the epoch had trained before a
        resume restarted it mid-way (Lightning then skips `on_train_epoch_start`)."""
        self._start("train")
        # an epoch that `trainer.max_steps` cuts short ends early: count to there, not to the
        # epoch's last batch, so that the time left is the run's
        self._train_total = self.total_train_batches
        if trainer.max_steps and trainer.max_steps > 0:
            left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            self._train_total = min(self._train_total, done + max(left, 0))

    @override
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start_train(trainer)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "train" not in self._clocks:  # resumed mid-epoch
            self._start_train(trainer, done=batch_idx)
        self._line("train", self._epoch(), batch_idx + 1, self._train_total, pl_module)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if "train" not in self._clocks:  # resumed at the epoch's very end: no batch trained here
            return
        self._line("train", self._epoch(), None, self._train_total, pl_module, final=True)

    @override
    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._start("validate")

    @override
    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not trainer.sanity_checking:
            self._line(
                "validate", "validate", self._clocks["validate"].done + 1, self.total_val_batches, pl_module
            )

    @override
    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._line("validate", "validate", None, self.total_val_batches, pl_module, final=True)

    @property
    def _total_test_batches(self) -> int | float:
        """Over all test dataloaders (the base class counts the current one, once told which)."""
        batches = self.trainer.num_test_batches
        return sum(batches) if isinstance(batches, list) else batches

    @override
    def on_test_start(self, trainer, pl_module) -> None:
        self._start("test")

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # counted here: batch_idx restarts with each test dataloader
        self._line("test", "test", self._clocks["test"].done + 1, self._total_test_batches, pl_module)

    @override
    def on_test_end(self, trainer, pl_module) -> None:
        self._line("test", "test", None, self._total_test_batches, pl_module, final=True)
