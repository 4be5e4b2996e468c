"""The privacy budget ledger: one append-only, hash-chained SQLite file per user, keyed by data source.

One ledger is shared by every workdir (``resolve_ledger_path``: ``--ledger PATH`` > ``$PRIVTRAIN_LEDGER`` >
``$XDG_DATA_HOME/privtrain/ledger.sqlite`` > ``~/.local/share/privtrain/ledger.sqlite``). Spending is
tracked per *declared source id* (``dataset.json``: ``"privacy": {"source_id": "uci-adult-1994"}``), never
per content hash: a neighbouring file (one row removed) or another workdir charges the same budget.

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

Spend
-----
The spend of a source is the epsilon, at the budget's delta and with the budget's accountant, under the
source's neighbouring relation, of the composition of one event per reservation: its released event if it
was finished, else its planned event (a run that died keeps its planned spend: never under-count). This is
valid under adaptive composition (each run may depend on earlier runs' outputs). A non-private run is a
``NonPrivateDpEvent``: the spend becomes infinite. The naive sum of per-run epsilons (each at its own delta
with its own accountant; deltas add) is shown for reference only.

A source's relation is fixed by its first entry; entries under another relation are refused
(``RelationMismatchError``): mixed relations are never composed.

Reserving is one ``BEGIN IMMEDIATE`` transaction: verify → create the budget if the caller passes one and the
source has none (a different existing budget is a ``BudgetConflictError``: concurrent or repeated creation
can never raise a budget; raising one is only ``set_budget(..., replace=True)``) → refuse non-private
training on a budgeted source unless allowed → check the planned event against the remaining budget →
append the reservation.
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
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import dp_accounting

from dp_training import accountants
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

_SCHEMA = """
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


class BudgetExceededError(LedgerError):
    """The planned run would exceed the source's privacy budget (raised before training)."""


class NonPrivateTrainingRefused(BudgetExceededError):
    """Non-private training was requested on a source that has a privacy budget."""


class BudgetConflictError(LedgerError):
    """A budget was requested for a source that already has a different one (raising is explicit only)."""


class RelationMismatchError(LedgerError):
    """An entry's neighbouring relation differs from the one the source's first entry fixed."""


class LedgerTamperedError(LedgerError):
    """The hash chain, the head or a recorded receipt does not match: the file was edited outside privtrain."""


class NotALedgerError(LedgerError):
    """The path holds a file that is not a privtrain ledger (it is left untouched)."""


class _DryRun(Exception):
    """Internal: rolls back a dry-run reservation (``Ledger.check``)."""


class ReservationError(LedgerError):
    """``finish`` named a reservation that does not exist or is already finished."""


class KnownContentError(LedgerError):
    """The run's training content was already charged under another source id (a copy would get a fresh
    budget); refused unless the run states ``new_source`` (``--new-source "REASON"``)."""


# --- values ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BudgetRequest:
    """The budget a run asks for when its source has none yet (``reserve(..., budget=...)``)."""

    epsilon: float
    delta: float
    accountant: str = accountants.DEFAULT


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
class Spend:
    """A source's spend: composed (the figure that counts) and the naive sum (reference only)."""

    source_id: str
    epsilon: float            # composed, at `delta`, with `accountant`, under `relation`
    delta: float
    accountant: str
    relation: Optional[str]
    naive_epsilon_sum: float  # sum of per-run epsilons, each at its own delta (reference only)
    naive_delta_sum: float
    runs: int
    open_runs: int            # reserved, never finished: charged their planned event
    non_private_runs: int
    budget_epsilon: Optional[float] = None

    @property
    def remaining(self) -> Optional[float]:
        if self.budget_epsilon is None:
            return None
        return max(0.0, self.budget_epsilon - self.epsilon)


@dataclasses.dataclass(frozen=True)
class Reservation:
    seq: int
    run_id: str
    head_hash: str
    spend_after: Spend        # the source's spend including this reservation's planned event

    @property
    def receipt(self) -> Receipt:
        return Receipt(self.seq, self.head_hash)


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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fmt(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def _json_float(x: Optional[float]):
    if x is None:
        return None
    return "inf" if math.isinf(x) else x


def _check_relation(relation: str) -> str:
    if relation not in ev.RELATIONS:
        raise ValueError(f"unknown neighbouring relation {relation!r}; use one of {', '.join(ev.RELATIONS)}")
    return relation


def _check_accountant(name: str) -> str:
    accountants.get(name)  # raises ValueError naming the known ones
    return name


def _check_delta(delta: Any, what: str = "delta") -> float:
    try:
        d = float(delta)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in (0, 1), got {delta!r}; pass e.g. 1e-5") from None
    if not 0 < d < 1:
        raise ValueError(f"{what} must be in (0, 1), got {delta!r}; pass e.g. 1e-5")
    return d


def _check_source(source_id: Any) -> str:
    if not isinstance(source_id, str) or not source_id.strip():
        raise ValueError(f"a source id is a non-empty string (dataset.json: \"privacy\": {{\"source_id\": "
                         f"\"...\"}}), got {source_id!r}")
    return source_id


def _check_event(event: Any, what: str) -> dp_accounting.DpEvent:
    if not isinstance(event, dp_accounting.DpEvent):
        raise ValueError(f"the {what} must be a dp_accounting DpEvent, got {type(event).__name__}")
    ev.to_json(event)  # serialisable (raises EventError, a ValueError, otherwise)
    return event


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


# --- the ledger --------------------------------------------------------------------------------------------
class Ledger:
    """The shared, append-only, hash-chained budget ledger at ``resolve_ledger_path(path)``.

    The file is created (0600, parents 0700) by the first append; reading a missing ledger shows it empty.
    A file at the path that is not a privtrain ledger raises ``NotALedgerError`` and is never modified."""

    def __init__(self, path: Optional[str] = None):
        self.path = resolve_ledger_path(path)
        self._eps_cache: Dict[Tuple[str, float, str, str], float] = {}
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
                con.executescript(_SCHEMA)  # a private temporary file: no transaction needed yet
                con.execute("BEGIN")
                con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                [("format", FORMAT), ("version", FORMAT_VERSION), ("created", _now()),
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

    def _content_fingerprint(self, con: sqlite3.Connection, content_digest: bytes) -> str:
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

    def _check_relation_of(self, state: _State, source_id: str, relation: str) -> None:
        src = state.sources.get(source_id)
        if src is not None and src.relation is not None and src.relation != relation:
            raise RelationMismatchError(
                f"source {source_id!r} is accounted under the {src.relation} neighbouring relation (fixed by "
                f"its first ledger entry); this entry asks for {relation}. Mixed relations are never composed: "
                f"account the run under {src.relation}, or declare a new source id for data you want "
                f"accounted under {relation}")

    def set_budget(self, source_id: str, epsilon: float, delta: float, accountant: str = accountants.DEFAULT,
                   relation: str = ev.REPLACE_ONE, replace: bool = False) -> Receipt:
        """Sets the source's total budget. A source with a different budget raises ``BudgetConflictError``
        unless ``replace`` (``privtrain budget --set-epsilon``); the same budget again appends nothing."""
        _check_source(source_id)
        eps = _check_budget_epsilon(epsilon)
        delta = _check_delta(delta, "budget delta")
        _check_accountant(accountant)
        _check_relation(relation)
        with self._connect(write=True) as con:
            state = self._load(con)
            self._check_relation_of(state, source_id, relation)
            src = state.sources.get(source_id)
            current = src.budget if src else None
            if current is not None and _same_budget(current, eps, delta, accountant):
                return Receipt(*state.head)
            if current is not None and not replace:
                raise BudgetConflictError(self._conflict_message(current, eps, delta, accountant))
            return self._append(con, state, source_id, "budget", {
                "epsilon": eps, "delta": delta, "accountant": accountant, "relation": relation,
                "replaces": current.seq if current else None, "time": _now()})

    @staticmethod
    def _conflict_message(current: Budget, eps: float, delta: float, accountant: str) -> str:
        return (f"source {current.source_id!r} already has the budget epsilon={_fmt(current.epsilon)}, "
                f"delta={current.delta:g} ({current.accountant}, set by ledger entry {current.seq}); this run "
                f"asks for epsilon={_fmt(eps)}, delta={delta:g} ({accountant}). A budget is never changed "
                f"implicitly: drop the budget flag to use the existing one, or change it explicitly with "
                f"privtrain budget --set-epsilon {_fmt(eps)} --delta {delta:g} --source {current.source_id}")

    def reserve(self, source_id: str, event: dp_accounting.DpEvent, *, trainer: str, private: bool,
                accountant: str, relation: str, delta: float, budget: Optional[BudgetRequest] = None,
                allow_non_private: bool = False, label: Optional[str] = None,
                anchors: Iterable[Tuple[int, str]] = (), content_digest: Optional[bytes] = None,
                new_source: Optional[str] = None, _dry_run: bool = False) -> Reservation:
        """Checks and reserves a run's planned event in one IMMEDIATE transaction (see module doc).

        A non-private run (``private=False``, or an event without a DP guarantee such as noise 0) is recorded
        as ``NonPrivateDpEvent`` (infinite spend); on a budgeted source it is refused unless
        ``allow_non_private``. Raises ``BudgetExceededError``, ``NonPrivateTrainingRefused``,
        ``BudgetConflictError``, ``RelationMismatchError``, ``LedgerTamperedError``, ``NotALedgerError``;
        ``accountants.UnsupportedRelationError`` when an accountant cannot account the event. ``anchors``:
        receipts recorded elsewhere, checked like ``verify(anchors)`` before anything is appended.
        ``content_digest``: a digest of the training content (``dp_training.fingerprint``); the ledger keeps
        only its HMAC under the ledger's private key, and refuses (``KnownContentError``) content already
        charged under another source id unless ``new_source`` states why this is a new source (recorded)."""
        _check_source(source_id)
        _check_event(event, "planned event")
        _check_accountant(accountant)
        _check_relation(relation)
        delta = _check_delta(delta)
        if not isinstance(trainer, str) or not trainer:
            raise ValueError(f"trainer must name the trainer kind (e.g. 'dp_sgd'), got {trainer!r}")
        private = bool(private) and not ev.is_non_private(event)
        if not private:
            event = dp_accounting.NonPrivateDpEvent()
        else:
            accountants.check_supported(accountant, event, relation)
        if budget is not None:
            b_eps = _check_budget_epsilon(budget.epsilon)
            b_delta = _check_delta(budget.delta, "budget delta")
            _check_accountant(budget.accountant)
        if label is not None:
            label = str(label)
        if content_digest is not None and not isinstance(content_digest, bytes):
            raise ValueError(f"content_digest must be bytes (dp_training.fingerprint), got {type(content_digest)}")
        if new_source is not None:
            new_source = str(new_source).strip()
            if not new_source:
                raise ValueError('--new-source needs a reason, e.g. --new-source "a fresh 2027 collection"')
        run_id = uuid.uuid4().hex[:12]
        anchors = list(anchors)
        if anchors and not os.path.exists(self.path):
            self._state(anchors)  # raises: receipts exist but the ledger file does not
        with self._connect(write=True) as con:
            state = self._load(con, anchors)
            self._check_relation_of(state, source_id, relation)
            content = None
            if content_digest is not None:
                content = self._content_fingerprint(con, content_digest)
                known = next((e for e in state.entries if e.kind == "reserve" and e.source_id != source_id
                              and e.payload.get("content") == content), None)
                if known is not None and new_source is None:
                    raise KnownContentError(
                        f"this run's training data was already charged under source {known.source_id!r} (ledger "
                        f"entry {known.seq}); under source {source_id!r} a copy would get a fresh budget. Nothing "
                        f"was trained. Declare source_id {known.source_id!r} in dataset.json, or pass "
                        f'--new-source "REASON" if this really is a different data source (the reason is recorded '
                        "in the ledger)")
            src = state.sources.get(source_id)
            current = src.budget if src else None
            if budget is not None:
                if current is None:
                    self._append(con, state, source_id, "budget", {
                        "epsilon": b_eps, "delta": b_delta, "accountant": budget.accountant,
                        "relation": relation, "replaces": None, "time": _now(), "created_by_run": run_id})
                    current = state.sources[source_id].budget
                elif not _same_budget(current, b_eps, b_delta, budget.accountant):
                    raise BudgetConflictError(self._conflict_message(current, b_eps, b_delta, budget.accountant))
            if current is not None and not private and not allow_non_private:
                raise NonPrivateTrainingRefused(
                    f"source {source_id!r} has a privacy budget (epsilon={_fmt(current.epsilon)}, "
                    f"delta={current.delta:g}); non-private training ({trainer}) would void its DP guarantee. "
                    "Nothing was trained. Use a private trainer (e.g. --trainer dp_sgd), or pass "
                    "--allow-non-private if you accept that (the ledger then records an infinite spend)")
            existing = list(state.sources[source_id].runs) if source_id in state.sources else []
            if current is not None and private:
                accountants.check_supported(current.accountant, event, relation)
                before = self._spend_of(source_id, existing, current, relation, None, None)
                after = self._spend_of(source_id, existing, current, relation, None, None, extra=event)
                if after.epsilon > current.epsilon:
                    raise BudgetExceededError(self._exceeded_message(source_id, current, before, after, event,
                                                                     relation))
            if _dry_run:  # check(): everything above ran; roll the transaction back (budget creation included)
                raise _DryRun()
            fields = {"event": ev.to_json(event), "trainer": trainer, "private": private, "accountant": accountant,
                      "relation": relation, "delta": delta, "run_id": run_id, "label": label, "time": _now()}
            if content is not None:
                fields["content"] = content
            if new_source is not None:
                fields["new_source"] = new_source
            receipt = self._append(con, state, source_id, "reserve", fields)
        src = state.sources[source_id]  # computed after the commit: the write lock is not held for it
        spend_after = self._spend_of(source_id, src.runs, src.budget, relation,
                                     None if src.budget else delta, None)
        return Reservation(receipt.seq, run_id, receipt.head_hash, spend_after)

    def _exceeded_message(self, source_id: str, budget: Budget, before: Spend, after: Spend,
                          event: dp_accounting.DpEvent, relation: str) -> str:
        alone = self._epsilon(event, budget.delta, budget.accountant, relation)
        reason = ""
        if math.isinf(before.epsilon):
            reason = (" (a non-private run was recorded on this source: it has no DP guarantee left, so every "
                      "private run is refused)")
        return (f"privacy budget exceeded for source {source_id!r}: budget epsilon={_fmt(budget.epsilon)} at "
                f"delta={budget.delta:g} ({budget.accountant}, {relation}); already spent "
                f"epsilon={_fmt(before.epsilon)} over {before.runs} run(s){reason}, remaining "
                f"{_fmt(before.remaining)}; this run requests epsilon={_fmt(alone)} on its own "
                f"({ev.describe(event)}), which would bring the composed spend to {_fmt(after.epsilon)}. "
                "Nothing was trained. Lower the run's epsilon (--target-epsilon <= the remaining budget, or "
                "more noise / fewer epochs), or raise the source's budget explicitly "
                f"(privtrain budget --set-epsilon E --source {source_id}) if that is justified")

    def check(self, source_id: str, event: dp_accounting.DpEvent, **kwargs) -> None:
        """Would ``reserve(source_id, event, **kwargs)`` be accepted now? Raises what it would raise; appends
        nothing (a pre-flight check before a run starts; the reservation repeats it atomically)."""
        try:
            self.reserve(source_id, event, _dry_run=True, **kwargs)
        except _DryRun:
            return None
        raise AssertionError("unreachable: a dry-run reservation always rolls back")

    def finish(self, reservation: Union[Reservation, int], released_event: dp_accounting.DpEvent,
               status: str) -> Receipt:
        """Closes a reservation with the event actually released (``status``: completed | failed | cancelled).
        A non-private reservation is always closed as non-private."""
        seq = reservation.seq if isinstance(reservation, Reservation) else reservation
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise ValueError(f"finish takes a Reservation or its seq (int), got {reservation!r}")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        _check_event(released_event, "released event")
        with self._connect(write=True) as con:
            state = self._load(con)
            run = state.runs.get(seq)
            if run is None:
                raise ReservationError(f"the ledger {self.path} has no reservation at entry {seq}; pass the "
                                       "Reservation that reserve() returned")
            if run.finish is not None:
                raise ReservationError(f"reservation {seq} (run {run.payload['run_id']}) was already finished "
                                       f"by entry {run.finish_seq}")
            if not run.payload["private"] or ev.is_non_private(released_event):
                released_event = dp_accounting.NonPrivateDpEvent()
            else:  # the spend must stay computable: the run's and the budget's accountants must cover it
                relation = state.sources[run.source_id].relation
                accountants.check_supported(run.payload["accountant"], released_event, relation)
                budget = state.sources[run.source_id].budget
                if budget is not None:
                    accountants.check_supported(budget.accountant, released_event, relation)
            return self._append(con, state, run.source_id, "finish", {
                "reservation": seq, "run_id": run.payload["run_id"], "event": ev.to_json(released_event),
                "status": status, "time": _now()})

    # -- reading ---------------------------------------------------------------------------------------
    def get_budget(self, source_id: str) -> Optional[Budget]:
        src = self._state().sources.get(source_id)
        return src.budget if src else None

    def relation(self, source_id: str) -> Optional[str]:
        """The relation fixed by the source's first entry (None for an unknown source)."""
        src = self._state().sources.get(source_id)
        return src.relation if src else None

    def sources(self) -> List[str]:
        return sorted(self._state().sources)

    def entries(self, source_id: Optional[str] = None) -> List[Entry]:
        return [e for e in self._state().entries if source_id is None or e.source_id == source_id]

    def charged_events(self, source_id: str, label_prefix: str) -> List[Tuple[str, str, dp_accounting.DpEvent]]:
        """(label, status, charged event) of every run on the source whose label starts with ``label_prefix``:
        the released event if finished, else the planned one (what the spend counts; never under-counts)."""
        src = self._state().sources.get(source_id) or _Source(source_id)
        return [(str(r.payload.get("label")), r.finish["status"] if r.finish else "open", r.charged)
                for r in src.runs if str(r.payload.get("label") or "").startswith(label_prefix)]

    def spend(self, source_id: str, delta: Optional[float] = None, accountant: Optional[str] = None) -> Spend:
        """The source's composed spend (at the budget's delta and accountant unless given)."""
        src = self._state().sources.get(source_id) or _Source(source_id)
        return self._spend_of(source_id, src.runs, src.budget, src.relation, delta, accountant)

    def _epsilon(self, event: dp_accounting.DpEvent, delta: float, accountant: str, relation: str) -> float:
        key = (ev.canonical(event), float(delta), accountant, relation)
        if key not in self._eps_cache:
            self._eps_cache[key] = accountants.epsilon(event, delta, accountant, relation)
        return self._eps_cache[key]

    def _spend_of(self, source_id: str, runs: Sequence[_Run], budget: Optional[Budget], relation: Optional[str],
                  delta: Optional[float], accountant: Optional[str],
                  extra: Optional[dp_accounting.DpEvent] = None) -> Spend:
        relation = relation or (budget.relation if budget else None) or ev.REPLACE_ONE
        if delta is None:
            if budget is not None:
                delta = budget.delta
            else:  # no budget: the largest delta any run used
                deltas = [float(r.payload["delta"]) for r in runs]
                delta = max(deltas) if deltas else 1e-5
        charged = [r.charged for r in runs] + ([extra] if extra is not None else [])
        total = ev.compose(*charged)
        if accountant is None:  # the budget's; without one the default (tightest) if it covers the runs
            if budget is not None:
                accountant = budget.accountant
            else:
                candidates = [accountants.DEFAULT] + [r.payload["accountant"] for r in reversed(runs)]
                accountant = next((a for a in candidates if accountants.get(a).supports(total, relation)),
                                  accountants.DEFAULT)
        epsilon = self._epsilon(total, delta, accountant, relation)
        naive_eps = naive_delta = 0.0
        for r in runs:
            e = r.charged
            if isinstance(e, dp_accounting.NoOpDpEvent):
                continue
            naive_eps += self._epsilon(e, float(r.payload["delta"]), r.payload["accountant"], relation)
            naive_delta += float(r.payload["delta"])
        if extra is not None:
            naive_eps += self._epsilon(extra, delta, accountant, relation)
            naive_delta += delta
        return Spend(source_id, epsilon, float(delta), accountant, relation, naive_eps, naive_delta,
                     len(charged), sum(1 for r in runs if r.finish is None),
                     sum(1 for r in runs if not r.private) + (1 if extra is not None and ev.is_non_private(extra)
                                                              else 0),
                     budget.epsilon if budget else None)

    def history(self, source_id: Optional[str] = None) -> List[Dict[str, Any]]:
        """One JSON-able dict per source: relation, budget (and earlier budgets), spend, runs."""
        state = self._state()
        ids = sorted(state.sources) if source_id is None else [source_id]
        out = []
        for sid in ids:
            src = state.sources.get(sid) or _Source(sid)
            spend = self._spend_of(sid, src.runs, src.budget, src.relation, None, None)
            runs = []
            for r in src.runs:
                p, f = r.payload, r.finish
                runs.append({
                    "seq": r.seq, "run_id": p["run_id"], "label": p.get("label"), "trainer": p["trainer"],
                    "private": bool(p["private"]) and r.private, "accountant": p["accountant"],
                    "delta": p["delta"], "started": p["time"],
                    "status": f["status"] if f else "open", "finished": f["time"] if f else None,
                    "finish_seq": r.finish_seq, "planned_event": p["event"], "new_source": p.get("new_source"),
                    "released_event": f["event"] if f else None,
                    "charged": ev.describe(r.charged),
                    "epsilon": _json_float(self._epsilon(r.charged, float(p["delta"]), p["accountant"],
                                                         spend.relation)),
                })
            b = src.budget
            out.append({
                "source_id": sid, "relation": src.relation,
                "budget": None if b is None else {"epsilon": b.epsilon, "delta": b.delta,
                                                  "accountant": b.accountant, "seq": b.seq},
                "budget_changes": len(src.budgets),
                "spent": {"epsilon": _json_float(spend.epsilon), "delta": spend.delta,
                          "accountant": spend.accountant, "relation": spend.relation,
                          "composition": "adaptive composition: per run, its released event if finished, "
                                         "else its planned event",
                          "remaining": _json_float(spend.remaining),
                          "naive_epsilon_sum": _json_float(spend.naive_epsilon_sum),
                          "naive_delta_sum": spend.naive_delta_sum,
                          "runs": spend.runs, "open_runs": spend.open_runs,
                          "non_private_runs": spend.non_private_runs},
                "runs": runs,
            })
        return out


def _check_budget_epsilon(epsilon: Any) -> float:
    try:
        eps = float(epsilon)
    except (TypeError, ValueError):
        raise ValueError(f"budget epsilon must be a number, got {epsilon!r}; pass e.g. 8.0") from None
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"budget epsilon must be a positive finite number, got {epsilon!r}; pass e.g. 8.0")
    return eps


def _same_budget(b: Budget, epsilon: float, delta: float, accountant: str) -> bool:
    return b.epsilon == float(epsilon) and b.delta == float(delta) and b.accountant == accountant


def format_budget(ledger: Optional[Ledger] = None, source_id: Optional[str] = None, as_json: bool = False,
                  path: Optional[str] = None) -> str:
    """Renders the ledger for ``privtrain budget [--source ID] [--json]`` (verifies it first)."""
    ledger = ledger or Ledger(path)
    hist = ledger.history(source_id)
    if as_json:
        return json.dumps(hist, indent=2, sort_keys=True)
    if not hist:
        return f"No sources in the privacy ledger {ledger.path} yet (the first run records one).\n"
    lines: List[str] = [f"Privacy ledger {ledger.path}", ""]
    for ds in hist:
        b, s = ds["budget"], ds["spent"]
        lines.append(f"Source {ds['source_id']}" + (f" ({ds['relation']})" if ds["relation"] else ""))
        if b:
            changed = f", changed {ds['budget_changes'] - 1} time(s)" if ds["budget_changes"] > 1 else ""
            lines.append(f"  budget:    epsilon={_fmt(b['epsilon'])}  delta={b['delta']:g}  "
                         f"accountant={b['accountant']}  (entry {b['seq']}{changed})")
        else:
            lines.append("  budget:    none set")
        spent = math.inf if s["epsilon"] == "inf" else s["epsilon"]
        rem = math.inf if s["remaining"] == "inf" else s["remaining"]
        lines.append(f"  spent:     epsilon={_fmt(spent)} at delta={s['delta']:g} (composed, {s['accountant']})"
                     + (f"  remaining={_fmt(rem)}" if b else ""))
        naive = math.inf if s["naive_epsilon_sum"] == "inf" else s["naive_epsilon_sum"]
        lines.append(f"  naive sum: epsilon={_fmt(naive)}  delta={s['naive_delta_sum']:g} (reference only)")
        header = ("entry", "run_id", "trainer", "started", "status", "epsilon", "delta", "charged")
        rows = [header]
        for r in ds["runs"]:
            eps = math.inf if r["epsilon"] == "inf" else r["epsilon"]
            status = r["status"] + ("*" if r["status"] == "open" else "")
            rows.append((str(r["seq"]), r["run_id"], r["trainer"], r["started"], status, _fmt(eps),
                         _fmt(r["delta"]), r["charged"]))
        if len(rows) > 1:
            widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
            for i, row in enumerate(rows):
                lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
                if i == 0:
                    lines.append("  " + "  ".join("-" * w for w in widths))
            if any(r["status"] == "open" for r in ds["runs"]):
                lines.append("  * open: running, or died without a record; charged its planned event")
        else:
            lines.append("  no runs recorded")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["Ledger", "BudgetRequest", "Budget", "Receipt", "Reservation", "Spend", "Entry", "Verified",
           "LedgerError", "BudgetExceededError", "NonPrivateTrainingRefused", "BudgetConflictError",
           "RelationMismatchError", "LedgerTamperedError", "NotALedgerError", "ReservationError", "KnownContentError",
           "resolve_ledger_path", "format_budget", "LEDGER_ENV", "STATUSES", "FORMAT", "FORMAT_VERSION"]
