"""The privacy protocol of one training run, in one place (the pipeline's Trainer executor drives it).

1. ``plan_run``: from public inputs only (the data set's privacy declaration, the run's privacy arguments,
   the trainer kind's arguments), the preprocessing release and the trainer kind's plan; their composition
   is the run's planned event. Also used by the runner as a pre-flight check before the pipeline starts.
2. ``RunProtocol.reserve``: verifies the ledger and reserves the planned event against the data source's
   budget in one transaction, or refuses before any private row is used.
3. ``RunProtocol.release_preprocessing`` / the kind's ``train``: the only code that reads private rows.
4. ``RunProtocol.finish``: charges what was actually released (the kind's report; the whole plan if it
   failed without one) and builds the one :class:`~dp_training.guarantee.Guarantee` that ML Metadata,
   ``privacy.json``, the summary and the reports publish.

Trainer kinds never open the ledger; nothing else computes the run's epsilon.
"""
from __future__ import annotations

import dataclasses
import os
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import dp_accounting

from dp_training import accountants, events as ev
from dp_training.contract import PlanInputs, TrainingOutcome, TrainingPlan
from core.dataset import DatasetSpec, PrivacyDeclaration
from dp_training.guarantee import Guarantee, Mechanism
from dp_training.preprocessing import NormalizationPlan, plan_normalization

DEFAULT_TARGET_EPSILON = 3.0
PREPROCESSING_SHARE = 0.1      # default preprocessing epsilon: this share of the run's target
DEFAULT_PREPROCESSING_EPSILON = 0.3   # when the kind's noise is given instead of a target
DEFAULT_MIN_SLICE_SIZE = 30

# Run-level privacy arguments (``privtrain run`` flags), shared by every trainer kind.
PRIVACY_DEFAULTS: Dict[str, Any] = {
    "target_epsilon": None, "delta": None, "accountant": accountants.DEFAULT, "preprocessing_epsilon": None,
    "budget_epsilon": None, "budget_delta": None, "ledger": None, "allow_non_private": False,
    "audit_canaries": 0, "min_slice_size": DEFAULT_MIN_SLICE_SIZE, "label": None,
    # Exported pipelines (pipeline/export.py): the ledger must already exist where the workers run (a missing
    # shared volume must not start a fresh ledger), and must contain the receipt "SEQ:HASH" seen at export.
    "ledger_must_exist": False, "ledger_anchor": None,
    # Receipts ("SEQ", "HASH"[, "where"]) recorded in the run's workdir (ML Metadata, privacy.json files): the
    # ledger must contain them (pipeline/receipts.py collects them at pre-flight and in the Trainer).
    "anchors": (),
    # The reason this data is a new source although the ledger knows its content under another source id.
    "new_source": None,
}


class PlanError(ValueError):
    """The run cannot be planned from its public inputs (the message names the fix)."""


@dataclasses.dataclass(frozen=True)
class RunPlan:
    kind: str
    dataset: str
    source: PrivacyDeclaration
    accountant: str
    delta: float
    target_epsilon: Optional[float]
    preprocessing: NormalizationPlan
    preprocessing_event: dp_accounting.DpEvent
    training: TrainingPlan
    privacy_args: Mapping[str, Any]
    config: Any = None          # the kind's typed KindConfig the plan was made from

    @property
    def private(self) -> bool:
        return self.training.private

    @property
    def event(self) -> dp_accounting.DpEvent:
        if not self.private:
            return dp_accounting.NonPrivateDpEvent()
        return ev.compose(self.preprocessing_event, self.training.event)

    def planned_epsilon(self) -> float:
        return accountants.epsilon(self.event, self.delta, self.accountant, self.source.relation)


def resolve_privacy_args(args: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    out = dict(PRIVACY_DEFAULTS)
    unknown = set(args or {}) - set(out)
    if unknown:
        raise PlanError(f"unknown privacy arguments {sorted(unknown)}; known: {sorted(out)}")
    out.update({k: v for k, v in (args or {}).items() if v is not None})
    return out


def planning_rows(source: PrivacyDeclaration, exact_rows: Optional[int]) -> int:
    """The public size a plan may use: the declared estimate (add/remove-one) or the exact count (replace-one)."""
    if source.relation == ev.REPLACE_ONE:
        if exact_rows is None:
            raise PlanError("under replace_one the plan uses the exact number of training rows; count them first")
        return int(exact_rows)
    if source.public_row_estimate is None:
        raise PlanError(
            f"source {source.source_id!r} is accounted under add_or_remove_one, where the number of rows is "
            "private; declare a public planning figure in dataset.json (privacy.public_row_estimate, e.g. a "
            "rounded size the data owner may publish) or use relation replace_one if the count is public")
    return int(source.public_row_estimate)


def plan_run(spec: DatasetSpec, kind_name: str, kind, trainer_args: Mapping[str, Any],
             privacy_args: Optional[Mapping[str, Any]], numeric_keys, exact_rows: Optional[int] = None) -> RunPlan:
    """Step 1 of the protocol (public inputs only)."""
    source = spec.require_privacy()
    p = resolve_privacy_args(privacy_args)
    accountant = p["accountant"]
    accountants.get(accountant)
    n_plan = planning_rows(source, exact_rows)
    delta = p["delta"] if p["delta"] is not None else 1.0 / (10 * n_plan)
    if not 0 < float(delta) < 1:
        raise PlanError(f"delta must be in (0, 1), got {delta!r}; pass e.g. --delta 1e-5")
    delta = float(delta)
    config = kind_config(kind, trainer_args)   # typed and validated once (ArgumentError names a bad argument)
    private_kind = config.private
    target = p["target_epsilon"]
    if private_kind and target is None and not config.noise_given:
        target = DEFAULT_TARGET_EPSILON   # calibrated: a tenth of it goes to preprocessing
    if target is not None and (not float(target) > 0 or math.isinf(float(target))):
        raise PlanError(f"target epsilon must be a finite number > 0, got {target!r}; pass e.g. --target-epsilon 3")
    if private_kind and numeric_keys:
        pre_eps = p["preprocessing_epsilon"]
        if pre_eps is None:
            pre_eps = PREPROCESSING_SHARE * float(target) if target is not None else DEFAULT_PREPROCESSING_EPSILON
        if target is not None and float(pre_eps) >= float(target):
            raise PlanError(f"--preprocessing-epsilon {pre_eps:g} leaves nothing of the target epsilon {target:g} "
                            "for training; pass a smaller share (e.g. a tenth of the target)")
        pre = plan_normalization(numeric_keys, float(pre_eps), delta, accountant, source.relation)
        pre_event = pre.event()
    else:
        pre = NormalizationPlan(tuple(numeric_keys), 0.0, None)   # exact statistics for non-private runs
        pre_event = dp_accounting.NoOpDpEvent()
    inputs = PlanInputs(kind=kind_name, dataset_name=spec.name, source=source, planning_rows=n_plan,
                        args=config.to_args(), accountant=accountant, delta=delta, base_event=pre_event,
                        target_epsilon=None if target is None else float(target), config=config)
    training = kind.plan(inputs)
    if bool(training.private) != bool(private_kind):
        # the preprocessing above was planned for the config's answer; a plan saying otherwise is a kind's bug
        raise PlanError(f"trainer {kind_name}: its plan says private={training.private} but its config says "
                        f"private={private_kind}; the run is refused (a kind's plan must follow its config)")
    if training.private:
        accountants.check_supported(accountant, ev.compose(pre_event, training.event), source.relation)
    return RunPlan(kind=kind_name, dataset=spec.name, source=source, accountant=accountant, delta=delta,
                   target_epsilon=None if target is None else float(target), preprocessing=pre,
                   preprocessing_event=pre_event, training=training, privacy_args=p, config=config)


def not_covered(spec: DatasetSpec, extra: Tuple[str, ...] = (), eval_note: str = "") -> Tuple[str, ...]:
    """What a run publishes outside the guarantee, by declaration (stated in privacy.json and the summary)."""
    source = spec.require_privacy()
    items = ["the public data-set description (dataset.json) and the reference schema's domains and ranges",
             "the run's hyper-parameters and the public planning size",
             "whether the run published at all: only public inputs, file-level problems, a public split's checks "
             "and a training split with no readable row can stop a run; one private row never does (it is "
             "clipped, mapped out-of-vocabulary or dropped; docs/privacy_model.md, which checks can stop a run)",
             *extra]
    if source.is_public_split("eval"):
        items.append("evaluation metrics: computed on the eval split, which the data set declares public")
    else:
        items.append("evaluation metrics: computed on the PRIVATE eval split and NOT covered by epsilon" + eval_note)
        items.append("the blessing and push decision (whether a model is pushed, and which): it compares eval "
                     "AUC on the PRIVATE eval rows and is NOT covered by epsilon")
    return tuple(items)


def kind_config(kind, trainer_args):
    """The kind's typed config of ``trainer_args`` (``dp_training.contract.KindConfig``): every trainer argument
    parsed and validated once; whether the run is private is the config's ``private``, which the kind's plan
    states. A kind without a ``config`` method (a plain ``plan``/``train`` object) is refused."""
    make = getattr(kind, "config", None)
    if make is None:
        raise PlanError(f"trainer kind {type(kind).__name__} has no typed config; derive it from "
                        "dp_training.contract.TrainerKind with a KindConfig")
    return make(trainer_args)


class RunProtocol:
    """Steps 2-4 for one run against one ledger."""

    def __init__(self, plan: RunPlan, ledger=None, content_digest: Optional[bytes] = None):
        from dp_training.ledger import Ledger, resolve_ledger_path

        self.plan = plan
        self.content_digest = content_digest   # dp_training.fingerprint (private; the ledger keeps an HMAC)
        self.ledger = ledger if ledger is not None else Ledger(resolve_ledger_path(plan.privacy_args["ledger"]))
        self.reservation = None
        self.receipt = None

    def budget_request(self):
        from dp_training.ledger import BudgetRequest

        p = self.plan.privacy_args
        if p["budget_epsilon"] is None:
            return None
        return BudgetRequest(float(p["budget_epsilon"]),
                             float(p["budget_delta"] if p["budget_delta"] is not None else self.plan.delta),
                             self.plan.accountant)

    def anchors(self):
        """Receipts the ledger must contain (``ledger_anchor``); refuses a missing ledger that must exist."""
        p = self.plan.privacy_args
        path = getattr(self.ledger, "path", None)
        if p.get("ledger_must_exist") and path is not None and not os.path.exists(path):
            raise PlanError(f"the budget ledger {path} does not exist here: mount the shared ledger volume at that "
                            "path (an exported pipeline never creates a ledger, so that no run starts a fresh budget)")
        anchors = [tuple(a) for a in (p.get("anchors") or ())]
        if p.get("ledger_anchor"):
            seq, _, head = str(p["ledger_anchor"]).partition(":")
            anchors.append((int(seq), head, "the exported pipeline's ledger_anchor"))
        return anchors

    def _content_args(self) -> Dict[str, Any]:
        return {"content_digest": self.content_digest, "new_source": self.plan.privacy_args.get("new_source")}

    def check(self) -> None:
        """Pre-flight before the pipeline starts: the ledger verifies, and the plan would be accepted now
        (the executor's reservation repeats the check atomically)."""
        anchors = self.anchors()
        check = getattr(self.ledger, "check", None)
        if check is None:
            self.ledger.verify(anchors)
            return
        check(self.plan.source.source_id, self.plan.event, trainer=self.plan.kind, private=self.plan.private,
              anchors=anchors, **self._content_args(),
              accountant=self.plan.accountant, relation=self.plan.source.relation, delta=self.plan.delta,
              budget=self.budget_request(), allow_non_private=bool(self.plan.privacy_args["allow_non_private"]))

    def reserve(self):
        anchors = self.anchors()
        self.ledger.verify(anchors)
        self.reservation = self.ledger.reserve(
            self.plan.source.source_id, self.plan.event, trainer=self.plan.kind, private=self.plan.private,
            anchors=anchors, **self._content_args(),
            accountant=self.plan.accountant, relation=self.plan.source.relation, delta=self.plan.delta,
            budget=self.budget_request(), allow_non_private=bool(self.plan.privacy_args["allow_non_private"]),
            label=self.plan.privacy_args.get("label"))
        return self.reservation

    def fail(self, released_training: Optional[dp_accounting.DpEvent], status: str = "failed") -> None:
        """Charges a failed run: the preprocessing (already released) plus what training reported, or the
        whole plan when it reported nothing."""
        if self.reservation is None:
            return
        if released_training is None or not self.plan.private:
            released = self.plan.event
        else:
            released = ev.compose(self.plan.preprocessing_event, released_training)
        self.receipt = self.ledger.finish(self.reservation, released, status)

    def finish(self, outcome: TrainingOutcome, not_covered: Tuple[str, ...] = (),
               audit: Optional[Mapping[str, Any]] = None, preprocessing_covers: Optional[str] = None) -> Guarantee:
        plan = self.plan
        released = (ev.compose(plan.preprocessing_event, outcome.released_event) if plan.private
                    else dp_accounting.NonPrivateDpEvent())
        self.receipt = self.ledger.finish(self.reservation, released, "completed")
        spend = self.ledger.spend(plan.source.source_id)
        relation = plan.source.relation
        eps = accountants.epsilon(released, plan.delta, plan.accountant, relation)
        mechanisms = []
        if plan.private and not isinstance(plan.preprocessing_event, dp_accounting.NoOpDpEvent):
            mechanisms.append(Mechanism(
                "DP normalisation statistics (Gaussian)",
                preprocessing_covers or "the numeric features' normalisation means and standard deviations",
                ev.to_json(plan.preprocessing_event),
                accountants.epsilon(plan.preprocessing_event, plan.delta, plan.accountant, relation)))
        if plan.private:
            mechanisms.append(Mechanism(
                plan.training.mechanism, "the model's trained weights",
                ev.to_json(outcome.released_event),
                accountants.epsilon(outcome.released_event, plan.delta, plan.accountant, relation)))
        parameters = {**dict(plan.training.public), **dict(outcome.public_details)}
        simulation = simulation_statement(plan) if plan.private else None
        if plan.private and plan.preprocessing.feature_keys:
            parameters["preprocessing_noise_multiplier"] = plan.preprocessing.noise_multiplier
        ledger = {"seq": self.receipt.seq, "head_hash": self.receipt.head_hash, "run_id": self.reservation.run_id,
                  "spent_epsilon": _num(spend.epsilon), "spent_at_delta": spend.delta,
                  "budget_epsilon": spend.budget_epsilon, "remaining_epsilon": spend.remaining,
                  "runs": spend.runs}
        return Guarantee(
            private=plan.private, epsilon=eps, delta=plan.delta, accountant=plan.accountant, relation=relation,
            unit=plan.source.unit, source_id=plan.source.source_id, dataset=plan.dataset, trainer=plan.kind,
            mechanisms=tuple(mechanisms), event=ev.to_json(released), parameters=parameters,
            target_epsilon=plan.target_epsilon, ledger=ledger, audit=audit,
            not_covered=tuple(not_covered), notes=tuple(plan.training.notes), simulation=simulation)


def deployment_epsilon(plan: RunPlan) -> Optional[float]:
    """Epsilon of the deployment a simulation setting states (its preprocessing composed with the deployment's
    training event), at the run's delta; None for an ordinary run."""
    sim = plan.training.simulation
    if sim is None or not plan.private:
        return None
    event = ev.compose(plan.preprocessing_event, sim.deployment_event)
    return accountants.epsilon(event, plan.delta, plan.accountant, plan.source.relation)


def simulation_statement(plan: RunPlan) -> Optional[Dict[str, Any]]:
    """The guarantee's ``simulation_setting``: what the calibrated figure covers and what it does not."""
    sim = plan.training.simulation
    if sim is None:
        return None
    d = dict(sim.parameters)
    covers = (f"a run with {d.get('noise_cohort_size')} clients per round sampled from a population of "
              f"{d.get('noise_population')} clients, {d.get('rounds')} rounds, the same clip norm and the same noise "
              "on the mean of the clipped client updates")
    return {"label": sim.label, "deployment_epsilon": deployment_epsilon(plan),
            "deployment_event": ev.to_json(ev.compose(plan.preprocessing_event, sim.deployment_event)),
            "deployment": d, "covers": covers,
            "does_not_cover": "the simulated data: with fewer clients per round than the stated cohort, each "
                              "client's update carries more weight relative to the same noise; the simulated run is "
                              "accounted as it ran (the guarantee's epsilon, charged to the ledger)"}


def _num(x):
    return "inf" if isinstance(x, float) and math.isinf(x) else x


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


def check_combined(combined: CombinedPlan, privacy_args: Optional[Mapping[str, Any]] = None, ledger=None,
                   label: str = "study") -> None:
    """Pre-flight for several runs at once: would the source's ledger accept all of them, composed with what
    it already holds? Raises what the reservation would raise (BudgetExceededError, NonPrivateTrainingRefused,
    ...); appends nothing. Each run still reserves its own event when it starts."""
    from dp_training.ledger import BudgetRequest, Ledger, resolve_ledger_path

    p = resolve_privacy_args(privacy_args)
    ledger = ledger if ledger is not None else Ledger(resolve_ledger_path(p["ledger"]))
    budget = None
    if p["budget_epsilon"] is not None:
        budget = BudgetRequest(float(p["budget_epsilon"]), float(p["budget_delta"] if p["budget_delta"] is not None
                                                                 else combined.delta), combined.accountant)
    common = dict(accountant=combined.accountant, relation=combined.source.relation, delta=combined.delta,
                  budget=budget, allow_non_private=bool(p["allow_non_private"]))
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


__all__ = ["RunPlan", "RunProtocol", "plan_run", "kind_config", "not_covered", "planning_rows", "resolve_privacy_args", "PlanError",
           "PRIVACY_DEFAULTS", "DEFAULT_TARGET_EPSILON", "deployment_epsilon", "simulation_statement",
           "combine_plans", "check_combined", "CombinedPlan", "ledger_charge", "LedgerCharge"]


@dataclasses.dataclass
class PrivateRunResult:
    outcome: TrainingOutcome
    guarantee: Guarantee
    normalization: Any          # dp_training.preprocessing.NormalizationStats (covered by the guarantee)
    plan: RunPlan


def run_private_training(spec: DatasetSpec, kind_name: str, trainer_args: Mapping[str, Any],
                         privacy_args: Optional[Mapping[str, Any]], train_x, train_y, eval_x, eval_y,
                         scratch_dir: str, kind, log=print, hidden_units=(64, 64),
                         not_covered: Tuple[str, ...] = (), ledger=None,
                         numeric_keys: Optional[Sequence[str]] = None, preprocessing=None,
                         model_builder=None, plan_options=None) -> PrivateRunResult:
    """The whole protocol for one run on model inputs already transformed with the public transform
    (``core.features``): plan -> reserve -> DP normalisation -> train -> finish -> guarantee.

    Used by the pipeline's Trainer executor and by code that trains without TFX (benchmarks, studies,
    the federated simulator): the same plan, ledger rules and guarantee everywhere. ``numeric_keys``: the
    features the DP normalisation covers (default every numeric feature; ``[]``: none, the model then
    standardises nothing beyond the public [0, 1] scaling).

    Image data sets (``dp_training.images``) pass ``preprocessing`` (an object with ``keys``, ``covers`` and
    ``release(plan, train_x) -> stats``: their DP release, planned and charged here like the tabular one) and
    ``model_builder(stats) -> model``.

    The plan is ``dp_training.planner.plan_for`` (``plan_options``: its ``PlanOptions``; ``numeric_keys`` and the
    exact row count under replace_one go into them): the same function the pre-flight, export and study use, so
    what they state is what this reserves. The preprocessing the plan covers must be the one released here."""
    import os

    from dp_training.contract import TrainerContext, TrainingInterrupted
    from dp_training.model import bucket_sizes, build_model
    from dp_training.preprocessing import release_normalization

    from dp_training.planner import PlanOptions, plan_for

    source = spec.require_privacy()
    exact = int(len(train_y)) if source.relation == ev.REPLACE_ONE else None
    options = dataclasses.replace(plan_options or PlanOptions(), exact_rows=exact)
    if numeric_keys is not None:
        options = dataclasses.replace(options, numeric_keys=tuple(numeric_keys))
    if getattr(kind, "name", kind_name) != kind_name:
        raise PlanError(f"trainer kind {kind_name!r} was given the kind object of {kind.name!r}")
    plan = plan_for(spec, kind, trainer_args, privacy_args, options)
    numeric_keys = list(plan.preprocessing.feature_keys)
    if preprocessing is not None and list(preprocessing.keys) != numeric_keys and plan.private:
        raise PlanError(f"the run's preprocessing releases {len(list(preprocessing.keys))} key(s) but its plan covers "
                        f"{len(numeric_keys)}; the release must be the planned one")
    if plan.private:
        log(f"privacy plan: {plan.training.mechanism}; planned epsilon {plan.planned_epsilon():.4g} at delta "
            f"{plan.delta:.3g} ({plan.accountant}, {source.relation} of one {source.unit_name})")
        if plan.training.simulation is not None:
            log(f"{plan.training.simulation.label}: the noise is calibrated for a deployment with epsilon "
                f"{deployment_epsilon(plan):.4g} at delta {plan.delta:.3g}, which does not cover this simulation's "
                f"data; this run is accounted as it runs (planned epsilon above)")
    if int(plan.privacy_args.get("audit_canaries") or 0) > 0 and preprocessing is not None:
        raise PlanError("the one-run audit's canaries are tabular rows; --audit-canaries is not supported for "
                        "image data sets yet: drop the flag")
    from dp_training.fingerprint import content_digest

    protocol = RunProtocol(plan, ledger, content_digest=content_digest(spec))
    protocol.reserve()
    audit_setup = None
    canaries_m = int(plan.privacy_args.get("audit_canaries") or 0)
    if canaries_m > 0:
        train_x, train_y, audit_setup = _insert_canaries(spec, train_x, train_y, canaries_m)
        log(f"audit: {canaries_m} synthetic canaries, each inserted with probability 1/2")
    try:
        if preprocessing is not None:
            stats = preprocessing.release(plan.preprocessing, train_x)
            builder = lambda: model_builder(stats)  # noqa: E731
        else:
            stats = (release_normalization(plan.preprocessing, {k: train_x[k] for k in numeric_keys})
                     if numeric_keys else None)
            buckets = bucket_sizes(spec)
            builder = lambda: build_model(spec, buckets, stats, tuple(hidden_units))  # noqa: E731
        from core.private_files import owner_only, private_dir

        private_dir(scratch_dir, "scratch directory")   # checkpoints and logs of the private rows: owner only
        context = TrainerContext(
            dataset_name=spec.name, train_features=train_x, train_labels=train_y, eval_features=eval_x,
            eval_labels=eval_y, build_model=builder,
            args=plan.config.to_args(), plan=plan.training, scratch_dir=scratch_dir, source=source, log=log)
        with owner_only():   # everything the kind writes is 0600/0700, the caller's umask restored after
            outcome = kind.train(context)
    except TrainingInterrupted as e:
        protocol.fail(e.released_event, "cancelled" if isinstance(e.cause, KeyboardInterrupt) else "failed")
        raise e.cause from None
    except BaseException:
        protocol.fail(None, "failed")
        raise
    guarantee = protocol.finish(outcome, not_covered=not_covered,
                                preprocessing_covers=getattr(preprocessing, "covers", None))
    if audit_setup is not None:
        guarantee = guarantee.with_audit(_run_audit(outcome.model, audit_setup, guarantee))
        log(f"audit: empirical epsilon lower bound {guarantee.audit['epsilon_lower_bound']:.3g} "
            f"(stated {guarantee.epsilon:.3g}; {guarantee.audit['confidence']:.0%} confidence)")
    log(f"privacy: {guarantee.statement()}")
    return PrivateRunResult(outcome, guarantee, stats, plan)


def _insert_canaries(spec: DatasetSpec, train_x, train_y, m: int):
    """One-run audit set-up (dp_training.audit): m canaries from the public domains (numeric inputs are the
    public transform's [0, 1] scale, categorical ids the public domain plus the out-of-vocabulary id), each
    added to the training rows with probability 1/2 before any release, so the audit covers the whole run."""
    import secrets

    import numpy as np

    from dp_training import audit
    from core.features import categorical_key, numeric_key
    from dp_training.model import bucket_sizes

    buckets = bucket_sizes(spec)
    layout = {numeric_key(c): None for c in spec.numeric_features}
    layout.update({categorical_key(c): buckets[c] for c in spec.categorical_features})
    rng = np.random.default_rng(secrets.randbits(128))
    canaries = audit.make_canaries(layout, m, rng, numeric_range=(0.0, 1.0))
    x, y, included = audit.insert({k: train_x[k] for k in layout}, train_y, canaries, rng)
    return x, y, (canaries, included)


def _run_audit(model, setup, guarantee: Guarantee) -> dict:
    import numpy as np

    from dp_training import audit

    canaries, included = setup

    def logits(features):
        return np.asarray(model({k: np.asarray(v) for k, v in features.items()}, training=False)).reshape(-1)

    result = audit.run_audit(logits, canaries, included, delta=guarantee.delta,
                             stated_epsilon=guarantee.epsilon if guarantee.private else None)
    return result.to_dict()
