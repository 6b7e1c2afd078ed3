"""The whole pipeline as a user runs it: `python -m llm_lightning.train`, then evaluate and predict."""

from __future__ import annotations

import json
import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import run_module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    done = run_module("llm_lightning.train", "model=tiny", "debug=smoke", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_run_writes_every_output(tiny_run):
    out, stdout = tiny_run
    for path in (
        ".hydra/config.yaml",
        "metrics.json",
        "confusion_matrix.png",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "checkpoints/last.ckpt",
    ):
        assert (out / path).exists(), path
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test/acc", "test/f1_macro", "val/acc_best", "train/tokens_per_s"):
        assert isinstance(metrics[key], float), key
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["train/tokens_per_s"] > 0
    # The last lines say where things are and how to look at them.
    tail = stdout.strip().splitlines()[-10:]
    assert any(f"tensorboard --logdir {out}" in line for line in tail)
    assert any(str(out / "model") in line for line in tail)


def test_a_log_file_shows_progress(tiny_run):
    """Output to a pipe, as nohup or CI gets it: plain progress lines instead of the rich bar."""
    _, stdout = tiny_run
    # debug=smoke stops at 4 steps, half of the epoch's 8 batches: the count runs to 4
    assert re.search(
        r"^\[train epoch 1/1\] batch 4/4 \(100%\) · .* elapsed · .*train/loss_step=", stdout, re.M
    ), stdout[-2000:]
    assert re.search(r"^\[validate\] batch \d+/\d+ \(100%\)", stdout, re.M)
    assert re.search(r"^\[test\] batch (\d+)/\1 \(100%\)", stdout, re.M)
    # tensorboard's directory watcher, read at the end of the run, once logged dozens of lines
    assert "Directory watcher" not in stdout


def test_tensorboard_has_scalars_hparams_and_confusion_matrix(tiny_run):
    out, _ = tiny_run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss_step",
        "val/loss",
        "val/acc",
        "val/f1_macro",
        "val/acc_best",
        "test/acc",
        "train/tokens_per_s_step",
        "lr-AdamW/pg1",
    ):
        assert tag in scalars, (tag, sorted(scalars))
    assert "test/confusion_matrix" in acc.Tags()["images"]
    assert len(acc.Scalars("train/loss_step")) == 4  # one per step of debug=smoke
    # Final metrics sit at the last step, not at a stray step 0 at the start of every curve.
    assert [e.step for e in acc.Scalars("test/acc")] == [4]
    assert [e.step for e in acc.Scalars("val/acc")] == [1, 3]


def test_exported_model_loads_with_plain_transformers(tiny_run):
    out, _ = tiny_run
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.pad_token_id == tok.pad_token_id
    logits = model(**tok(["a fine film"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)


@pytest.mark.parametrize("which", ["model", "checkpoint"])
def test_evaluate_matches_training_test_metrics(tiny_run, tmp_path, which):
    out, _ = tiny_run
    trained = json.loads((out / "metrics.json").read_text())
    path = out / "model" if which == "model" else trained["best_checkpoint"]
    done = run_module(
        "llm_lightning.evaluate",
        f"model_path={path}",
        "task.limit=32",
        f"hydra.run.dir={tmp_path}",
        "trainer.precision=bf16-mixed",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    # Same weights, same seeded split, same precision: the same accuracy.
    assert evaluated["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)


def test_predict_prints_label_and_probabilities(tiny_run, tmp_path):
    out, _ = tiny_run
    texts = tmp_path / "texts.txt"
    texts.write_text("a gorgeous film\n\nutterly dull\n")
    done = run_module(
        "llm_lightning.predict", f"model_path={out / 'model'}", 'text="one more"', f"file={texts}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["one more", "a gorgeous film", "utterly dull"]
    for r in rows:
        assert r["label"] in ("negative", "positive")
        assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-4)
