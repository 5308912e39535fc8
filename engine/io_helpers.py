"""The project's small file, hashing and formatting helpers, one copy each: JSONL reading (file:line
errors) and appending, the short hash of a JSON-able settings object that names outputs by what made
them, stable integers from strings (seeds that do not change between runs or machines), percentages."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def read_jsonl_objects(path: Path, error: type[ValueError] = ValueError) -> list[tuple[int, dict]]:
    """(line number, object) per non-blank line of a JSONL file, so later field errors can name the
    line. Blank lines hold no record (a trailing newline is common); anything else must be a JSON
    object, or `error` is raised naming file:line. Shared by every JSONL reader of the project."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def read_jsonl(path: Path, error: type[ValueError] = ValueError) -> list[dict]:
    """The objects of a JSONL file ([] when it does not exist yet: a run that has not written it)."""
    path = Path(path)
    if not path.exists():
        return []
    return [row for _, row in read_jsonl_objects(path, error)]


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def settings_hash(settings: Any) -> str:
    """16 hex digits of sha256 over the settings as canonical JSON (sorted keys; non-JSON values by
    str): equal settings, equal hash, on every machine."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stable_int(*parts, sep: str = "/", byteorder: str = "little") -> int:
    """A 32-bit integer from `parts` (sha256 of their joined text): the same on every run and machine,
    unlike hash(). `sep` and `byteorder` only keep the integers each caller has always drawn (the teacher's
    request seeds join with "\x1f", big-endian), so existing prompts and plans stay as they were."""
    return int.from_bytes(hashlib.sha256(sep.join(map(str, parts)).encode()).digest()[:4], byteorder)


def percent(fraction, width: int = 0, missing: str = "n/a") -> str:
    """100·fraction with one decimal, right-aligned in `width`; `missing` for None."""
    return (missing if fraction is None else f"{100 * fraction:.1f}").rjust(width)
