"""Read a user's table (CSV, TSV or JSON Lines) into rows, with errors that name the file and the byte."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from llm_lightning.errors import UserError


class TaskDataError(UserError):
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


def decode(data: bytes, path: Path, encoding: str, key: str = "task.encoding") -> str:
    """`data` as text, or an error that names the file, the byte offset and the config key."""
    try:
        return data.decode(encoding)
    except LookupError as e:
        raise TaskDataError(f"Unknown text encoding {key}={encoding!r} for {path}.") from e
    except UnicodeDecodeError as e:
        raise TaskDataError(
            f"{path}: bytes at offset {e.start} ({data[e.start : e.start + 4]!r}) do not decode as "
            f"{key}={encoding!r} ({e.reason}). Set {key} to the file's encoding "
            f"(e.g. {key}=latin-1) or re-save the file as UTF-8."
        ) from e


def require_columns(rows: list, columns: dict[str, str], path: str | Path) -> None:
    """Fail with the first row that lacks a column, the config key that names it, and the columns
    found; every row is checked (a JSON Lines file can change its keys from one line to the next)."""
    first = list(rows[0].keys()) if rows and isinstance(rows[0], dict) else []
    for lineno, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise TaskDataError(
                f"{path}, row {lineno}: expected an object with columns {sorted(columns.values())}, "
                f"got {type(row).__name__} {str(row)[:60]!r}."
            )
        for key, column in columns.items():
            if column not in row:
                where = f"{path}" if lineno == 1 else f"{path}, row {lineno}"
                raise TaskDataError(
                    f"Column {column!r} (config key {key}) not found in {where}. "
                    f"Columns found: {list(row.keys()) if lineno > 1 else first}."
                )
