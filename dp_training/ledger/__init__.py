"""The privacy budget ledger: one append-only, hash-chained SQLite file per user, keyed by data source.

One ledger is shared by every workdir (``resolve_ledger_path``: ``--ledger PATH`` > ``$PRIVTRAIN_LEDGER`` >
``$XDG_DATA_HOME/privtrain/ledger.sqlite`` > ``~/.local/share/privtrain/ledger.sqlite``). Spending is
tracked per *declared source id* (``dataset.json``: ``"privacy": {"source_id": "uci-adult-1994"}``), never
per content hash: a neighbouring file (one row removed) or another workdir charges the same budget.

Three modules, one job each (``docs/ledger.md``):

``dp_training.ledger.store``
    the file and its hash chain: location, creation, transactions, entries, nonces, ``verify`` and anchors,
    the private content-fingerprint key (``LedgerFile``).
``dp_training.ledger.policy``
    the budget rules: budgets, reservations, spend composition, refusals (``Ledger``, a ``LedgerFile``).
``dp_training.ledger.format``
    the views: ``history`` (JSON-able) and ``format_budget`` (``privtrain budget``).

This package re-exports the public API: ``from dp_training.ledger import Ledger, BudgetExceededError, ...``.
"""
from dp_training.ledger.format import format_budget
from dp_training.ledger.policy import (BudgetConflictError, BudgetExceededError, BudgetRequest, KnownContentError,
                                       Ledger, NonPrivateTrainingRefused, RelationMismatchError, Reservation,
                                       ReservationError, Spend)
from dp_training.ledger.store import (FORMAT, FORMAT_VERSION, LEDGER_ENV, STATUSES, Budget, Entry, LedgerError,
                                      LedgerFile, LedgerTamperedError, NotALedgerError, Receipt, Verified,
                                      resolve_ledger_path)

__all__ = ["Ledger", "LedgerFile", "BudgetRequest", "Budget", "Receipt", "Reservation", "Spend", "Entry", "Verified",
           "LedgerError", "BudgetExceededError", "NonPrivateTrainingRefused", "BudgetConflictError",
           "RelationMismatchError", "LedgerTamperedError", "NotALedgerError", "ReservationError", "KnownContentError",
           "resolve_ledger_path", "format_budget", "LEDGER_ENV", "STATUSES", "FORMAT", "FORMAT_VERSION"]
