"""`predict` batches texts of similar length together and still answers in the order given."""

from __future__ import annotations

import pytest

from llm_lightning import predict as predict_module
from llm_lightning.predict import predict

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
