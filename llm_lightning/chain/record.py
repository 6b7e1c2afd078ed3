"""What a compress stage was made from (`<stage>/stage.json`), and whether a rerun may reuse it.

A stage's fingerprint is the sha256 of its composed config, resolved, less the values that only say
where the run writes or how it is watched (`UNFINGERPRINTED`; paths under the chain's `out` are
written relative to it), plus the fingerprints of the stages it reads from: a change upstream
changes the fingerprint of every stage below it. The record is written when the stage starts
(`running`: an interrupted stage can tell whether its last.ckpt was made with today's settings)
and again once its output is written (`done`). It keeps the settings too, so a rerun can say
which ones changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llm_lightning.artifacts import write_json

RECORD = "stage.json"
RUNNING, DONE = "running", "done"
REUSE, RESUME, TRAIN = "reuse", "resume", "train"
STALE = ".stale"  # `<stage>.stale`: the previous folder, kept until the new output is written

# Where a stage writes, how it is shown and how fast it runs, not what it makes: changing these
# reuses the stage. `bench` and `quantize` are the report's and the quantized stage's (compress
# sets a training stage's quantize to none); `ckpt_path` is compress's own resume switch.
UNFINGERPRINTED = (
    "output_dir",
    "ckpt_path",
    "runtime",
    "logger",
    "bench",
    "quantize",
    "callbacks.progress_bar",
    "callbacks.lr_monitor",
    "callbacks.throughput",
)


@dataclass(frozen=True)
class Fingerprint:
    """A stage's settings (dotted key -> resolved value, as JSON stores them) and its inputs
    (stage read from -> that stage's fingerprint)."""

    settings: dict[str, Any]
    inputs: dict[str, str]

    @property
    def value(self) -> str:
        text = json.dumps({"settings": self.settings, "inputs": self.inputs}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Decision:
    action: str  # REUSE, RESUME or TRAIN
    reason: str
    changed: bool = False  # made before with other settings or inputs: every stage reading it changes too


def settings_of(cfg: DictConfig, out: Path, drop: tuple[str, ...] = UNFINGERPRINTED) -> dict[str, Any]:
    """`cfg` resolved and flattened to dotted keys, without `drop` (keys and what is under them)."""
    flat = _flatten(OmegaConf.to_container(cfg, resolve=True), "")
    kept = {
        k: _portable(v, str(out))
        for k, v in flat.items()
        if not any(k == d or k.startswith(d + ".") for d in drop)
    }
    return json.loads(json.dumps(kept, default=str))  # as the record will read back: lists, not tuples


def _flatten(node: Any, key: str) -> dict[str, Any]:
    if not isinstance(node, dict) or not node:
        return {key: node}
    return {
        k: v
        for name, child in node.items()
        for k, v in _flatten(child, f"{key}.{name}" if key else str(name)).items()
    }


def _portable(value: Any, out: str) -> Any:
    """Paths under the chain's folder as `<out>/...`: the same chain moved elsewhere is the same."""
    if isinstance(value, str) and (value == out or value.startswith(out + os.sep)):
        return "<out>" + value[len(out) :]
    if isinstance(value, list):
        return [_portable(v, out) for v in value]
    return value


def read_record(folder: Path) -> dict | None:
    path = Path(folder) / RECORD
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # none, or cut short by a crash mid-write (write_json is atomic; a copy may not be)


def write_record(folder: Path, status: str, fingerprint: Fingerprint) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json(
        Path(folder) / RECORD,
        {
            "status": status,
            "fingerprint": fingerprint.value,
            "inputs": fingerprint.inputs,
            "settings": fingerprint.settings,
        },
    )


def decide(folder: Path, fingerprint: Fingerprint, output: Path, checkpoint: Path | None = None) -> Decision:
    """Reuse `folder` (its record is done with this fingerprint and `output` exists), resume it (its
    record is running with this fingerprint and `checkpoint` exists), or train it afresh, and why."""
    record = read_record(folder)
    same = record is not None and record.get("fingerprint") == fingerprint.value
    status = record.get("status") if record else None
    if same and status == DONE and output.exists():
        return Decision(REUSE, "unchanged since its last run")
    if same and status == RUNNING and checkpoint is not None and checkpoint.is_file():
        return Decision(RESUME, f"interrupted with the same settings: resuming from {checkpoint}")
    if not Path(folder).exists():
        return Decision(TRAIN, "not made yet")
    if record is None:
        why = f"no {RECORD} in {folder} (made before compress recorded settings?): its settings are unknown"
    elif not same:
        run = "last" if status == DONE else "interrupted"
        return Decision(TRAIN, f"changed since its {run} run ({changes(record, fingerprint)})", changed=True)
    elif status == RUNNING:
        why = "interrupted before its first checkpoint"
    else:
        why = f"{output} is missing"
    return Decision(TRAIN, why)


def changes(record: dict, fingerprint: Fingerprint, shown: int = 4) -> str:
    """The settings and inputs that differ between a record and a fingerprint, in words."""
    old, new = record.get("settings") or {}, fingerprint.settings
    unset = "(unset)"
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, unset) != new.get(k, unset))
    parts = [f"{k}: {old.get(k, unset)!r} -> {new.get(k, unset)!r}" for k in keys[:shown]]
    if len(keys) > shown:
        parts.append(f"{len(keys) - shown} more")
    old_inputs = record.get("inputs") or {}
    inputs = sorted(
        n
        for n in old_inputs.keys() | fingerprint.inputs.keys()
        if old_inputs.get(n) != fingerprint.inputs.get(n)
    )
    if inputs:
        parts.append(f"its input {', '.join(inputs)} changed")
    return "; ".join(parts) or "the record's fingerprint differs"


def set_aside(folder: Path) -> Path | None:
    """Move `folder` to `<folder>.stale` (replacing an older one) so a fresh run starts empty while
    the previous output stays on disk until the new one is written. Returns where it went."""
    folder = Path(folder)
    if not folder.exists():
        return None
    aside = folder.with_name(folder.name + STALE)
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    return aside


def discard_aside(folder: Path) -> None:
    """Remove `<folder>.stale` once `folder` holds a finished stage again."""
    shutil.rmtree(Path(folder).with_name(Path(folder).name + STALE), ignore_errors=True)
