"""User errors read like errors: through the real command line, each bad input prints one short
message naming the value and the key, exits with status 2, and prints no traceback."""

from __future__ import annotations

import json
import os

import pytest

from llm_lightning.errors import UserError
from llm_lightning.runtime import user_errors
from tests.conftest import run_module

TINY = ["model=tiny", "debug=smoke", "runtime.threads=1"]


def assert_user_error(done, *needles: str) -> None:
    shown = done.stdout + done.stderr
    assert done.returncode == 2, shown[-3000:]
    assert "Traceback" not in shown, shown[-3000:]
    for needle in needles:
        assert needle in shown, (needle, shown[-3000:])


def train(tmp_path, *args: str, **kwargs):
    return run_module("llm_lightning.train", *TINY, f"hydra.run.dir={tmp_path / 'run'}", *args, **kwargs)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["finetune=bogus"], ["finetune", "bogus", "full"]),  # an unknown choice: Hydra lists the options
        (["reciep=3"], ["reciep"]),  # an unknown key
        (["finetune.method=bogus"], ["finetune.method='bogus'", "gradual_unfreeze"]),  # a bad value
    ],
)
def test_train_refuses_bad_config_with_a_message_and_status_2(tmp_path, args, needles):
    assert_user_error(train(tmp_path, *args), *needles)
    assert not (tmp_path / "run" / "model").exists()


def test_a_bad_row_after_the_first_in_jsonl_names_the_row(tmp_path):
    data = tmp_path / "reviews.jsonl"
    rows = [{"text": f"film {i}", "label": "pos" if i % 2 else "neg"} for i in range(6)]
    rows[3] = {"review": "no text column here", "label": "pos"}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = train(tmp_path, "task=csv", f"task.path={data}")
    assert_user_error(done, "row 4", "'text'", "task.text_column")


def test_an_undecodable_transfer_set_names_the_offset_and_the_key(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"a fine film\nca\xe9t\xe9 un film\n")
    done = train(
        tmp_path,
        "distill=kd",
        f"distill.teacher={tmp_path / 'no-teacher-needed-yet'}",
        "distill.transfer.source=file",
        f"distill.transfer.path={texts}",
    )
    assert_user_error(done, "offset 14", "distill.transfer.encoding")


def test_evaluate_without_a_model_and_with_a_missing_one(tmp_path):
    run_dir = f"hydra.run.dir={tmp_path / 'eval'}"
    assert_user_error(run_module("llm_lightning.evaluate", run_dir), "model_path")
    missing = tmp_path / "nowhere" / "model"
    assert_user_error(
        run_module("llm_lightning.evaluate", f"model_path={missing}", run_dir), str(missing), "model/"
    )


def test_quantize_refuses_an_unknown_method_before_reading_the_model(tmp_path):
    done = run_module(
        "llm_lightning.quantize",
        f"model_path={tmp_path / 'model'}",
        "quantize.method=int3",
        f"hydra.run.dir={tmp_path / 'q'}",
    )
    assert_user_error(done, "quantize.method='int3'", "int8_dynamic")


def test_predict_names_a_missing_or_undecodable_file(tmp_path):
    missing = tmp_path / "reviews.txt"
    done = run_module("llm_lightning.predict", f"model_path={tmp_path / 'model'}", f"file={missing}")
    assert_user_error(done, f"file={missing}: no such file")
    missing.write_bytes(b"good\n\xff\xfe bad bytes\n")
    done = run_module("llm_lightning.predict", f"model_path={tmp_path / 'model'}", f"file={missing}")
    assert_user_error(done, "offset 5", "encoding=latin-1")


def test_predict_without_texts_or_a_model(tmp_path):
    done = run_module("llm_lightning.predict", f"model_path={tmp_path / 'model'}")
    assert_user_error(done, "predict has no texts", "text=", "file=FILE")
    assert_user_error(run_module("llm_lightning.predict", "text=dull"), "model_path")
    done = run_module("llm_lightning.predict", "text=dull", "txet=dull")  # an unknown key: Hydra's refusal
    assert_user_error(done, "Could not override 'txet'")


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    done = run_module("llm_lightning.report", f"run_dir={tmp_path}")
    assert_user_error(done, str(tmp_path / ".hydra" / "config.yaml"), "task and seed")
    assert list(tmp_path.iterdir()) == []  # nothing written there, no .hydra/ of its own
    assert_user_error(run_module("llm_lightning.report"), "run_dir")


def test_hydra_full_error_still_shows_the_traceback(tmp_path):
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        done = train(tmp_path, "finetune.method=bogus")
    finally:
        del os.environ["HYDRA_FULL_ERROR"]
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "finetune.method='bogus'" in done.stderr


def test_a_bug_is_not_a_user_error(capsys):
    @user_errors
    def broken():
        raise KeyError("a bug")

    @user_errors
    def refused():
        raise UserError("bad value x (config key y)")

    with pytest.raises(KeyError):
        broken()
    with pytest.raises(SystemExit) as stop:
        refused()
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: bad value x (config key y)\n"


def test_hf_dataset_unknown_label_names_the_row(tmp_path):
    from omegaconf import OmegaConf

    from llm_lightning.data import load_task
    from llm_lightning.data.readers import TaskDataError

    pytest.importorskip("datasets")
    for name, labels in (("train", ["neg", "pos", "neg", "meh"]), ("validation", ["pos"]), ("test", ["neg"])):
        rows = [{"text": f"{name} {i}", "label": y} for i, y in enumerate(labels)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = OmegaConf.load("conf/task/hf_dataset.yaml")
    cfg.path, cfg.labels = str(tmp_path), ["neg", "pos"]
    with pytest.raises(TaskDataError, match=r"row 4: label 'meh' is not one of \['neg', 'pos'\]"):
        load_task(cfg, seed=0)
