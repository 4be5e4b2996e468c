"""Identical re-runs answer from the last run's record instead of starting TFX (``privtrain run``).

TFX's cache already reuses every component of an identical re-run except the Evaluator and the Pusher: the
latest blessed model (the baseline) is now the candidate itself, so TFMA evaluates the same model twice and the
Pusher pushes a duplicate version. A run whose inputs are all identical to the last successful run in the same
workdir — the command's arguments, the data set's files (content), the platform's code, ``TF_CONFIG`` and the ledger's location — and
after which nothing else ran in the workdir's ML Metadata store, has nothing new to compute: the command prints
the recorded summary, marked as such, and touches neither ML Metadata, the serving directory nor the ledger.
``--no-cache`` always runs.

The record (``<workdir>/runs/last.json``) is private (the workdir is 0700): it holds the run's summary (which
contains operational timings) and a fingerprint over the data's content. It imports nothing heavy.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sqlite3
from typing import Any, Dict, Iterable, Optional, Tuple

from core.private_files import write_private_text
from pipeline.config import source_digest

RECORD = os.path.join("runs", "last.json")
FORMAT = 1
# Arguments that change how the summary is printed, not what runs.
PRESENTATION_ARGS = ("json", "command")
# Environment variables a run reads (the training cluster; where the default ledger is).
ENVIRONMENT = ("TF_CONFIG", "PRIVTRAIN_LEDGER", "XDG_DATA_HOME", "HOME")
CODE_DIRS = ("core", "dp_training", "federated", "pipeline", "privtrain_cli")


def _hash_file(h, path: str) -> None:
    h.update(path.encode("utf-8", "surrogateescape") + b"\0")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def _data_files(spec) -> Iterable[str]:
    from core.dataset import DESCRIPTION_FILE

    yield os.path.join(spec.directory, DESCRIPTION_FILE)
    if spec.schema_path:
        yield spec.schema_path
    for split in sorted(spec.splits):
        yield from spec.split_files(split)


def fingerprint(args: Dict[str, Any], spec) -> str:
    """A digest of everything an identical run depends on (private: it covers the data's content)."""
    h = hashlib.sha256()
    public = {k: v for k, v in sorted(args.items()) if k not in PRESENTATION_ARGS}
    h.update(json.dumps(public, sort_keys=True, default=str).encode())
    h.update(json.dumps({k: os.environ.get(k) for k in ENVIRONMENT}).encode())
    h.update(source_digest(CODE_DIRS).encode())
    for path in _data_files(spec):
        _hash_file(h, os.path.abspath(path))
    return h.hexdigest()


def store_head(metadata_path: str) -> Optional[Tuple[int, int]]:
    """(number of executions, newest execution id) of an ML Metadata SQLite store; None when there is none."""
    if not os.path.exists(metadata_path):
        return None
    try:
        con = sqlite3.connect(f"file:{metadata_path}?mode=ro", uri=True, timeout=5)
        try:
            count, newest = con.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM Execution").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return int(count), int(newest)


def _record_path(workdir: str) -> str:
    return os.path.join(workdir, RECORD)


def record(workdir: str, metadata_path: str, digest: str, summary_json: dict, summary_text: str) -> None:
    """Writes the record of a successful run (atomically; 0600)."""
    path = _record_path(workdir)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    doc = {"format": FORMAT, "fingerprint": digest, "store_head": store_head(metadata_path),
           "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "pushed_path": summary_json.get("pushed_path"), "summary": summary_json, "text": summary_text}
    write_private_text(path, json.dumps(doc))


def forget(workdir: str) -> None:
    try:
        os.remove(_record_path(workdir))
    except FileNotFoundError:
        pass


def identical_run(workdir: str, metadata_path: str, digest: str) -> Optional[dict]:
    """The record of the last run when this one is identical to it and nothing ran since; else None."""
    try:
        with open(_record_path(workdir)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("fingerprint") != digest:
        return None
    head = store_head(metadata_path)
    if head is None or list(head) != list(doc.get("store_head") or []):
        return None   # another run (or a deleted store) since: the baseline may differ, run for real
    pushed = doc.get("pushed_path")
    if pushed and not os.path.isdir(pushed):
        return None
    return doc


def replay_note(doc: dict) -> str:
    return (f"identical to the run that finished at {doc.get('finished')} in this workdir (same arguments, data, "
            "code; nothing ran since): its recorded summary follows; nothing was re-run, pushed or charged "
            "(--no-cache re-runs every component)")
