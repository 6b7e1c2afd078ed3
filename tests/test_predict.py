"""`predict` batches texts of similar length together and still answers in the order given; its
command line (conf/predict.yaml) prints one JSON row per text."""

from __future__ import annotations

import json

import pytest

from llm_lightning import predict as predict_module
from llm_lightning.models.export import export_model
from llm_lightning.models.saved import load_saved
from llm_lightning.predict import predict
from tests.conftest import run_module

TEXTS = [
    "a long and winding sentence about a film that goes on",
    "ok",
    "dull film",
    "a gorgeous, moving film",
    "no",
]


@pytest.mark.parametrize("batch_size", [2, 3])
def test_sorted_batches_give_each_text_its_own_answer_in_input_order(tiny, monkeypatch, batch_size):
    model, tokenizer = tiny
    names = ["negative", "positive"]
    one_at_a_time = [row["probs"] for text in TEXTS for row in predict(model, tokenizer, names, [text], 1)]
    # the texts' answers differ by more than the tolerance below, so a row given the wrong text fails
    firsts = [alone["negative"] for alone in one_at_a_time]
    assert min(abs(a - b) for i, a in enumerate(firsts) for b in firsts[i + 1 :]) > 2e-4
    monkeypatch.setattr(predict_module, "WINDOW_BATCHES", 1)  # several windows of batch_size texts
    rows = list(predict(model, tokenizer, names, TEXTS, batch_size))
    assert [r["text"] for r in rows] == TEXTS
    for row, alone in zip(rows, one_at_a_time, strict=True):
        assert row["probs"] == pytest.approx(alone, abs=1e-4)


def test_the_command_line_labels_texts_then_a_file_in_the_order_given(tiny, tmp_path):
    """`text` (one, or a list) and `file` (one text per line, in its `encoding`), as Hydra reads them:
    each printed row is what `predict` gives the saved model for that text."""
    model, tokenizer = tiny
    folder = export_model(model, tokenizer, tmp_path / "model")
    reviews = tmp_path / "reviews.txt"
    reviews.write_bytes("un film étonnant\n\nnot for me, sadly\n".encode("latin-1"))
    given = ["a gorgeous, moving film", "dull"]
    listed = run_module(
        "llm_lightning.predict",
        f"model_path={folder}",
        'text=["a gorgeous, moving film","dull"]',
        f"file={reviews}",
        "encoding=latin-1",
        "batch_size=2",
    )
    one = run_module("llm_lightning.predict", f"model_path={folder}", 'text="a gorgeous, moving film"')
    saved, saved_tokenizer, names = load_saved(folder)
    for done, texts in ((listed, [*given, "un film étonnant", "not for me, sadly"]), (one, given[:1])):
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(line) for line in done.stdout.splitlines()]  # stdout holds the rows only
        expected = list(predict(saved, saved_tokenizer, names, texts))
        assert [r["text"] for r in rows] == texts
        assert [r["label"] for r in rows] == [r["label"] for r in expected]
        for row, want in zip(rows, expected, strict=True):
            assert row["probs"] == pytest.approx(want["probs"], abs=1e-6)
