"""Per-data-set privacy budget ledger (SQLite, ``<workdir>/privacy_ledger.sqlite``).

Keyed by the data set's fingerprint (``TrainerContext.dataset_fingerprint``). A data set may have a
total budget ``(epsilon, delta)``; every DP run on it is recorded with the parameters of its DpEvent
(noise multiplier, sampling rate, steps actually released, sampling method) and its own epsilon.

Cumulative spend
----------------
The spend is the epsilon, at the *ledger's* delta, of the composition of all recorded runs' DpEvents,
computed by the budget's accountant (PLD by default). This is valid under *adaptive* composition:
the choice of a later run (its hyper-parameters, even whether to run it) may depend on the outputs
of earlier runs, and the composition theorems used by dp_accounting (RDP composition, PLD
convolution) hold for adaptively chosen mechanisms. It is much tighter than the naive sum of
per-run epsilons, which is also shown (for reference only; each run's epsilon is at its own delta,
so the naive sum's delta is the sum of the runs' deltas).

Runs go through ``begin_run`` (checks the budget and reserves the planned spend atomically, status
``running``) and ``finish_run`` (status ``completed``, ``failed`` or ``cancelled`` with the steps
actually released). A run that dies without ``finish_run`` keeps its planned (larger or equal)
spend: the ledger never under-counts. A failed or cancelled run that released at least one noisy
step is charged for the steps it released; one that released none is charged nothing.

Non-private training on a data set with a budget is refused unless explicitly allowed; when
allowed and recorded, the ledger shows an infinite spend (the data set has no DP guarantee left).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import sqlite3
import uuid
from typing import Any, Dict, Iterator, List, Optional

import dp_accounting

from dp_training import accounting

LEDGER_FILENAME = "privacy_ledger.sqlite"
STATUSES = ("running", "completed", "failed", "cancelled")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
  fingerprint TEXT PRIMARY KEY,
  dataset_name TEXT,
  epsilon REAL NOT NULL,
  delta REAL NOT NULL,
  accountant TEXT NOT NULL,
  created TEXT NOT NULL,
  updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY,
  fingerprint TEXT NOT NULL,
  dataset_name TEXT,
  trainer TEXT NOT NULL,
  started TEXT NOT NULL,
  finished TEXT,
  status TEXT NOT NULL,
  private INTEGER NOT NULL,
  noise_multiplier REAL,
  sampling_rate REAL,
  steps INTEGER,
  planned_steps INTEGER,
  sampling TEXT,
  delta REAL,
  accountant TEXT,
  epsilon REAL,
  extra TEXT
);
CREATE INDEX IF NOT EXISTS runs_fingerprint ON runs (fingerprint);
"""


class BudgetExceededError(RuntimeError):
    """The planned run would exceed the data set's privacy budget (raised before training)."""


class NonPrivateTrainingRefused(BudgetExceededError):
    """Non-private training was requested on a data set that has a privacy budget."""


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """A DP run's DpEvent parameters, known before training."""

    fingerprint: str
    noise_multiplier: float
    sampling_rate: float
    steps: int
    delta: float
    sampling: str = "poisson"
    accountant: str = "pld"
    trainer: str = "dp_sgd"
    dataset_name: Optional[str] = None

    def event(self, steps: Optional[int] = None) -> dp_accounting.DpEvent:
        return accounting.dp_event(self.noise_multiplier, self.sampling_rate,
                                   self.steps if steps is None else steps, self.sampling)


@dataclasses.dataclass(frozen=True)
class Budget:
    fingerprint: str
    epsilon: float
    delta: float
    accountant: str
    dataset_name: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Spend:
    """Spend of a data set (optionally including a planned run)."""

    fingerprint: str
    epsilon: float            # composed, at `delta`, with `accountant`
    delta: float
    accountant: str
    naive_epsilon_sum: float  # sum of per-run epsilons (reference only)
    naive_delta_sum: float
    runs: int
    budget_epsilon: Optional[float] = None

    @property
    def remaining(self) -> Optional[float]:
        if self.budget_epsilon is None:
            return None
        return max(0.0, self.budget_epsilon - self.epsilon)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fmt(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


class PrivacyLedger:
    """The privacy budget ledger of one workdir (or an explicit SQLite path)."""

    def __init__(self, workdir: Optional[str] = None, path: Optional[str] = None):
        if path is None:
            if workdir is None:
                raise ValueError("PrivacyLedger needs a workdir (or an explicit path).")
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, LEDGER_FILENAME)
        self.path = path
        con = sqlite3.connect(self.path, timeout=30)
        try:
            con.executescript(_SCHEMA)
        finally:
            con.close()

    # -- storage -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            con.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            else:
                con.execute("COMMIT")
        finally:
            con.close()

    # -- budgets -------------------------------------------------------------------------------
    def set_budget(self, fingerprint: str, epsilon: float, delta: float,
                   accountant: str = accounting.DEFAULT_ACCOUNTANT,
                   dataset_name: Optional[str] = None) -> Budget:
        """Sets (or replaces) the total budget of a data set."""
        eps = accounting._check_number("budget epsilon", epsilon, "pass e.g. 8.0.")
        if not eps > 0:
            raise ValueError(f"budget epsilon must be > 0, got {epsilon!r}; pass a positive total "
                             "epsilon (e.g. 8.0).")
        accounting.validate_parameters(1.0, 1.0, 0, delta, accountant)
        now = _now()
        with self._connect(immediate=True) as con:
            con.execute(
                "INSERT INTO budgets (fingerprint, dataset_name, epsilon, delta, accountant, created,"
                " updated) VALUES (?,?,?,?,?,?,?) ON CONFLICT(fingerprint) DO UPDATE SET "
                "epsilon=excluded.epsilon, delta=excluded.delta, accountant=excluded.accountant, "
                "dataset_name=COALESCE(excluded.dataset_name, budgets.dataset_name), "
                "updated=excluded.updated",
                (fingerprint, dataset_name, eps, float(delta), accountant, now, now))
        return Budget(fingerprint, eps, float(delta), accountant, dataset_name)

    def get_budget(self, fingerprint: str) -> Optional[Budget]:
        with self._connect() as con:
            return self._budget(con, fingerprint)

    @staticmethod
    def _budget(con: sqlite3.Connection, fingerprint: str) -> Optional[Budget]:
        row = con.execute("SELECT * FROM budgets WHERE fingerprint=?", (fingerprint,)).fetchone()
        if row is None:
            return None
        return Budget(row["fingerprint"], row["epsilon"], row["delta"], row["accountant"],
                      row["dataset_name"])

    # -- spend ---------------------------------------------------------------------------------
    @staticmethod
    def _run_event(row: sqlite3.Row) -> dp_accounting.DpEvent:
        if not row["private"]:
            return dp_accounting.NonPrivateDpEvent()
        steps = row["steps"] if row["status"] != "running" else row["planned_steps"]
        return accounting.dp_event(row["noise_multiplier"], row["sampling_rate"], int(steps or 0),
                                   row["sampling"])

    def _spend(self, con: sqlite3.Connection, fingerprint: str,
               planned: Optional[PlannedRun] = None, delta: Optional[float] = None,
               accountant: Optional[str] = None) -> Spend:
        budget = self._budget(con, fingerprint)
        rows = con.execute("SELECT * FROM runs WHERE fingerprint=? ORDER BY started, rowid",
                           (fingerprint,)).fetchall()
        events: List[dp_accounting.DpEvent] = [self._run_event(r) for r in rows]
        naive_eps = 0.0
        naive_delta = 0.0
        for r in rows:
            e = r["epsilon"]
            if r["status"] == "running" and r["private"]:
                e = None  # counted at its planned steps in the composition only
            if not r["private"]:
                e = math.inf
            if e is not None:
                naive_eps += e
                if r["delta"] and (r["steps"] or 0) > 0:
                    naive_delta += r["delta"]
        if planned is not None:
            events.append(planned.event())
            naive_eps += accounting.compute_epsilon(
                planned.noise_multiplier, planned.sampling_rate, planned.steps, planned.delta,
                planned.accountant, planned.sampling)
            naive_delta += planned.delta
        if delta is None:
            delta = budget.delta if budget else (planned.delta if planned else None)
        if accountant is None:
            run_accountants = [r["accountant"] for r in rows if r["accountant"]]
            accountant = budget.accountant if budget else (
                planned.accountant if planned else
                (run_accountants[-1] if run_accountants else accounting.DEFAULT_ACCOUNTANT))
        if delta is None:  # no budget, nothing planned: use the largest delta any run used
            deltas = [r["delta"] for r in rows if r["delta"]]
            delta = max(deltas) if deltas else 1e-5
        eps = self._compose(events, delta, accountant)
        return Spend(fingerprint, eps, float(delta), accountant, naive_eps, naive_delta,
                     len(rows) + (1 if planned else 0), budget.epsilon if budget else None)

    @staticmethod
    def _compose(events: List[dp_accounting.DpEvent], delta: float, accountant: str) -> float:
        if any(isinstance(e, dp_accounting.NonPrivateDpEvent) for e in events):
            return math.inf
        events = [e for e in events if not isinstance(e, dp_accounting.NoOpDpEvent)]
        if not events:
            return 0.0
        return accounting.epsilon_of_event(dp_accounting.ComposedDpEvent(events), delta, accountant)

    def spent(self, fingerprint: str, delta: Optional[float] = None,
              accountant: Optional[str] = None) -> Spend:
        """Cumulative spend of a data set (composed at the budget's delta, see module doc)."""
        with self._connect() as con:
            return self._spend(con, fingerprint, delta=delta, accountant=accountant)

    # -- checks --------------------------------------------------------------------------------
    def _check(self, con: sqlite3.Connection, planned: PlannedRun) -> Spend:
        budget = self._budget(con, planned.fingerprint)
        if budget is None:
            return self._spend(con, planned.fingerprint, planned)
        before = self._spend(con, planned.fingerprint)
        after = self._spend(con, planned.fingerprint, planned)
        if after.epsilon > budget.epsilon:
            alone = accounting.compute_epsilon(planned.noise_multiplier, planned.sampling_rate,
                                               planned.steps, budget.delta, budget.accountant,
                                               planned.sampling)
            name = f" ({budget.dataset_name})" if budget.dataset_name else ""
            raise BudgetExceededError(
                f"privacy budget exceeded for data set {planned.fingerprint}{name}: budget "
                f"epsilon={_fmt(budget.epsilon)} at delta={budget.delta:g}; already spent "
                f"epsilon={_fmt(before.epsilon)} over {before.runs} run(s), remaining "
                f"{_fmt(before.remaining)}; this run requests epsilon={_fmt(alone)} on its own "
                f"({planned.steps} steps, noise multiplier {planned.noise_multiplier:.4g}, sampling "
                f"rate {planned.sampling_rate:.4g}, {planned.sampling}), which would bring the "
                f"composed spend to {_fmt(after.epsilon)}. Nothing was trained. Lower the run's "
                "epsilon (--target-epsilon <= the remaining budget, or more noise / fewer epochs), "
                "or raise the data set's budget explicitly "
                "(privtrain budget --set-epsilon E --data DIR) if that is justified.")
        return after

    def check(self, planned: PlannedRun) -> Spend:
        """Raises BudgetExceededError if ``planned`` would exceed the budget; else the projected spend."""
        with self._connect() as con:
            return self._check(con, planned)

    def check_non_private(self, fingerprint: str, allowed: bool) -> None:
        """Refuses non-private training on a budgeted data set unless ``allowed``."""
        budget = self.get_budget(fingerprint)
        if budget is not None and not allowed:
            raise NonPrivateTrainingRefused(
                f"data set {fingerprint} has a privacy budget (epsilon={_fmt(budget.epsilon)}, "
                f"delta={budget.delta:g}); non-private training would void its DP guarantee. Use "
                "the dp_sgd trainer, or pass --allow-non-private if you accept that (the ledger "
                "then records an infinite spend for this data set).")

    # -- recording -----------------------------------------------------------------------------
    def begin_run(self, planned: PlannedRun, run_id: Optional[str] = None) -> str:
        """Checks the budget and reserves the planned spend atomically; returns the run id."""
        run_id = run_id or uuid.uuid4().hex[:12]
        with self._connect(immediate=True) as con:
            self._check(con, planned)
            con.execute(
                "INSERT INTO runs (run_id, fingerprint, dataset_name, trainer, started, status, "
                "private, noise_multiplier, sampling_rate, steps, planned_steps, sampling, delta, "
                "accountant) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, planned.fingerprint, planned.dataset_name, planned.trainer, _now(),
                 "running", 1, float(planned.noise_multiplier), float(planned.sampling_rate), 0,
                 int(planned.steps), planned.sampling, float(planned.delta), planned.accountant))
        return run_id

    def finish_run(self, run_id: str, status: str, steps: int, epsilon: Optional[float] = None,
                   extra: Optional[Dict[str, Any]] = None) -> None:
        """Closes a run with the steps actually released (its epsilon is computed if not given)."""
        if status not in STATUSES[1:]:
            raise ValueError(f"status must be one of {STATUSES[1:]}, got {status!r}.")
        with self._connect(immediate=True) as con:
            row = con.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(f"no run {run_id!r} in the ledger {self.path}")
            if epsilon is None:
                epsilon = accounting.compute_epsilon(row["noise_multiplier"], row["sampling_rate"],
                                                     int(steps), row["delta"], row["accountant"],
                                                     row["sampling"])
            con.execute("UPDATE runs SET status=?, steps=?, epsilon=?, finished=?, extra=? "
                        "WHERE run_id=?",
                        (status, int(steps), float(epsilon), _now(),
                         json.dumps(extra, default=str) if extra else None, run_id))

    def record_run(self, fingerprint: str, trainer: str, status: str, noise_multiplier: float,
                   sampling_rate: float, steps: int, delta: float, sampling: str = "poisson",
                   accountant: str = accounting.DEFAULT_ACCOUNTANT, epsilon: Optional[float] = None,
                   run_id: Optional[str] = None, dataset_name: Optional[str] = None,
                   extra: Optional[Dict[str, Any]] = None) -> str:
        """Records a finished DP run in one call (no budget check; use begin_run for that)."""
        if status not in STATUSES[1:]:
            raise ValueError(f"status must be one of {STATUSES[1:]}, got {status!r}.")
        accounting.validate_parameters(noise_multiplier, sampling_rate, steps, delta, accountant,
                                       sampling)
        if epsilon is None:
            epsilon = accounting.compute_epsilon(noise_multiplier, sampling_rate, steps, delta,
                                                 accountant, sampling)
        run_id = run_id or uuid.uuid4().hex[:12]
        now = _now()
        with self._connect(immediate=True) as con:
            con.execute(
                "INSERT INTO runs (run_id, fingerprint, dataset_name, trainer, started, finished, "
                "status, private, noise_multiplier, sampling_rate, steps, planned_steps, sampling, "
                "delta, accountant, epsilon, extra) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, fingerprint, dataset_name, trainer, now, now, status, 1,
                 float(noise_multiplier), float(sampling_rate), int(steps), int(steps), sampling,
                 float(delta), accountant, float(epsilon),
                 json.dumps(extra, default=str) if extra else None))
        return run_id

    def record_non_private(self, fingerprint: str, trainer: str, status: str = "completed",
                           run_id: Optional[str] = None, dataset_name: Optional[str] = None) -> str:
        """Records an (allowed) non-private run: the data set's spend becomes infinite."""
        run_id = run_id or uuid.uuid4().hex[:12]
        now = _now()
        with self._connect(immediate=True) as con:
            con.execute(
                "INSERT INTO runs (run_id, fingerprint, dataset_name, trainer, started, finished, "
                "status, private, epsilon) VALUES (?,?,?,?,?,?,?,?,?)",
                (run_id, fingerprint, dataset_name, trainer, now, now, status, 0, math.inf))
        return run_id

    # -- reporting -----------------------------------------------------------------------------
    def history(self, fingerprint: Optional[str] = None) -> List[Dict[str, Any]]:
        """One dict per data set: budget, composed spend, naive sum and its runs (JSON-able)."""
        with self._connect() as con:
            if fingerprint is None:
                fps = [r[0] for r in con.execute(
                    "SELECT fingerprint FROM budgets UNION SELECT fingerprint FROM runs "
                    "ORDER BY 1").fetchall()]
            else:
                fps = [fingerprint]
            out = []
            for fp in fps:
                budget = self._budget(con, fp)
                spend = self._spend(con, fp)
                runs = []
                for r in con.execute("SELECT * FROM runs WHERE fingerprint=? ORDER BY started, "
                                     "rowid", (fp,)).fetchall():
                    d = {k: r[k] for k in r.keys() if k != "extra"}
                    d["private"] = bool(d["private"])
                    if d["epsilon"] is not None and math.isinf(d["epsilon"]):
                        d["epsilon"] = "inf"
                    d["extra"] = json.loads(r["extra"]) if r["extra"] else None
                    runs.append(d)
                names = [r["dataset_name"] for r in runs if r.get("dataset_name")]
                out.append({
                    "fingerprint": fp,
                    "dataset_name": (budget.dataset_name if budget and budget.dataset_name
                                     else (names[0] if names else None)),
                    "budget": (None if budget is None else
                               {"epsilon": budget.epsilon, "delta": budget.delta,
                                "accountant": budget.accountant}),
                    "spent": {"epsilon": _json_float(spend.epsilon), "delta": spend.delta,
                              "accountant": spend.accountant,
                              "composition": "adaptive composition of all runs' DpEvents",
                              "remaining": _json_float(spend.remaining),
                              "naive_epsilon_sum": _json_float(spend.naive_epsilon_sum),
                              "naive_delta_sum": spend.naive_delta_sum},
                    "runs": runs,
                })
            return out


def _json_float(x: Optional[float]):
    if x is None:
        return None
    return "inf" if math.isinf(x) else x


def format_budget(workdir: Optional[str] = None, fingerprint: Optional[str] = None,
                  as_json: bool = False, ledger: Optional[PrivacyLedger] = None) -> str:
    """Renders the ledger for ``privtrain budget [--json]`` (one call; returns the text)."""
    if ledger is None:
        if workdir is None:
            raise ValueError("format_budget needs a workdir or a ledger.")
        path = os.path.join(workdir, LEDGER_FILENAME)
        if not os.path.exists(path):
            return ("[]" if as_json else
                    f"No privacy ledger in {workdir} yet (it is created by the first DP run).")
        ledger = PrivacyLedger(workdir)
    hist = ledger.history(fingerprint)
    if as_json:
        return json.dumps(hist, indent=2, sort_keys=True)
    if not hist:
        return f"No data sets in the privacy ledger {ledger.path}."
    lines: List[str] = []
    for ds in hist:
        b, s = ds["budget"], ds["spent"]
        title = f"Data set {ds['fingerprint']}" + (f" ({ds['dataset_name']})"
                                                   if ds["dataset_name"] else "")
        lines.append(title)
        if b:
            lines.append(f"  budget:    epsilon={_fmt(b['epsilon'])}  delta={b['delta']:g}  "
                         f"accountant={b['accountant']}")
        else:
            lines.append("  budget:    none set")
        spent = s["epsilon"]
        spent = math.inf if spent == "inf" else spent
        rem = s["remaining"]
        rem = math.inf if rem == "inf" else rem
        lines.append(f"  spent:     epsilon={_fmt(spent)} at delta={s['delta']:g} (composed, "
                     f"{s['accountant']})" + (f"  remaining={_fmt(rem)}" if b else ""))
        naive = s["naive_epsilon_sum"]
        naive = math.inf if naive == "inf" else naive
        lines.append(f"  naive sum: epsilon={_fmt(naive)}  delta={s['naive_delta_sum']:g} "
                     "(reference only)")
        header = ("run_id", "trainer", "started", "status", "sigma", "q", "steps", "sampling",
                  "epsilon", "delta")
        rows = [header]
        for r in ds["runs"]:
            eps = r["epsilon"]
            eps = math.inf if eps == "inf" else eps
            steps = r["steps"] if r["status"] != "running" else f"{r['planned_steps']}*"
            rows.append((r["run_id"], r["trainer"], r["started"], r["status"],
                         _fmt(r["noise_multiplier"]) if r["private"] else "non-private",
                         _fmt(r["sampling_rate"]), str(steps if steps is not None else "-"),
                         r["sampling"] or "-", _fmt(eps), _fmt(r["delta"])))
        if len(rows) > 1:
            widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
            for i, row in enumerate(rows):
                lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
                if i == 0:
                    lines.append("  " + "  ".join("-" * w for w in widths))
            if any(r["status"] == "running" for r in ds["runs"]):
                lines.append("  * running (or interrupted without a record): charged its planned "
                             "steps")
        else:
            lines.append("  no runs recorded")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


