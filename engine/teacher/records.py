"""The teacher's on-disk store: append-only JSONL shards, a manifest, a failures file.

Layout of an output folder:
  manifest.json          configuration (no secrets) and its hash; a resume with another hash is refused
  samples-00000.jsonl    one record per line (fields: RECORD_FIELDS below), append-only
  failures.jsonl         requests that stayed broken after every retry (never written as samples)
  usage.json             the usage ledger, summed over every run into this folder

Crash safety: each batch of records is written with one write(), flushed and fsync'd, so after a
SIGKILL only the last line can be torn. On open, a last line without its newline (or one that is
not valid JSON) is cut off the file, and the (qid, sample_index) keys already present are the
work that is done.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

import msgspec

from specialize.engine.io_helpers import settings_hash

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
USAGE = "usage.json"
SHARD_GLOB = "samples-*.jsonl"

RECORD_FIELDS = ("qid", "sample_index", "prompt_hash", "question", "gold", "dataset", "text", "tokens",
                 "token_bytes", "token_logprobs", "top_logprobs", "finish_reason", "cut", "usage", "model")


class ResumeError(RuntimeError):
    """The output folder holds samples made with another configuration."""


def config_hash(settings: dict) -> str:
    return settings_hash(settings)


def with_legacy_defaults(settings: dict, declared: Optional[str] = None) -> dict:
    """A manifest's settings with the fields added since it was written filled in by what that folder
    holds. teacher.logprobs: an hf folder holds HF_LEGACY_LOGPROBS; a server's folder holds whatever the
    server sent, which only its user knows, so it takes the value now `declared` (raw if none)."""
    from specialize.engine.config import HF_LEGACY_LOGPROBS
    out = dict(settings)
    if "logprobs" not in out and "backend" in out:
        out["logprobs"] = HF_LEGACY_LOGPROBS if out["backend"] == "hf" else (declared or "raw")
    return out


def shard_name(index: int) -> str:
    return f"samples-{index:05d}.jsonl"


def _last_line_start(fh, size: int, chunk: int = 1 << 20) -> int:
    """Offset of the last line of a file ending in "\n" (or of its unfinished tail), read from the end:
    a shard of 100,000 GSM8K records is about 1.6 GB."""
    pos = size
    skip_final_newline = True
    while pos > 0:
        start = max(0, pos - chunk)
        fh.seek(start)
        data = fh.read(pos - start)
        if skip_final_newline and data.endswith(b"\n"):
            data = data[:-1]
        skip_final_newline = False
        cut = data.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


def _drop_torn_tail(path: Path) -> int:
    """Cut an unfinished or unparsable last line off `path`; returns the bytes dropped."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as fh:
        start = _last_line_start(fh, size)
        fh.seek(start)
        last = fh.read()
    # a complete-looking last line can still be garbage if the crash hit mid-sector
    keep = size if last.endswith(b"\n") and _parses(last) else start
    if keep < size:
        with open(path, "r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return size - keep


class _Key(msgspec.Struct):
    """What a resume needs of a record: msgspec skips the rest (the top-k is most of its ~16 KB)."""
    qid: str
    sample_index: int


_KEY_DECODER = msgspec.json.Decoder(_Key)


def iter_record_lines(folder: str | Path) -> Iterator[tuple[Path, int, bytes]]:
    """(shard, byte offset, line) of every record line, streamed; a torn last line is skipped (as by
    iter_records)."""
    for path in sorted(Path(folder).glob(SHARD_GLOB)):
        offset, held = 0, None  # one line of lookahead: only the last line may be torn
        with open(path, "rb") as fh:
            for line in fh:
                if held is not None:
                    yield path, held[0], held[1]
                held = (offset, line) if line.strip() else None
                offset += len(line)
        if held is not None and _parses(held[1]):
            yield path, held[0], held[1]


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def iter_records(folder: str | Path) -> Iterator[dict]:
    """Every record of every shard in order; a torn last line (crashed writer) is skipped."""
    for path in sorted(Path(folder).glob(SHARD_GLOB)):
        with open(path, "rb") as fh:
            lines = fh.read().split(b"\n")
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError:
                if lineno >= len(lines) - 1:  # the last line: torn by a crash, not corrupt data
                    continue
                raise ValueError(f"{path}:{lineno}: not valid JSON") from None


class ShardStore:
    """Append-only sample shards of one output folder, tied to one configuration hash."""

    def __init__(self, folder: str | Path, settings: dict, shard_lines: int = 100_000):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.hash = config_hash(settings)
        self.shard_lines = shard_lines
        self._check_manifest()
        self.done: set[tuple[str, int]] = set()
        self.torn_bytes = 0
        shards = sorted(self.folder.glob(SHARD_GLOB))
        for path in shards:
            self.torn_bytes += _drop_torn_tail(path)
        self._lines = 0
        for path in shards:
            self._lines = 0
            with open(path, "rb") as fh:  # streamed, and only the keys decoded: 300k records are ~5 GB
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        key = _KEY_DECODER.decode(line)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        raise ValueError(f"{path}:{lineno}: corrupt line in the middle of a shard") from None
                    self.done.add((key.qid, key.sample_index))
                    self._lines += 1
        self._shard = len(shards) - 1 if shards else 0
        if self._lines >= shard_lines:
            self._shard, self._lines = self._shard + 1, 0
        self._fh = None

    def _check_manifest(self) -> None:
        path = self.folder / MANIFEST
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("config_hash") == self.hash:
                return
            now = with_legacy_defaults(self.settings)
            before = with_legacy_defaults(old.get("settings", {}), declared=now.get("logprobs"))
            if before != now:
                changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
                raise ResumeError(
                    f"{self.folder} holds teacher samples from another configuration (hash "
                    f"{old.get('config_hash')} != {self.hash}; differs in: {', '.join(changed) or '?'}). "
                    f"Use a new --out folder, or rerun with the original settings.")
            # a folder from before a setting existed that holds what the setting now names: the
            # manifest is rewritten to say so, and the run resumes
        elif any(self.folder.glob(SHARD_GLOB)):
            raise ResumeError(f"{self.folder} has sample shards but no {MANIFEST}; refusing to mix runs")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config_hash": self.hash, "settings": self.settings}, indent=1))
        os.replace(tmp, path)

    def append(self, records: Iterable[dict]) -> int:
        """Write a batch in one write(), then flush and fsync; skips keys already stored."""
        fresh = [r for r in records if (r["qid"], r["sample_index"]) not in self.done]
        if not fresh:
            return 0
        if self._fh is None:
            self._fh = open(self.folder / shard_name(self._shard), "ab")
        payload = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in fresh)
        self._fh.write(payload)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done.update((r["qid"], r["sample_index"]) for r in fresh)
        self._lines += len(fresh)
        if self._lines >= self.shard_lines:  # the next batch starts a new shard
            self.close()
            self._shard, self._lines = self._shard + 1, 0
        return len(fresh)

    def add_failure(self, entry: dict) -> None:
        with open(self.folder / FAILURES, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def add_usage(folder: str | Path, run: dict) -> dict:
    """Add one run's token counts to the folder's ledger (usage.json); returns the totals."""
    path = Path(folder) / USAGE
    ledger = json.loads(path.read_text()) if path.exists() else {"runs": [], "total": {}}
    ledger["runs"].append(run)
    total: dict = {}
    for r in ledger["runs"]:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                total[k] = total.get(k, 0) + v
    ledger["total"] = total
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ledger, indent=1))
    os.replace(tmp, path)
    return total


def read_manifest(folder: str | Path) -> Optional[dict]:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None
