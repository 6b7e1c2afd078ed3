"""Progress in a log file: `LogProgress` lines, and which progress bar `progress_bar()` picks."""

from __future__ import annotations

import re

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from llm_lightning.callbacks.progress import LogProgress, progress_bar


def test_auto_picks_the_rich_bar_on_a_terminal_and_log_lines_otherwise(monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert isinstance(progress_bar(), RichProgressBar)
    assert isinstance(progress_bar(style="log"), LogProgress)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    bar = progress_bar(every_s=5)
    assert isinstance(bar, LogProgress) and bar.every_s == 5
    assert isinstance(progress_bar(style="rich"), RichProgressBar)


def test_bad_settings_name_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"callbacks\.progress_bar\.style='tqdm'.*auto, rich, log"):
        progress_bar(style="tqdm")
    with pytest.raises(ValueError, match=r"callbacks\.progress_bar\.every_s=0"):
        LogProgress(every_s=0)


def _fit_and_test(tmp_path, every_s: float) -> None:
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=6,
        limit_val_batches=3,
        limit_test_batches=4,
        num_sanity_val_steps=2,
        callbacks=[LogProgress(every_s=every_s)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    model = BoringModel()
    trainer.fit(model)
    trainer.test(model)


def test_a_line_per_interval_and_one_at_each_loops_end(tmp_path, capsys):
    _fit_and_test(tmp_path, every_s=1e-9)  # every batch is past the interval
    lines = capsys.readouterr().out.splitlines()
    train = [line for line in lines if line.startswith("[train epoch ")]
    # a line per batch; the epoch's end adds none when its last batch was just printed
    assert len(train) == 12, train
    assert train[2].startswith("[train epoch 1/2] batch 3/6 (50%) · ~") and " left · " in train[2]
    assert train[-1].startswith("[train epoch 2/2] batch 6/6 (100%)") and "batch/s" in train[-1]
    validate = [line for line in lines if line.startswith("[validate]")]
    assert len(validate) == 2 * 3, validate  # no lines for the sanity check
    assert validate[-1].startswith("[validate] batch 3/3 (100%)")
    test = [line for line in lines if line.startswith("[test]")]
    assert [re.match(r"\[test\] batch (\d+)/4", line).group(1) for line in test] == ["1", "2", "3", "4"]


def test_a_long_interval_prints_only_each_loops_end(tmp_path, capsys):
    _fit_and_test(tmp_path, every_s=3600)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split(" batch ")[0] for line in lines] == [
        "[validate]",
        "[train epoch 1/2]",
        "[validate]",
        "[train epoch 2/2]",
        "[test]",
    ]
