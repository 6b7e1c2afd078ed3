"""Distillation as a user runs it: train a tiny teacher, then a student with `distill=kd`."""

from __future__ import annotations

import json

import pytest
import torch

from llm_lightning.callbacks.distill import KnowledgeDistillation
from llm_lightning.models.saved import load_saved
from tests.conftest import make_cfg, run_module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    done = run_module("llm_lightning.train", "model=tiny", "debug=smoke", f"hydra.run.dir={root / 'teacher'}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = run_module(
        "llm_lightning.train",
        "model=tiny",
        "debug=smoke",
        "distill=kd",
        f"distill.teacher={root / 'teacher' / 'model'}",
        "distill.student.num_layers=1",
        f"distill.cache.dir={root / 'cache'}",
        f"hydra.run.dir={root / 'student'}",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, done.stdout


def test_student_run_has_the_usual_outputs_and_the_teachers_test_metrics(runs):
    root, stdout = runs
    out = root / "student"
    for path in (
        "metrics.json",
        "model/config.json",
        "model/model.safetensors",
        "checkpoints/last.ckpt",
        "confusion_matrix.png",
    ):
        assert (out / path).exists(), path
    metrics = json.loads((out / "metrics.json").read_text())
    teacher = json.loads((root / "teacher" / "metrics.json").read_text())
    # Same weights, split, precision and length-sorted batches: the cached logits give the teacher's accuracy.
    assert metrics["teacher/test/acc"] == pytest.approx(teacher["test/acc"], abs=1e-6)
    assert metrics["teacher/params"] > metrics["train/total_params"]
    for key in ("test/acc", "train/kd_epoch", "train/ce_epoch", "distill/cache_fill_seconds"):
        assert isinstance(metrics[key], float), key
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["distilled_from"]["keep_layers"] == [1]
    assert "Teacher outputs [sentiment/train]: 32/32 examples" in stdout


def test_student_checkpoint_loads_like_its_exported_model(runs):
    out = runs[0] / "student"
    best = json.loads((out / "metrics.json").read_text())["best_checkpoint"]
    from_ckpt, tok, names = load_saved(best)
    exported, _, _ = load_saved(out / "model")
    enc = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(from_ckpt.eval()(**enc).logits, exported.eval()(**enc).logits)
    assert names == ["negative", "positive"] and len(from_ckpt.model.layers) == 1


def test_a_second_run_reuses_the_cache_without_running_the_teacher(runs, tmp_path, capsys):
    from llm_lightning.train import train

    root = runs[0]
    cfg = make_cfg(
        tmp_path,
        [
            "distill=kd",
            f"distill.teacher={root / 'teacher' / 'model'}",
            "distill.student.num_layers=1",
            f"distill.cache.dir={root / 'cache'}",
            "distill.alpha=0.9",
            "distill.temperature=4",
            "export=false",
        ],
    )
    metrics, objects = train(cfg)
    callback = next(c for c in objects["trainer"].callbacks if isinstance(c, KnowledgeDistillation))
    assert callback.cache_fill_seconds == 0 and callback.teacher is None
    assert "read from" in capsys.readouterr().out
    assert metrics["distill/alpha"] == pytest.approx(0.9) and metrics["distill/temperature"] == pytest.approx(
        4.0
    )
    assert (root / "cache" / callback.ref.sha256[:16]).is_dir()
    assert "teacher_sha256" not in cfg.distill and cfg.distill.student.keep_layers is None  # config untouched


@pytest.mark.parametrize(
    ("experiment", "prune", "check"),
    [
        (
            "distill_depth",
            "prune.remove_layers=1",
            lambda c: c["num_hidden_layers"] == 1 and len(c["kept_layers"]) == 1,
        ),
        ("distill_mlp", "prune.mlp_sparsity=0.5", lambda c: c["num_hidden_layers"] == 2),
    ],
)
def test_prune_then_distil_experiments_shrink_the_student_and_train_it_under_the_teacher(
    runs, tmp_path, experiment, prune, check
):
    from llm_lightning.train import train

    root = runs[0]
    teacher = load_saved(root / "teacher" / "model")[0]
    cfg = make_cfg(
        tmp_path,
        [
            f"experiment={experiment}",
            f"distill.teacher={root / 'teacher' / 'model'}",
            f"distill.cache.dir={root / 'cache'}",
            prune,
            "prune.batches=2",
            "trainer.max_epochs=1",
            "distill.transfer.limit=8",  # distill_mlp ships with the IMDB transfer set
        ],
    )
    metrics, _ = train(cfg)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert check(config), config
    assert config["distilled_from"]["keep_layers"] == [0, 1]  # a full copy first; pruning made it smaller
    assert metrics["train/total_params"] < sum(p.numel() for p in teacher.parameters())
    assert isinstance(metrics["train/kd_epoch"], float) and isinstance(metrics["teacher/test/acc"], float)
    if experiment == "distill_mlp":
        assert config["intermediate_size"] == teacher.config.intermediate_size // 2


def test_a_transfer_set_is_labeled_by_the_teacher_and_trained_on_with_kd_only(runs, tmp_path, capsys):
    from llm_lightning.train import train

    root = runs[0]
    texts = tmp_path / "unlabeled.txt"
    texts.write_text(
        "\n".join(f"an unlabeled review sentence number {i}" for i in range(24)), encoding="utf-8"
    )
    cfg = make_cfg(
        tmp_path,
        [
            "distill=kd",
            f"distill.teacher={root / 'teacher' / 'model'}",
            "distill.student.num_layers=1",
            f"distill.cache.dir={tmp_path / 'cache'}",
            "distill.transfer.source=file",
            f"distill.transfer.path={texts}",
            "export=false",
        ],
    )
    metrics, objects = train(cfg)
    out = capsys.readouterr().out
    train_split = objects["datamodule"].splits["train"]
    assert "Transfer set (file): 24 unlabeled texts" in out
    assert f"Teacher outputs [sentiment/train]: {len(train_split)}/{len(train_split)} examples" in out
    assert train_split.labels[-24:] == [-100] * 24 and -100 not in train_split.labels[:-24]
    for key in ("train/acc", "train/kd_epoch", "train/ce_epoch", "test/acc"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
