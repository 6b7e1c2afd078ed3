"""The distillation transfer set: unlabeled texts the teacher labels, that only the KD term learns from."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaForSequenceClassification

from llm_lightning.data import Split, TaskData, TaskDataError
from llm_lightning.data.transfer import UNLABELED, review_sentences, transfer_texts, with_transfer_set
from llm_lightning.models.tiny import tiny_config
from llm_lightning.module import SequenceClassifier
from tests.conftest import make_cfg


def cfg(**kw):
    base = {"source": "file", "path": None, "limit": 100, "min_words": 2, "max_words": 6}
    return OmegaConf.create({**base, **kw})


def test_review_sentences_split_clean_filter_and_dedupe():
    reviews = [
        "Great fun.<br /><br />I loved it! Too long? Yes.",
        "I loved it! The plot never ends and ends and ends.",
    ]
    got = review_sentences(reviews, min_words=2, max_words=6)
    assert got == ["Great fun.", "I loved it!", "Too long?"]


def test_transfer_texts_from_a_file_are_sampled_without_the_tasks_texts(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text(
        "a good film\n\nheld out test text\nthe worst\na good film\nquite dull\n", encoding="utf-8"
    )
    got = transfer_texts(cfg(path=str(path), limit=10), seed=0, exclude={"held out test text"})
    assert sorted(got) == ["a good film", "quite dull", "the worst"]
    assert transfer_texts(cfg(path=str(path), limit=2), seed=0, exclude=set()) == transfer_texts(
        cfg(path=str(path), limit=2), seed=0, exclude=set()
    )
    assert len(transfer_texts(cfg(path=str(path), limit=2), seed=0, exclude=set())) == 2


def test_start_continues_the_same_sample_where_a_run_with_that_limit_stopped(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(f"text number {i}" for i in range(20)), encoding="utf-8")
    first = transfer_texts(cfg(path=str(path), limit=6), seed=3, exclude=set())
    then = transfer_texts(cfg(path=str(path), limit=6, start=6), seed=3, exclude=set())
    both = transfer_texts(cfg(path=str(path), limit=12), seed=3, exclude=set())
    assert len(then) == 6 and not set(first) & set(then)
    assert first + then == both
    with pytest.raises(TaskDataError, match="start=20 skips all 20 texts.*below 20"):
        transfer_texts(cfg(path=str(path), limit=6, start=20), seed=3, exclude=set())


def test_with_transfer_set_appends_unlabeled_rows_to_train_only(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("x y\nz w\n", encoding="utf-8")
    data = TaskData(Split(["a b"], [1]), Split(["c d"], [0]), Split(["e f"], [1]), ["neg", "pos"])
    out = with_transfer_set(data, cfg(path=str(path)), seed=0)
    assert out.train.texts[0] == "a b" and sorted(out.train.texts[1:]) == ["x y", "z w"]
    assert out.train.labels == [1, UNLABELED, UNLABELED]
    assert out.val is data.val and out.test is data.test


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"source": "web"}, r"distill.transfer.source='web' is not one of \('imdb_sentences', 'file'\)"),
        ({"path": None}, "needs distill.transfer.path"),
        ({"path": "/nonexistent/texts.txt"}, "does not exist"),
        ({"path": "x", "limit": 0}, "distill.transfer.limit=0 must be an integer >= 1"),
        ({"path": "x", "start": -1}, "distill.transfer.start=-1 must be an integer >= 0"),
    ],
)
def test_bad_transfer_settings_say_what_to_change(kw, message):
    with pytest.raises(TaskDataError, match=message):
        transfer_texts(cfg(**kw), seed=0, exclude=set())


def test_ce_skips_unlabeled_rows_and_a_batch_of_only_those_gives_zero():
    config = tiny_config(300)
    config.num_labels = 2
    model = LlamaForSequenceClassification(config)
    module = SequenceClassifier(
        model, ["neg", "pos"], {"lr": 1e-4}, {"name": "constant_with_warmup", "warmup_ratio": 0}
    )
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, UNLABELED, 1])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    torch.testing.assert_close(module.loss(logits, {"labels": labels}), expected)
    none = module.loss(logits, {"labels": torch.full((3,), UNLABELED)})
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_alpha_zero_with_a_transfer_set_is_an_error(tmp_path):
    from llm_lightning.train import build

    text = tmp_path / "t.txt"
    text.write_text("some text\n", encoding="utf-8")
    bad = make_cfg(
        tmp_path,
        [
            "distill=kd",
            "distill.teacher=/unused",
            "distill.alpha=0",
            "distill.transfer.source=file",
            f"distill.transfer.path={text}",
        ],
    )
    with pytest.raises(ValueError, match="distill.alpha=0 gives them no loss"):
        build(bad)
