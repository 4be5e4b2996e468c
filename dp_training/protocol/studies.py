"""Several planned runs on one data source at once (a study's grid; ``dp_training.protocol``).

``combine_plans``: their composed event, accounted once (not a sum of epsilons); ``check_combined``: would the
source's ledger accept all of them now (a pre-flight; each run still reserves its own event when it starts);
``ledger_charge``: what the ledger already holds for a group of runs (by label).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence, Union

import dp_accounting

from dp_training import accountants, events as ev
from core.dataset import PrivacyDeclaration
from dp_training.protocol.options import PlanError, PrivacyOptions
from dp_training.protocol.run_plan import RunPlan


@dataclasses.dataclass(frozen=True)
class CombinedPlan:
    """Several planned runs on one data source (a study's grid): their composed event and its epsilon."""
    source: PrivacyDeclaration
    accountant: str
    delta: float
    runs: int
    private_runs: int
    event: dp_accounting.DpEvent        # the composition of every private run's planned event
    epsilon: float                      # of every run: inf when any run is non-private
    private_epsilon: float = 0.0        # of ``event`` (the private runs alone)

    @property
    def non_private_runs(self) -> int:
        return self.runs - self.private_runs


def combine_plans(plans: Sequence[RunPlan]) -> CombinedPlan:
    """The total privacy cost of several planned runs on one source: the composition of their events,
    accounted once (not a sum of epsilons). Every plan must share the source, delta, accountant and relation;
    a non-private plan makes the total unbounded."""
    if not plans:
        raise PlanError("no runs to combine")
    first = plans[0]
    for p in plans[1:]:
        if (p.source.source_id, p.delta, p.accountant) != (first.source.source_id, first.delta, first.accountant):
            raise PlanError("the runs of one study must share the data source, delta and accountant; got "
                            f"{first.source.source_id}/{first.delta:g}/{first.accountant} and "
                            f"{p.source.source_id}/{p.delta:g}/{p.accountant}")
    private = [p for p in plans if p.private]
    event = ev.compose(*[p.event for p in private]) if private else dp_accounting.NoOpDpEvent()
    private_eps = accountants.epsilon(event, first.delta, first.accountant, first.source.relation) if private else 0.0
    eps = math.inf if len(private) < len(plans) else private_eps
    return CombinedPlan(source=first.source, accountant=first.accountant, delta=first.delta, runs=len(plans),
                        private_runs=len(private), event=event, epsilon=eps, private_epsilon=private_eps)


@dataclasses.dataclass(frozen=True)
class LedgerCharge:
    """What the ledger holds for a group of runs (e.g. a study's entries, by label): the composition of every
    entry's charged event (released if finished, else planned), accounted once by the privacy layer."""
    source_id: str
    label_prefix: str
    accountant: str
    delta: float
    relation: str
    runs: int
    non_private_runs: int
    not_completed: int                 # failed, cancelled or still open: charged all the same
    epsilon: float                     # inf when any entry is non-private
    private_epsilon: float             # of the private entries alone


def ledger_charge(source: PrivacyDeclaration, label_prefix: str, delta: float, accountant: str,
                  ledger=None) -> LedgerCharge:
    """The composition of every ledger entry on ``source`` whose label starts with ``label_prefix`` (each
    attempt counted, also a failed or interrupted one), at ``delta`` with ``accountant``."""
    from dp_training.ledger import Ledger, resolve_ledger_path

    ledger = ledger if ledger is not None else Ledger(resolve_ledger_path(None))
    entries = ledger.charged_events(source.source_id, label_prefix)
    private = [e for _, _, e in entries if not ev.is_non_private(e) and not isinstance(e, dp_accounting.NoOpDpEvent)]
    non_private = sum(1 for _, _, e in entries if ev.is_non_private(e))
    private_eps = (accountants.epsilon(ev.compose(*private), delta, accountant, source.relation) if private
                   else 0.0)
    return LedgerCharge(source_id=source.source_id, label_prefix=label_prefix, accountant=accountant,
                        delta=float(delta), relation=source.relation, runs=len(entries),
                        non_private_runs=non_private,
                        not_completed=sum(1 for _, status, _ in entries if status != "completed"),
                        epsilon=math.inf if non_private else private_eps, private_epsilon=private_eps)


def check_combined(combined: CombinedPlan,
                   privacy_args: "Union[Mapping[str, Any], PrivacyOptions, None]" = None, ledger=None,
                   label: str = "study") -> None:
    """Pre-flight for several runs at once: would the source's ledger accept all of them, composed with what
    it already holds? Raises what the reservation would raise (BudgetExceededError, NonPrivateTrainingRefused,
    ...); appends nothing. Each run still reserves its own event when it starts."""
    from dp_training.ledger import BudgetRequest, Ledger, resolve_ledger_path

    p = PrivacyOptions.from_mapping(privacy_args)
    ledger = ledger if ledger is not None else Ledger(resolve_ledger_path(p.ledger))
    budget = None
    if p.budget_epsilon is not None:
        budget = BudgetRequest(p.budget_epsilon, p.budget_delta if p.budget_delta is not None else combined.delta,
                               combined.accountant)
    common = dict(accountant=combined.accountant, relation=combined.source.relation, delta=combined.delta,
                  budget=budget, allow_non_private=p.allow_non_private)
    if combined.private_runs and combined.non_private_runs and (
            budget is not None or ledger.get_budget(combined.source.source_id) is not None):
        from dp_training.ledger import NonPrivateTrainingRefused

        # the ledger's rule: a non-private run makes the spend unbounded, and every private run after it is refused
        raise NonPrivateTrainingRefused(
            f"source {combined.source.source_id!r} has a privacy budget and the runs mix {combined.private_runs} "
            f"private and {combined.non_private_runs} non-private run(s): after the first non-private run the "
            "ledger's spend is unbounded and every later private run would be refused. Nothing was run. Run the "
            "non-private runs separately (another study, after the private one), or on a data set without a budget")
    if combined.private_runs:
        ledger.check(combined.source.source_id, combined.event, trainer=label, private=True, **common)
    if combined.non_private_runs:
        ledger.check(combined.source.source_id, dp_accounting.NonPrivateDpEvent(), trainer=label, private=False,
                     **common)


__all__ = ["CombinedPlan", "combine_plans", "check_combined", "LedgerCharge", "ledger_charge"]
