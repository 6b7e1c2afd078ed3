"""Data provenance travels with every model, and a model is never scored on other splits silently."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from llm_lightning.data import load_task
from llm_lightning.data.provenance import check_split, fingerprint, provenance
from llm_lightning.data.tasks import Split
from llm_lightning.errors import SplitMismatchError
from llm_lightning.evaluate import evaluate
from llm_lightning.train import train
from tests.conftest import CONF, make_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model fine-tuned on a small CSV with seed 42 (its own seeded 80/10/10 split)."""
    root = tmp_path_factory.mktemp("provenance")
    csv = root / "reviews.csv"
    rows = ["text,label"] + [f'"{"great" if i % 2 else "dull"} film number {i}",{i % 2}' for i in range(80)]
    csv.write_text("\n".join(rows) + "\n")
    cfg = make_cfg(root / "run", ["task=csv", f"task.path={csv}", "seed=42", "runtime.threads=1"])
    train(cfg)
    return root, csv, cfg


def eval_cfg(root, csv, *extra):
    """conf/evaluate.yaml as the command line composes it (it has no `model=` or `debug=` group)."""
    overrides = ["task=csv", f"task.path={csv}", f"model_path={root / 'run' / 'model'}", *extra]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = tempfile.mkdtemp(dir=root, prefix="eval-")
    return cfg


def test_the_exported_model_and_the_run_carry_training_json(trained):
    root, csv, cfg = trained
    record = json.loads((root / "run" / "model" / "training.json").read_text())
    assert record == json.loads((root / "run" / "training.json").read_text())
    data = load_task(cfg.task, 42)
    assert record["task"] == "csv" and record["seed"] == 42
    assert record["sizes"] == {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
    assert record["fingerprints"]["test"] == fingerprint(data.test)
    assert record["source"]["kind"] == "file" and len(record["source"]["sha256"]["path"]) == 64


def test_evaluate_with_the_training_seed_passes(trained):
    root, csv, _ = trained
    metrics = evaluate(eval_cfg(root, csv, "seed=42"))
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_evaluate_with_another_seed_is_refused_naming_both_seeds(trained):
    root, csv, _ = trained
    cfg = eval_cfg(root, csv, "seed=7")
    with pytest.raises(
        SplitMismatchError, match=r"\(val, test differ\).*seed 42.*seed 7.*allow_split_mismatch=true"
    ):
        evaluate(cfg)
    assert not (Path(cfg.output_dir) / "metrics.json").exists()


def test_evaluate_on_another_csv_is_refused(trained, tmp_path):
    root, csv, _ = trained
    other = tmp_path / "other.csv"
    other.write_text(csv.read_text().replace(" film ", " movie "))  # the same rows, other texts
    with pytest.raises(SplitMismatchError, match=r"\(val, test, source differ\).*other\.csv \(sha256"):
        evaluate(eval_cfg(root, other, "seed=42"))


def test_allow_split_mismatch_proceeds_with_a_warning(trained, caplog):
    root, csv, _ = trained
    with caplog.at_level(logging.WARNING):
        evaluate(eval_cfg(root, csv, "seed=7", "allow_split_mismatch=true"))
    assert "allow_split_mismatch=true" in caplog.text


def test_a_checkpoint_is_checked_against_its_run(trained):
    root, csv, _ = trained
    ckpt = next((root / "run" / "checkpoints").glob("*.ckpt"))
    cfg = eval_cfg(root, csv, "seed=7")
    with open_dict(cfg):
        cfg.model_path = str(ckpt)
    with pytest.raises(SplitMismatchError):
        evaluate(cfg)


def test_a_model_without_training_json_gets_a_warning(tmp_path, caplog):
    cfg = make_cfg(tmp_path, []).task
    data = load_task(cfg, 0)
    (tmp_path / "model").mkdir()
    with caplog.at_level(logging.WARNING):
        check_split(tmp_path / "model", cfg, 0, data)
    assert "has no training.json" in caplog.text


def test_quantize_refuses_a_mismatch_before_writing_anything(trained):
    from llm_lightning.quantize import quantize_run

    root, csv, _ = trained
    cfg = make_cfg(root / "q", ["task=csv", f"task.path={csv}", "seed=3", "quantize=int8_weight_only"])
    with pytest.raises(SplitMismatchError):
        quantize_run(cfg, root / "q", root / "run" / "model")
    assert not (root / "q" / "quantized").exists()


def test_the_quantized_folder_carries_the_input_models_record(trained):
    from llm_lightning.quantize import quantize_run

    root, csv, _ = trained
    cfg = make_cfg(
        root / "q2",
        [
            "task=csv",
            f"task.path={csv}",
            "seed=42",
            "quantize=int8_weight_only",
            "bench=quick",
            "runtime.threads=1",
        ],
    )
    quantize_run(cfg, root / "q2", root / "run" / "model")
    saved = json.loads((root / "q2" / "quantized" / "training.json").read_text())
    assert saved == json.loads((root / "run" / "model" / "training.json").read_text())


def test_fingerprint_ignores_order_but_not_a_changed_label():
    a = Split(["x", "y"], [0, 1])
    assert fingerprint(a) == fingerprint(Split(["y", "x"], [1, 0]))
    assert fingerprint(a) != fingerprint(Split(["x", "y"], [1, 1]))


def test_the_transfer_set_is_not_in_the_train_fingerprint(tmp_path):
    from llm_lightning.data.tasks import TaskData
    from llm_lightning.data.transfer import UNLABELED

    cfg = make_cfg(tmp_path, []).task
    data = load_task(cfg, 0)
    plus = TaskData(
        Split(data.train.texts + ["extra"], data.train.labels + [UNLABELED]),
        data.val,
        data.test,
        data.label_names,
    )
    assert provenance(cfg, 0, plus)["fingerprints"] == provenance(cfg, 0, data)["fingerprints"]
