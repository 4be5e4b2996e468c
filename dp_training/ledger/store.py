"""The ledger's storage and hash chain: one append-only SQLite file per user (``dp_training.ledger``).

Where it is (``resolve_ledger_path``: ``--ledger PATH`` > ``$PRIVTRAIN_LEDGER`` >
``$XDG_DATA_HOME/privtrain/ledger.sqlite`` > ``~/.local/share/privtrain/ledger.sqlite``), how it is created
(0600, parents 0700, atomically), read and written (``BEGIN IMMEDIATE`` for appends), and how every read verifies
it. What the entries mean for a source's budget is ``dp_training.ledger.policy``; how they are shown is
``dp_training.ledger.format``.

Entries
-------
One table of entries, appended and never updated or deleted (SQLite triggers refuse both):
``seq, source_id, kind, payload, prev_hash, hash`` with ``payload`` canonical JSON (sorted keys, no spaces;
it repeats ``seq``, ``source_id`` and ``kind``, so every column is covered by the hash) and
``hash = sha256(prev_hash || payload)`` (hex strings concatenated; the first entry's ``prev_hash`` is 64
zeros). Every payload carries ``nonce`` (128 random bits, kept only in this file), so that the published
receipts are not functions of public values and guessed times (format 2; a format 1 ledger is read as before
and upgraded by its first append, ``nonces_from`` marking the first entry with a nonce). Kinds:

* ``budget``: ``epsilon, delta, accountant, relation`` (+ ``replaces``: the seq of the budget it replaces).
* ``reserve``: ``event`` (the planned DpEvent as JSON), ``trainer, private, accountant, relation, delta,
  run_id, label, time`` (+ ``content``: HMAC-SHA256 of the training content's digest under the ledger's private
  ``content_key``; + ``new_source``: the stated reason when known content is charged under a new source id).
* ``finish``: ``reservation`` (seq of the reserve entry), ``run_id, event`` (the released DpEvent),
  ``status`` (completed | failed | cancelled), ``time``.

The ``meta`` table marks the file as a privtrain ledger (``format``, ``version``) and holds the head
(``head_seq``, ``head_hash``), updated in the transaction that appends, so removing the newest entries is
caught. ``verify()`` recomputes every hash and the chain, checks the head and that every finish closes an
open reservation of the same source; every method that reads or appends verifies first. Someone who rewrites
the whole chain (recomputing every hash) is caught by *anchors*: the ``(seq, hash)`` receipts that
``reserve``/``finish``/``set_budget`` return and the pipeline records elsewhere (ML Metadata, ``privacy.json``),
passed back as ``verify(anchors=...)`` (``pipeline/receipts.py`` collects a workdir's receipts for every run).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import hmac
import json
import math
import os
import secrets
import sqlite3
import urllib.parse
import uuid
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import dp_accounting

from dp_training import events as ev

FORMAT = "privtrain-ledger"
FORMAT_VERSION = "2"
# Version 1 ledgers (entries without nonces) are read as before and upgraded in place by the first append:
# meta gains ``nonces_from`` (the first seq that carries a nonce) and ``content_key``.
READABLE_VERSIONS = ("1", "2")
NONCE_BYTES = 16          # 128 bits: every hashed payload carries one (private: only in this file)
CONTENT_KEY_BYTES = 32    # the per-ledger HMAC key of the training-content fingerprints (private)
LEDGER_ENV = "PRIVTRAIN_LEDGER"
LEDGER_FILENAME = "ledger.sqlite"
GENESIS_HASH = "0" * 64
KINDS = ("budget", "reserve", "finish")
STATUSES = ("completed", "failed", "cancelled")
BUSY_TIMEOUT_S = 120.0
_SQLITE_MAGIC = b"SQLite format 3\x00"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
  seq INTEGER PRIMARY KEY,
  source_id TEXT NOT NULL,
  kind TEXT NOT NULL,
  payload TEXT NOT NULL,
  prev_hash TEXT NOT NULL,
  hash TEXT NOT NULL
);
CREATE INDEX entries_source ON entries (source_id, seq);
CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries
  BEGIN SELECT RAISE(ABORT, 'privtrain ledger entries are append-only'); END;
CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries
  BEGIN SELECT RAISE(ABORT, 'privtrain ledger entries are append-only'); END;
"""
_TRIGGERS = ("entries_no_update", "entries_no_delete")


# --- errors ------------------------------------------------------------------------------------------------
class LedgerError(RuntimeError):
    """Any refusal or failure of the budget ledger; the message says what happened and what to do."""


class LedgerTamperedError(LedgerError):
    """The hash chain, the head or a recorded receipt does not match: the file was edited outside privtrain."""


class NotALedgerError(LedgerError):
    """The path holds a file that is not a privtrain ledger (it is left untouched)."""


# --- values ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Budget:
    source_id: str
    epsilon: float
    delta: float
    accountant: str
    relation: str
    seq: int  # the budget entry


@dataclasses.dataclass(frozen=True)
class Receipt:
    """What an append returns: its entry and the new head hash (record it elsewhere; pass it to verify)."""

    seq: int
    head_hash: str

    @property
    def anchor(self) -> Tuple[int, str]:
        return (self.seq, self.head_hash)


@dataclasses.dataclass(frozen=True)
class Entry:
    seq: int
    source_id: str
    kind: str
    payload: Dict[str, Any]
    prev_hash: str
    hash: str


@dataclasses.dataclass(frozen=True)
class Verified:
    path: str
    entries: int
    head_seq: int
    head_hash: str


# --- location ----------------------------------------------------------------------------------------------
def resolve_ledger_path(explicit: Optional[str] = None) -> str:
    """``explicit`` > ``$PRIVTRAIN_LEDGER`` > ``$XDG_DATA_HOME/privtrain/ledger.sqlite`` >
    ``~/.local/share/privtrain/ledger.sqlite`` (absolute; nothing is created here)."""
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    env = os.environ.get(LEDGER_ENV)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.abspath(os.path.join(data_home, "privtrain", LEDGER_FILENAME))


def _makedirs_private(directory: str) -> None:
    """Creates missing parents with mode 0700 (existing directories are left as they are)."""
    missing = []
    d = directory
    while d and not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)  # umask may have masked bits off; never looser than 0700


# --- helpers -----------------------------------------------------------------------------------------------
def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def _entry_hash(prev_hash: str, payload: str) -> str:
    return hashlib.sha256((prev_hash + payload).encode("utf-8")).hexdigest()


def _is_nonce(value: Any) -> bool:
    if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class _Run:
    seq: int
    source_id: str
    payload: Dict[str, Any]
    reserved: dp_accounting.DpEvent
    finish_seq: Optional[int] = None
    finish: Optional[Dict[str, Any]] = None
    released: Optional[dp_accounting.DpEvent] = None

    @property
    def charged(self) -> dp_accounting.DpEvent:
        """Released event if finished, else the planned one (never under-count)."""
        return self.released if self.finish is not None else self.reserved

    @property
    def private(self) -> bool:
        return not ev.is_non_private(self.charged)


@dataclasses.dataclass
class _Source:
    source_id: str
    relation: Optional[str] = None
    budget: Optional[Budget] = None
    budgets: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    runs: List[_Run] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _State:
    """The ledger's content after verification, folded per source."""

    entries: List[Entry]
    sources: Dict[str, _Source]
    runs: Dict[int, _Run]

    @property
    def head(self) -> Tuple[int, str]:
        if not self.entries:
            return 0, GENESIS_HASH
        return self.entries[-1].seq, self.entries[-1].hash


# --- the file ----------------------------------------------------------------------------------------------
class LedgerFile:
    """The append-only, hash-chained ledger file at ``resolve_ledger_path(path)``: storage and verification only
    (``dp_training.ledger.Ledger`` adds the budget rules).

    The file is created (0600, parents 0700) by the first append; reading a missing ledger shows it empty.
    A file at the path that is not a privtrain ledger raises ``NotALedgerError`` and is never modified."""

    def __init__(self, path: Optional[str] = None):
        self.path = resolve_ledger_path(path)
        if os.path.exists(self.path):
            self._check_is_ledger_file()
            with self._connect(write=False) as con:
                self._check_meta(con)

    # -- storage ---------------------------------------------------------------------------------------
    def _not_a_ledger(self, what: str) -> NotALedgerError:
        return NotALedgerError(
            f"{self.path} is not a privtrain ledger ({what}); it was left untouched. Point --ledger (or "
            f"${LEDGER_ENV}) at a privtrain ledger file or at a path that does not exist yet")

    def _check_is_ledger_file(self) -> None:
        if os.path.isdir(self.path):
            raise self._not_a_ledger("it is a directory")
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(_SQLITE_MAGIC))
        except OSError as e:
            raise LedgerError(f"cannot read the ledger {self.path}: {e.strerror}; check its permissions") from None
        if head != _SQLITE_MAGIC:
            raise self._not_a_ledger("not an SQLite database" if head else "an empty file")

    def _check_meta(self, con: sqlite3.Connection) -> None:
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise self._not_a_ledger(f"SQLite cannot read it: {e}") from None
        if "meta" not in tables:
            raise self._not_a_ledger(f"an SQLite database with tables {sorted(tables)} and no privtrain marker")
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT:
            raise self._not_a_ledger("an SQLite database whose meta table does not mark a privtrain ledger")
        if meta.get("version") not in READABLE_VERSIONS:
            raise LedgerError(f"the ledger {self.path} has format version {meta.get('version')!r}; this "
                              f"privtrain reads versions {', '.join(READABLE_VERSIONS)}; use the privtrain that "
                              "wrote it")
        if "entries" not in tables:
            raise LedgerTamperedError(f"the entries table is missing; the ledger at {self.path} was edited "
                                      "outside privtrain (restore it from a backup)")

    def _create(self) -> None:
        """Creates an initialised ledger atomically: built under a temporary name, then hard-linked into
        place (fails if anything appeared at the path meanwhile, which is then checked like any file)."""
        directory = os.path.dirname(self.path)
        _makedirs_private(directory)
        tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        try:
            con = sqlite3.connect(tmp, isolation_level=None)
            try:
                con.executescript(SCHEMA)  # a private temporary file: no transaction needed yet
                con.execute("BEGIN")
                con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                [("format", FORMAT), ("version", FORMAT_VERSION), ("created", now()),
                                 ("ledger_id", uuid.uuid4().hex), ("head_seq", "0"),
                                 ("head_hash", GENESIS_HASH), ("nonces_from", "1"),
                                 ("content_key", secrets.token_hex(CONTENT_KEY_BYTES))])
                con.execute("COMMIT")
            finally:
                con.close()
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass  # another process created it first
            except OSError:
                # No hard links on this file system: exclusive create, then copy the bytes in.
                try:
                    out = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                except FileExistsError:
                    out = None
                if out is not None:
                    with open(tmp, "rb") as src, os.fdopen(out, "wb") as dst:
                        dst.write(src.read())
                        dst.flush()
                        os.fsync(dst.fileno())
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @contextlib.contextmanager
    def _connect(self, write: bool) -> Iterator[sqlite3.Connection]:
        """A transaction: ``BEGIN IMMEDIATE`` for appends (one writer at a time), ``BEGIN`` for reads."""
        if write and not os.path.exists(self.path):
            self._create()
        self._check_is_ledger_file()
        # mode=rw: never create a file here (a vanished ledger must not reappear empty).
        uri = "file:" + urllib.parse.quote(self.path) + "?mode=rw"
        try:
            con = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.OperationalError as e:
            raise LedgerError(f"cannot open the ledger {self.path}: {e}; check that it exists and is "
                              "readable and writable by you") from None
        try:
            try:
                con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.DatabaseError as e:
                if "locked" in str(e) or "busy" in str(e):
                    raise LedgerError(f"the ledger {self.path} stayed locked by another process for "
                                      f"{BUSY_TIMEOUT_S:.0f} s; retry when the other run has reserved") from None
                raise self._not_a_ledger(f"SQLite cannot read it: {e}") from None
            try:
                yield con
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
                raise
            else:
                con.execute("COMMIT")
        finally:
            con.close()

    # -- verification ----------------------------------------------------------------------------------
    def _tampered(self, what: str) -> LedgerTamperedError:
        return LedgerTamperedError(
            f"{what}; the ledger at {self.path} was edited outside privtrain. Its budget accounting cannot "
            "be trusted: restore the file from a backup (or investigate who changed it) before any run")

    def _load(self, con: sqlite3.Connection, anchors: Iterable[Tuple[int, str]] = ()) -> _State:
        """Reads and verifies every entry (see module doc); returns the folded state."""
        self._check_meta(con)
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        rows = con.execute("SELECT seq, source_id, kind, payload, prev_hash, hash FROM entries "
                           "ORDER BY seq").fetchall()
        entries: List[Entry] = []
        sources: Dict[str, _Source] = {}
        runs: Dict[int, _Run] = {}
        prev = GENESIS_HASH
        expected_seq = 1
        nonces_from = self._nonces_from(meta)
        for seq, source_id, kind, payload_text, prev_hash, hash_ in rows:
            if seq != expected_seq:
                raise self._tampered(f"entry {expected_seq} is missing (the next entry is {seq})")
            if prev_hash != prev:
                raise self._tampered(f"entry {seq} does not chain to entry {seq - 1} (prev_hash differs)")
            if not isinstance(payload_text, str) or _entry_hash(prev_hash, payload_text) != hash_:
                raise self._tampered(f"entry {seq} does not match its hash (its content was changed)")
            try:
                payload = json.loads(payload_text)
            except ValueError:
                raise self._tampered(f"entry {seq} holds no valid JSON") from None
            if (not isinstance(payload, dict) or payload.get("seq") != seq
                    or payload.get("source_id") != source_id or payload.get("kind") != kind
                    or kind not in KINDS or _canonical_json(payload) != payload_text):
                raise self._tampered(f"entry {seq}'s columns disagree with its hashed payload")
            if seq >= nonces_from and not _is_nonce(payload.get("nonce")):
                raise self._tampered(f"entry {seq} carries no nonce (every entry from {nonces_from} on has one)")
            self._fold(seq, source_id, kind, payload, sources, runs)
            entries.append(Entry(seq, source_id, kind, payload, prev_hash, hash_))
            prev = hash_
            expected_seq += 1
        head_seq, head_hash = (entries[-1].seq, entries[-1].hash) if entries else (0, GENESIS_HASH)
        if str(head_seq) != meta.get("head_seq") or head_hash != meta.get("head_hash"):
            recorded = meta.get("head_seq")
            if recorded is not None and recorded.isdigit() and int(recorded) > head_seq:
                raise self._tampered(f"entry {head_seq + 1} is missing: the ledger's head is entry {recorded} "
                                     f"but its last entry is {head_seq} (entries were deleted)")
            raise self._tampered(f"entry {head_seq} is not the recorded head (head entry {recorded}, "
                                 f"hash {str(meta.get('head_hash'))[:12]}…)")
        triggers = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
        missing = [t for t in _TRIGGERS if t not in triggers]
        if missing:
            raise self._tampered(f"the append-only triggers {', '.join(missing)} were removed")
        by_seq = {e.seq: e for e in entries}
        for anchor in anchors:
            seq, hash_ = int(anchor[0]), str(anchor[1])
            where = anchor[2] if len(anchor) > 2 else "elsewhere"
            if seq not in by_seq:
                raise self._tampered(f"entry {seq}, whose receipt is recorded {where} (hash {hash_[:12]}…), is "
                                     f"missing (the ledger has {len(entries)} entries)")
            if by_seq[seq].hash != hash_:
                raise self._tampered(f"entry {seq} has hash {by_seq[seq].hash[:12]}… but its receipt recorded "
                                     f"{where} says {hash_[:12]}… (the chain was rewritten, or that run was "
                                     "charged to another ledger: pass that one with --ledger)")
        return _State(entries, sources, runs)

    def _nonces_from(self, meta: Dict[str, str]) -> float:
        """The first seq whose payload must carry a nonce (a version 1 ledger: none until it is upgraded)."""
        if meta.get("version") == "1":
            return math.inf
        value = meta.get("nonces_from")
        if value is None or not value.isdigit():
            raise self._tampered("the meta table lost its nonces_from marker")
        return int(value)

    def _upgrade(self, con: sqlite3.Connection) -> None:
        """In a write transaction: a version 1 ledger becomes version 2 (entries from the next seq on carry a
        nonce; earlier entries verify as before); a missing content key is created."""
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        updates = []
        if meta.get("version") == "1":
            updates += [("version", FORMAT_VERSION), ("nonces_from", str(int(meta.get("head_seq") or 0) + 1))]
        if not meta.get("content_key"):
            updates.append(("content_key", secrets.token_hex(CONTENT_KEY_BYTES)))
        if updates:
            con.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", updates)

    def content_fingerprint(self, con: sqlite3.Connection, content_digest: bytes) -> str:
        """HMAC-SHA256 of the training content's digest under this ledger's private key (write transaction)."""
        self._upgrade(con)
        (key,) = con.execute("SELECT value FROM meta WHERE key = 'content_key'").fetchone()
        return hmac.new(bytes.fromhex(key), content_digest, hashlib.sha256).hexdigest()

    def _fold(self, seq: int, source_id: str, kind: str, p: Dict[str, Any], sources: Dict[str, _Source],
              runs: Dict[int, _Run]) -> None:
        src = sources.setdefault(source_id, _Source(source_id))
        try:
            if kind in ("budget", "reserve"):
                relation = p["relation"]
                if relation not in ev.RELATIONS:
                    raise ValueError(f"unknown relation {relation!r}")
                if src.relation is None:
                    src.relation = relation
                elif relation != src.relation:
                    raise ValueError(f"relation {relation} differs from the source's {src.relation}")
            if kind == "budget":
                src.budget = Budget(source_id, float(p["epsilon"]), float(p["delta"]), p["accountant"],
                                    p["relation"], seq)
                src.budgets.append(p)
            elif kind == "reserve":
                run = _Run(seq, source_id, p, ev.from_json(p["event"]))
                runs[seq] = run
                src.runs.append(run)
            else:
                ref = p["reservation"]
                run = runs.get(ref)
                if run is None or run.source_id != source_id:
                    raise ValueError(f"it finishes reservation {ref}, which is not a reservation of "
                                     f"source {source_id!r}")
                if run.finish is not None:
                    raise ValueError(f"reservation {ref} was already finished by entry {run.finish_seq}")
                if p["status"] not in STATUSES:
                    raise ValueError(f"unknown status {p['status']!r}")
                run.finish, run.finish_seq, run.released = p, seq, ev.from_json(p["event"])
        except (KeyError, TypeError, ValueError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise self._tampered(f"entry {seq} is not a valid {kind} entry ({detail})") from None

    def _state(self, anchors: Iterable[Tuple[int, str]] = ()) -> _State:
        if not os.path.exists(self.path):
            anchors = list(anchors)
            if anchors:
                where = anchors[0][2] if len(anchors[0]) > 2 else "elsewhere"
                raise self._tampered(f"the ledger file is missing but entry {anchors[0][0]}'s receipt is "
                                     f"recorded {where}")
            return _State([], {}, {})
        with self._connect(write=False) as con:
            return self._load(con, anchors)

    def verify(self, anchors: Iterable[Tuple[int, str]] = ()) -> Verified:
        """Recomputes every hash, the chain, the head and the finish→reservation links, and checks the given
        ``(seq, hash)`` receipts; raises ``LedgerTamperedError`` naming the first bad entry."""
        state = self._state(anchors)
        head_seq, head_hash = state.head
        return Verified(self.path, len(state.entries), head_seq, head_hash)

    # -- appending -------------------------------------------------------------------------------------
    def _append(self, con: sqlite3.Connection, state: _State, source_id: str, kind: str,
                fields: Dict[str, Any]) -> Receipt:
        self._upgrade(con)
        head_seq, head_hash = state.head
        seq = head_seq + 1
        # The nonce makes every published hash (receipts in privacy.json, ML Metadata, reports) independent of
        # the payload's private values (times): nobody can test guesses against a receipt.
        payload = dict(fields, seq=seq, source_id=source_id, kind=kind, nonce=secrets.token_hex(NONCE_BYTES))
        text = _canonical_json(payload)
        digest = _entry_hash(head_hash, text)
        con.execute("INSERT INTO entries (seq, source_id, kind, payload, prev_hash, hash) VALUES (?,?,?,?,?,?)",
                    (seq, source_id, kind, text, head_hash, digest))
        con.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        [("head_seq", str(seq)), ("head_hash", digest)])
        entry = Entry(seq, source_id, kind, payload, head_hash, digest)
        state.entries.append(entry)
        self._fold(seq, source_id, kind, payload, state.sources, state.runs)
        return Receipt(seq, digest)


    def entries(self, source_id: Optional[str] = None) -> List[Entry]:
        return [e for e in self._state().entries if source_id is None or e.source_id == source_id]


__all__ = ["LedgerFile", "Budget", "Receipt", "Entry", "Verified", "LedgerError", "LedgerTamperedError",
           "NotALedgerError", "resolve_ledger_path", "now", "LEDGER_ENV", "LEDGER_FILENAME", "STATUSES", "KINDS",
           "FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "GENESIS_HASH", "SCHEMA"]
