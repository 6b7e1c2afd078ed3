"""benchmarks/lightning_overhead.py runs both loops on the tiny model and prints both rows.

No timing assertions: a benchmark is not a timed test. What is checked is the wiring: both runs
finish their window, the table holds both rows with positive times, the Lightning run used
`make train`'s log-line progress, both loops compute the same losses (they do the same work), and
a window that would hold a validation is refused.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

from lightning_overhead import (  # noqa: E402  (benchmarks/lightning_overhead.py)
    DEFAULT,
    LIGHTNING,
    PLAIN,
    Start,
    compose_config,
    lightning_run,
    main,
    plain_run,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from llm_lightning.train import build  # noqa: E402

# 160 examples: 10 training batches of 16, so the first validation (val_check_interval 0.5) comes
# after the 5th batch, past the window (batches 1 and 2, counted from 0); one thread: tests share cores
TINY = ["--model", "tiny", "task.limit=160", "runtime.threads=1"]


def test_the_table_has_both_loops_with_positive_times(capsys):
    results = main([*TINY, "--rounds", "2", "--steps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    rows = {
        cells[1].strip(): cells[2:-1]
        for cells in (line.split("|") for line in out.splitlines())
        if len(cells) > 5
    }
    for name in (PLAIN, LIGHTNING):
        wall, per_step, tokens_per_s = (float(c) for c in rows[name][:3])
        assert wall > 0 and per_step > 0 and tokens_per_s > 0, rows[name]
        assert len(results.seconds[name]) == 2 and all(s > 0 for s in results.seconds[name])
    assert rows[PLAIN][3].strip() == "1.000 (1.000-1.000)"
    # the per-round table: one row per round, its ratio the two runs' wall times divided
    for r in range(2):
        ratio = results.seconds[LIGHTNING][r] / results.seconds[PLAIN][r]
        assert re.search(rf"^\| {r + 1} \| {results.seconds[PLAIN][r]:.3f} \| {ratio:.3f} \|$", out, re.M)
    # Lightning ran with the progress make train prints to a log: its line at the epoch's end (4 steps)
    assert re.search(r"^\[train epoch 1/1\] batch 4/4 \(100%\)", out, re.M), out[-2000:]


def test_a_window_holding_a_validation_is_refused():
    # 64 examples: 4 batches, a validation after the 2nd, inside the window (batches 1 and 2, from 0)
    with pytest.raises(SystemExit, match=r"1 validation\(s\) ran inside the timed window \(steps 1\.\.2\)"):
        main(
            [
                "--model",
                "tiny",
                "task.limit=64",
                "runtime.threads=1",
                "--rounds",
                "1",
                "--steps",
                "2",
                "--warmup",
                "1",
            ]
        )


def _losses(log_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_both_loops_train_the_same_way(tmp_path):
    """Same model, batches, freezing, optimizer, schedule and clipping: the same loss at every step."""
    cfg = compose_config("tiny", 1, 2, [*TINY[2:], "trainer.log_every_n_steps=1"], tmp_path / "build")
    module, datamodule, _, callbacks = build(cfg)
    datamodule.setup("fit")
    start = Start(module, datamodule, callbacks, warmup=1, steps=2)
    assert plain_run(start, cfg, tmp_path / "plain") > 0
    assert lightning_run(start, cfg, DEFAULT, tmp_path / "lightning") > 0
    plain = _losses(tmp_path / "plain" / "tensorboard", "train/loss")
    lightning = _losses(tmp_path / "lightning" / "tensorboard", "train/loss_step")
    # the plain loop trains the warm-up and the window (3 batches); Lightning one batch more, to close it
    assert len(plain) == 3 and len(lightning) == 4
    assert lightning[:3] == pytest.approx(plain, rel=1e-6, abs=0)
