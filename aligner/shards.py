"""Aligned training data on disk: numpy arrays per shard, memory-mapped on read.

One shard is a directory:

    index.npy          int64 [n, 11]: input off/len, label off/len, sample_index,
                       qid off/len, question off/len, answer off/len
    input_ids.npy      int32 [Σ S]          student ids of the questions (eos included)
    labels.npy         int32 [Σ T]          student ids of the teacher CoT (eos included)
    topk_ids.npy       int32 [Σ T, K]       −1 padded
    topk_logprobs.npy  float32 [Σ T, K]     −inf on padding
    strings.npy        uint8 [bytes]        UTF-8 of qid, question, answer
    meta.json          {"format": 1, "n": n, "k": K, ...} — written last

A shard is built in `<name>.tmp/` and renamed into place, so a directory with meta.json
is always complete (what resumable jobs rely on). `AlignedShards` opens every complete
shard under a folder in name order; arrays are memory-mapped on first use and dropped
when pickled, so it is cheap to open in every rank and DataLoader worker.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

FORMAT = 1
_ARRAYS = ("input_ids", "labels", "topk_ids", "topk_logprobs", "strings")
_STR_FIELDS = ("qid", "question", "answer")


def _check(rec: dict, n: int) -> tuple[np.ndarray, ...]:
    where = f"record {n} (qid {rec.get('qid')!r})"
    for key in ("qid", "sample_index", "answer", "question", "input_ids", "labels", "topk_ids", "topk_logprobs"):
        if key not in rec:
            raise ValueError(f"{where}: missing field {key!r}")
    inp = np.asarray(rec["input_ids"], np.int32).reshape(-1)
    lab = np.asarray(rec["labels"], np.int32).reshape(-1)
    ids = np.asarray(rec["topk_ids"], np.int32)
    lps = np.asarray(rec["topk_logprobs"], np.float32)
    if ids.ndim != 2 or ids.shape[0] != lab.shape[0] or lps.shape != ids.shape:
        raise ValueError(f"{where}: topk_ids {ids.shape} / topk_logprobs {lps.shape} must both be "
                         f"[len(labels)={lab.shape[0]}, K]")
    return inp, lab, ids, lps


def write_shard(records: Iterable[dict], shard_dir: str | os.PathLike, extra_meta: dict | None = None) -> int:
    """Write one shard atomically; returns the number of records."""
    rows, inputs, labels, ids, lps, strings = [], [], [], [], [], []
    off_in = off_lab = off_str = 0
    for n, rec in enumerate(records):
        inp, lab, tid, tlp = _check(rec, n)
        row = [off_in, len(inp), off_lab, len(lab), int(rec["sample_index"])]
        for key in _STR_FIELDS:
            b = str(rec[key]).encode("utf-8")
            row += [off_str, len(b)]
            strings.append(b)
            off_str += len(b)
        rows.append(row)
        inputs.append(inp)
        labels.append(lab)
        ids.append(tid)
        lps.append(tlp)
        off_in += len(inp)
        off_lab += len(lab)
    k = max((a.shape[1] for a in ids), default=1)
    pad = lambda a, v: np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=v)  # noqa: E731
    arrays = {
        "index": np.array(rows, np.int64).reshape(-1, 11),
        "input_ids": np.concatenate(inputs) if inputs else np.zeros(0, np.int32),
        "labels": np.concatenate(labels) if labels else np.zeros(0, np.int32),
        "topk_ids": np.concatenate([pad(a, -1) for a in ids]) if ids else np.zeros((0, k), np.int32),
        "topk_logprobs": (np.concatenate([pad(a, -np.inf) for a in lps]) if lps
                          else np.zeros((0, k), np.float32)),
        "strings": np.frombuffer(b"".join(strings), np.uint8),
    }
    save_shard_arrays(arrays, shard_dir, extra_meta)
    return len(rows)


def save_shard_arrays(arrays: dict, shard_dir: str | os.PathLike, extra_meta: dict | None = None) -> None:
    """Write one shard atomically from its finished arrays (the `write_shard` layout: index,
    input_ids, labels, topk_ids, topk_logprobs, strings); meta.json goes last."""
    shard_dir = Path(shard_dir)
    tmp = shard_dir.with_name(shard_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("index",) + _ARRAYS:
        np.save(tmp / f"{name}.npy", arrays[name])
    meta = {"format": FORMAT, "n": int(arrays["index"].shape[0]), "k": int(arrays["topk_ids"].shape[1]),
            **(extra_meta or {})}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(shard_dir, ignore_errors=True)
    os.replace(tmp, shard_dir)


def write_shards(records: Iterable[dict], out_dir: str | os.PathLike, shard_size: int = 10_000,
                 prefix: str = "shard") -> list[Path]:
    """Write records into `<out_dir>/<prefix>-00000`, … of at most `shard_size` records each."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, batch = [], []

    def flush():
        path = out_dir / f"{prefix}-{len(paths):05d}"
        write_shard(batch, path)
        paths.append(path)
        batch.clear()

    for rec in records:
        batch.append(rec)
        if len(batch) == shard_size:
            flush()
    if batch or not paths:
        flush()
    return paths


def is_complete(shard_dir: str | os.PathLike) -> bool:
    return (Path(shard_dir) / "meta.json").is_file()


class AlignedShards:
    """Random access to every complete shard under `out_dir` (see module docstring)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        if not self.out_dir.is_dir():
            raise FileNotFoundError(f"aligned data folder not found: {self.out_dir}")
        self.shard_dirs = sorted(p for p in self.out_dir.iterdir() if p.is_dir() and is_complete(p))
        if not self.shard_dirs:
            raise FileNotFoundError(f"no complete aligned shards (*/meta.json) in {self.out_dir}")
        self.metas = [json.loads((p / "meta.json").read_text()) for p in self.shard_dirs]
        for p, m in zip(self.shard_dirs, self.metas):
            if m.get("format") != FORMAT:
                raise ValueError(f"{p}/meta.json: format {m.get('format')!r}, expected {FORMAT}")
        self.k = max(m["k"] for m in self.metas)
        self._starts = np.cumsum([0] + [m["n"] for m in self.metas])
        self._open: dict[int, dict] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = {}  # memmaps are reopened lazily in the receiving process
        return state

    def _shard(self, s: int) -> dict:
        arrays = self._open.get(s)
        if arrays is None:
            d = self.shard_dirs[s]
            arrays = {name: np.load(d / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
            arrays["index"] = np.load(d / "index.npy")
            self._open[s] = arrays
        return arrays

    def locate(self, i: int) -> tuple[Path, int]:
        """(shard folder, row in it) of sample i, for error messages that point at the file."""
        i %= len(self)
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self.shard_dirs[s], int(i - self._starts[s])

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} aligned samples")
        i %= n
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        a = self._shard(s)
        row = a["index"][i - self._starts[s]]
        text = lambda c: bytes(a["strings"][row[c]:row[c] + row[c + 1]]).decode("utf-8")  # noqa: E731
        ids = np.asarray(a["topk_ids"][row[2]:row[2] + row[3]])
        lps = np.asarray(a["topk_logprobs"][row[2]:row[2] + row[3]])
        if ids.shape[1] < self.k:  # shards written with a smaller K
            ids = np.pad(ids, ((0, 0), (0, self.k - ids.shape[1])), constant_values=-1)
            lps = np.pad(lps, ((0, 0), (0, self.k - lps.shape[1])), constant_values=-np.inf)
        return {"qid": text(5), "sample_index": int(row[4]), "question": text(7), "answer": text(9),
                "input_ids": np.asarray(a["input_ids"][row[0]:row[0] + row[1]]),
                "labels": np.asarray(a["labels"][row[2]:row[2] + row[3]]),
                "topk_ids": ids, "topk_logprobs": lps}

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def qids_and_sample_indices(self) -> tuple[list[str], np.ndarray]:
        """Every sample's qid and teacher sample_index, read from the index and string arrays alone
        (no top-k decoding): what choosing one sample per question needs."""
        qids, sample_index = [], []
        for s in range(len(self.shard_dirs)):
            a = self._shard(s)
            raw = bytes(a["strings"])
            idx = a["index"]
            qids += [raw[o:o + n].decode("utf-8") for o, n in zip(idx[:, 5], idx[:, 6])]
            sample_index.append(idx[:, 4])
        return qids, np.concatenate(sample_index) if sample_index else np.zeros(0, np.int64)
