"""The ledger's budget policy: budgets, reservations, spend composition and the refusal rules.

``Ledger`` is the storage of ``dp_training.ledger.store`` (the hash-chained file, verified on every read) plus
what its entries mean for a data source's privacy budget.

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

import dataclasses
import math
import os
import uuid
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import dp_accounting

from dp_training import accountants
from dp_training import events as ev
from dp_training.ledger import format as _format
from dp_training.ledger import store
from dp_training.ledger.format import fmt_num
from dp_training.ledger.store import STATUSES, Budget, LedgerError, LedgerFile, Receipt, _Run, _Source, _State


# --- errors ------------------------------------------------------------------------------------------------
class BudgetExceededError(LedgerError):
    """The planned run would exceed the source's privacy budget (raised before training)."""


class NonPrivateTrainingRefused(BudgetExceededError):
    """Non-private training was requested on a source that has a privacy budget."""


class BudgetConflictError(LedgerError):
    """A budget was requested for a source that already has a different one (raising is explicit only)."""


class RelationMismatchError(LedgerError):
    """An entry's neighbouring relation differs from the one the source's first entry fixed."""


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


# --- the ledger --------------------------------------------------------------------------------------------
class Ledger(LedgerFile):
    """The shared, append-only, hash-chained budget ledger at ``resolve_ledger_path(path)``: the verified file
    (``LedgerFile``) plus the budget rules. Reading a missing ledger shows it empty; the first append creates it."""

    def __init__(self, path: Optional[str] = None):
        super().__init__(path)
        self._eps_cache: Dict[Tuple[str, float, str, str], float] = {}

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
                "replaces": current.seq if current else None, "time": store.now()})

    @staticmethod
    def _conflict_message(current: Budget, eps: float, delta: float, accountant: str) -> str:
        return (f"source {current.source_id!r} already has the budget epsilon={fmt_num(current.epsilon)}, "
                f"delta={current.delta:g} ({current.accountant}, set by ledger entry {current.seq}); this run "
                f"asks for epsilon={fmt_num(eps)}, delta={delta:g} ({accountant}). A budget is never changed "
                f"implicitly: drop the budget flag to use the existing one, or change it explicitly with "
                f"privtrain budget --set-epsilon {fmt_num(eps)} --delta {delta:g} --source {current.source_id}")

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
                content = self.content_fingerprint(con, content_digest)
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
                        "relation": relation, "replaces": None, "time": store.now(), "created_by_run": run_id})
                    current = state.sources[source_id].budget
                elif not _same_budget(current, b_eps, b_delta, budget.accountant):
                    raise BudgetConflictError(self._conflict_message(current, b_eps, b_delta, budget.accountant))
            if current is not None and not private and not allow_non_private:
                raise NonPrivateTrainingRefused(
                    f"source {source_id!r} has a privacy budget (epsilon={fmt_num(current.epsilon)}, "
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
                      "relation": relation, "delta": delta, "run_id": run_id, "label": label, "time": store.now()}
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
        return (f"privacy budget exceeded for source {source_id!r}: budget epsilon={fmt_num(budget.epsilon)} at "
                f"delta={budget.delta:g} ({budget.accountant}, {relation}); already spent "
                f"epsilon={fmt_num(before.epsilon)} over {before.runs} run(s){reason}, remaining "
                f"{fmt_num(before.remaining)}; this run requests epsilon={fmt_num(alone)} on its own "
                f"({ev.describe(event)}), which would bring the composed spend to {fmt_num(after.epsilon)}. "
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
                "status": status, "time": store.now()})

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
        """One JSON-able dict per source: relation, budget (and earlier budgets), spend, runs
        (``dp_training.ledger.format.history``)."""
        return _format.history(self, source_id)


__all__ = ["Ledger", "BudgetRequest", "Spend", "Reservation", "BudgetExceededError", "NonPrivateTrainingRefused",
           "BudgetConflictError", "RelationMismatchError", "ReservationError", "KnownContentError"]
