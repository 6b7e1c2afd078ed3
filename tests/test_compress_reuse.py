"""`reuse.teacher=<run>`: a finished `train` run (what `make train` writes) taken in as the chain's
teacher when its settings are the stage's, refused with the differing keys when not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llm_lightning.train
from llm_lightning.compress import prepare, train_stages
from llm_lightning.errors import UserError
from tests.conftest import run_module


@pytest.fixture
def run(chain, tmp_path) -> Path:
    """A `train` run from the command line, with the chain's `common` overrides: the teacher's settings."""
    folder = tmp_path / "run"
    done = run_module("llm_lightning.train", *chain.common, f"hydra.run.dir={folder}")
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_a_finished_train_run_is_taken_in_as_the_teacher_and_not_trained_again(
    chain, run, monkeypatch, capsys
):
    trained, real = [], llm_lightning.train.train

    def counted(cfg):
        trained.append(Path(cfg.output_dir).name)
        return real(cfg)

    monkeypatch.setattr(llm_lightning.train, "train", counted)
    chain.reuse = {"teacher": str(run)}
    train_stages(chain)
    teacher = Path(chain.out) / "teacher"
    assert trained == ["pruned", "distilled"]
    assert f"[compress] teacher: taken in from {run} (reuse.teacher)" in capsys.readouterr().out
    weights = "model/model.safetensors"
    assert (teacher / weights).read_bytes() == (run / weights).read_bytes()
    assert (teacher / weights).stat().st_ino == (run / weights).stat().st_ino  # a hard link, no second copy
    record = json.loads((teacher / "stage.json").read_text())
    assert record["status"] == "done"
    assert record["fingerprint"] == prepare(chain).fingerprints["teacher"].value
    # The pruned stage read the taken-in teacher: its model has one layer fewer than the run's.
    layers = [
        json.loads((d / "model/config.json").read_text())["num_hidden_layers"]
        for d in (run, teacher.parent / "pruned")
    ]
    assert layers[1] == layers[0] - 1

    # A second run finds the teacher done with its fingerprint: neither taken in again nor trained.
    trained.clear()
    train_stages(chain)
    assert trained == []
    assert "[compress] teacher: unchanged since its last run; reused" in capsys.readouterr().out


def test_a_run_trained_with_other_settings_is_refused_naming_them_before_anything_runs(chain, run):
    out = Path(chain.out)
    chain.common = [*chain.common, "optimizer.lr=1e-3", "seed=7"]  # the stage's settings, not the run's
    chain.reuse = {"teacher": str(run)}
    with pytest.raises(
        UserError, match=r"reuse.teacher=.* other settings .*optimizer.lr: .* -> 0.001.*seed: 42 -> 7"
    ):
        prepare(chain)
    done = run_module(
        "llm_lightning.compress",
        f"out={out}",
        "recipe=quick_15_layers",
        'common=["model=tiny","debug=smoke","optimizer.lr=1e-3"]',
        f"reuse.teacher={run}",
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "optimizer.lr" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()  # refused before the first stage was written


@pytest.mark.parametrize(
    ("reuse", "error"),
    [
        ({"teacher": "/nonexistent/run"}, r"reuse.teacher=/nonexistent/run: no .hydra/config.yaml there"),
        (
            {"student": "{run}"},
            r"'student' is not a stage of this chain; its stages: teacher, pruned, distilled",
        ),
        ({"pruned": "{run}"}, r"stage 'pruned' reads teacher, made by this chain"),
    ],
)
def test_reuse_of_a_missing_run_or_a_stage_that_reads_another_is_refused(chain, tmp_path, reuse, error):
    chain.reuse = {k: v.replace("{run}", str(tmp_path)) for k, v in reuse.items()}
    with pytest.raises(UserError, match=error):
        prepare(chain)
