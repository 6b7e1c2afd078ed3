"""Read a user's table (CSV, TSV or JSON Lines) into rows, with errors that name the file and the byte."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path


class TaskDataError(ValueError):
    """The task's data cannot be used as configured; the message says what to change."""


FORMATS = (".csv", ".tsv", ".jsonl", ".json")


def read_rows(path: str | Path, encoding: str = "utf-8") -> list[dict]:
    """Rows of a .csv, .tsv or .jsonl file as dicts keyed by column name."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TaskDataError(
            f"Data file not found: {path} (config key task.path / task.val_path / task.test_path)."
        )
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise TaskDataError(f"Unsupported data file type {suffix!r} for {path}; use one of {FORMATS}.")
    text = decode(path.read_bytes(), path, encoding)
    if suffix in (".jsonl", ".json"):
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"{path}, line {lineno}: not valid JSON ({e.msg}).") from e
        return rows
    delimiter = "\t" if suffix == ".tsv" else ","
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))


def decode(data: bytes, path: Path, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except LookupError as e:
        raise TaskDataError(f"Unknown text encoding task.encoding={encoding!r} for {path}.") from e
    except UnicodeDecodeError as e:
        raise TaskDataError(
            f"{path}: bytes at offset {e.start} ({data[e.start : e.start + 4]!r}) do not decode as "
            f"task.encoding={encoding!r} ({e.reason}). Set task.encoding to the file's encoding "
            "(e.g. task.encoding=latin-1) or re-save the file as UTF-8."
        ) from e


def require_columns(rows: list[dict], columns: dict[str, str], path: str | Path) -> None:
    """Fail with the missing column, the config key that names it, and the columns found."""
    found = list(rows[0].keys()) if rows else []
    for key, column in columns.items():
        if column not in found:
            raise TaskDataError(
                f"Column {column!r} (config key {key}) not found in {path}. Columns found: {found}."
            )
