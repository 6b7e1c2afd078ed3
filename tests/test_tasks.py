"""Tasks: the real movie-review CSV, a user's files, and every kind of bad input."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from omegaconf import OmegaConf

from llm_lightning.data import TaskDataError, load_task

CSV_TASK = dict(
    name="csv",
    source="file",
    text_column="text",
    label_column="sentiment",
    labels=None,
    encoding="utf-8",
    val_path=None,
    test_path=None,
    split=[0.8, 0.1, 0.1],
    limit=None,
)


def task(**kw):
    return OmegaConf.create({**CSV_TASK, **kw})


def test_rotten_tomatoes_is_balanced_and_split_80_10_10():
    cfg = OmegaConf.load("conf/task/sentiment.yaml")
    data = load_task(cfg, seed=42)
    assert (len(data.train), len(data.val), len(data.test)) == (6824, 852, 854)
    assert len(data.train) + len(data.val) + len(data.test) == 8530
    for split in (data.train, data.val, data.test):  # stratified: both classes within one example
        counts = Counter(split.labels)
        assert abs(counts[0] - counts[1]) <= 1
    assert data.label_names == ["negative", "positive"]
    again = load_task(cfg, seed=42)
    assert again.test.texts == data.test.texts  # seeded
    other = load_task(cfg, seed=7)
    assert other.test.texts != data.test.texts


def test_imdb_has_25000_reviews():
    data = load_task(OmegaConf.load("conf/task/imdb.yaml"), seed=0)
    assert len(data.train) + len(data.val) + len(data.test) == 25000
    assert max(len(t) for t in data.train.texts) > 2000  # long reviews; max_length truncates them


def test_csv_with_string_labels(reviews_csv):
    data = load_task(task(path=str(reviews_csv)), seed=0)
    assert data.label_names == ["neg", "neu", "pos"]
    assert len(data.train) == 48 and len(data.val) == 6 and len(data.test) == 6


def test_csv_labels_option_fixes_order(reviews_csv):
    data = load_task(task(path=str(reviews_csv), labels=["pos", "neu", "neg"]), seed=0)
    assert data.label_names == ["pos", "neu", "neg"]
    i = data.train.texts.index(next(t for t in data.train.texts if t.startswith("great")))
    assert data.train.labels[i] == 0


def test_integer_labels_sort_numerically(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tsentiment\n" + "".join(f"t{i}\t{i % 11}\n" for i in range(110)))
    data = load_task(task(path=str(path)), seed=0)
    assert data.label_names == [str(i) for i in range(11)]


def test_jsonl_with_separate_val_and_test(tmp_path):
    for name, n in (("train", 20), ("val", 4), ("test", 6)):
        rows = [{"text": f"{name} {i}", "sentiment": ["a", "b"][i % 2]} for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_task(
        task(
            path=str(tmp_path / "train.jsonl"),
            val_path=str(tmp_path / "val.jsonl"),
            test_path=str(tmp_path / "test.jsonl"),
        ),
        seed=0,
    )
    assert (len(data.train), len(data.val), len(data.test)) == (20, 4, 6)


def test_missing_column_names_it_and_lists_the_columns(reviews_csv):
    with pytest.raises(TaskDataError) as e:
        load_task(task(path=str(reviews_csv), text_column="review"), seed=0)
    msg = str(e.value)
    assert "'review'" in msg and "task.text_column" in msg and "['text', 'sentiment']" in msg


def test_label_not_in_task_labels(reviews_csv):
    with pytest.raises(TaskDataError) as e:
        load_task(task(path=str(reviews_csv), labels=["pos", "neg"]), seed=0)
    msg = str(e.value)
    assert "'neu'" in msg and "['pos', 'neg']" in msg and "task.labels" in msg and "row 3" in msg


def test_empty_texts_are_dropped_with_a_count(tmp_path, caplog):
    path = tmp_path / "d.csv"
    path.write_text(
        "text,sentiment\n" + "".join(f'"{"   " if i % 5 == 0 else f"t{i}"}",{i % 2}\n' for i in range(100))
    )
    data = load_task(task(path=str(path)), seed=0)
    assert len(data.train) + len(data.val) + len(data.test) == 80
    assert "dropped 20 empty or whitespace-only texts" in caplog.text


def test_a_split_left_empty_is_an_error(tmp_path):
    (tmp_path / "train.csv").write_text("text,sentiment\na,x\nb,y\n")
    (tmp_path / "val.csv").write_text("text,sentiment\na,x\n")
    (tmp_path / "test.csv").write_text('text,sentiment\n" ",x\n')
    with pytest.raises(TaskDataError, match="no texts left"):
        load_task(
            task(
                path=str(tmp_path / "train.csv"),
                val_path=str(tmp_path / "val.csv"),
                test_path=str(tmp_path / "test.csv"),
            ),
            seed=0,
        )


def test_undecodable_bytes_name_file_offset_and_encoding(tmp_path):
    path = tmp_path / "latin.csv"
    rows = "".join(f"ok {i},{'ab'[i % 2]}\n" for i in range(20))
    path.write_bytes(("text,sentiment\ncaf\u00e9 au lait,a\n" + rows).encode("latin-1"))
    with pytest.raises(TaskDataError) as e:
        load_task(task(path=str(path)), seed=0)
    msg = str(e.value)
    assert str(path) in msg and "offset 18" in msg and "task.encoding='utf-8'" in msg
    data = load_task(task(path=str(path), encoding="latin-1"), seed=0)
    assert "café au lait" in data.train.texts + data.val.texts + data.test.texts


def test_missing_file_and_bad_split_fractions(tmp_path, reviews_csv):
    with pytest.raises(TaskDataError, match="not found"):
        load_task(task(path=str(tmp_path / "nope.csv")), seed=0)
    with pytest.raises(TaskDataError, match="three positive fractions"):
        load_task(task(path=str(reviews_csv), split=[0.9, 0.2, 0.1]), seed=0)
