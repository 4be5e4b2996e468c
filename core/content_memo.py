"""Remembers, in this process, results computed from a data set's files, keyed by the files' *content*.

A study runs many pipeline runs on one data set in one process; each run's data gate parses every raw row
(``pipeline.data_gate.check_raw_data``) and its pre-flight and Trainer digest the training content for the
ledger (``dp_training.fingerprint.content_digest``) — the same seconds of parsing per run for the same bytes.
The key is SHA-256 over the data set's description (``DatasetSpec.to_json_dict``), the function's name and
arguments, and every file's path and bytes (hashing is ~100x faster than parsing), so a changed file or
description is always recomputed. Values stay in memory only (they may describe private rows: nothing is
written); a result is returned as a deep copy; exceptions are not remembered (a refused file is refused again).
"""
from __future__ import annotations

import collections
import copy
import hashlib
import json
import threading
from typing import Any, Callable, Iterable

MAX_ENTRIES = 32
_lock = threading.Lock()
_memo: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
stats = {"hits": 0, "misses": 0}


def clear() -> None:
    with _lock:
        _memo.clear()
        stats.update(hits=0, misses=0)


def _data_files(spec, splits: Iterable[str]):
    for split in sorted(splits):
        yield from sorted(spec.split_files(split))
    if getattr(spec, "schema_path", None):
        yield spec.schema_path


def content_key(spec, name: str, splits: Iterable[str], *args) -> str:
    h = hashlib.sha256(name.encode("utf-8") + b"\0" + repr(args).encode("utf-8") + b"\0")
    h.update(json.dumps(spec.to_json_dict(), sort_keys=True, default=str).encode("utf-8"))
    for path in _data_files(spec, splits):
        h.update(b"\0file\0" + str(path).encode("utf-8", "surrogateescape") + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def remembered(spec, name: str, splits: Iterable[str], compute: Callable[[], Any], *args) -> Any:
    """``compute()``'s value for these files' content (and ``name``, ``args``), computed once per process."""
    splits = list(splits)
    try:
        key = content_key(spec, name, splits, *args)
    except OSError:
        return compute()   # an unreadable file: the function itself reports it
    with _lock:
        if key in _memo:
            _memo.move_to_end(key)
            stats["hits"] += 1
            return copy.deepcopy(_memo[key])
    value = compute()
    with _lock:
        stats["misses"] += 1
        _memo[key] = copy.deepcopy(value)
        while len(_memo) > MAX_ENTRIES:
            _memo.popitem(last=False)
    return value


__all__ = ["remembered", "content_key", "clear", "stats"]
