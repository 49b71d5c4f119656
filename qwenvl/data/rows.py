"""Reading rows from JSON and JSON-lines files, with errors that name the file and the line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def load_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a malformed line raises `ValueError` naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: invalid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_json_rows(path: str | os.PathLike) -> list[Any]:
    """The rows of a JSON file holding a list, or of a JSON-lines file (`.jsonl`, one object per line).

    Raises `ValueError` naming the file (and the line, for JSON lines) when it is not valid JSON or not a list.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        return load_jsonl(path)
    try:
        with open(path, encoding="utf-8") as handle:
            rows = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return rows
