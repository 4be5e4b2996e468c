"""Steps 2-4 of the run protocol: one run's session against the budget ledger (``dp_training.protocol``).

2. ``RunProtocol.reserve``: verifies the ledger and reserves the planned event against the data source's
   budget in one transaction, or refuses before any private row is used.
3. The preprocessing release and the kind's ``train``: the only code that reads private rows.
4. ``RunProtocol.finish`` (``fail`` when the run broke): charges what was actually released (the kind's report;
   the whole plan if it failed without one) and builds the one :class:`~dp_training.guarantee.Guarantee` that
   ML Metadata, ``privacy.json``, the summary and the reports publish.

``run_private_training`` is the whole path (plan -> reserve -> DP preprocessing -> train -> finish), TFX-free.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import dp_accounting

from dp_training import accountants, events as ev
from dp_training.contract import TrainingOutcome
from core.dataset import DatasetSpec
from dp_training.guarantee import Guarantee, Mechanism
from dp_training.protocol.options import PlanError, PrivacyOptions
from dp_training.protocol.run_plan import RunPlan, deployment_epsilon, simulation_statement


class RunProtocol:
    """Steps 2-4 for one run against one ledger."""

    def __init__(self, plan: RunPlan, ledger=None, content_digest: Optional[bytes] = None):
        from dp_training.ledger import Ledger, resolve_ledger_path

        self.plan = plan
        self.content_digest = content_digest   # dp_training.fingerprint (private; the ledger keeps an HMAC)
        self.ledger = ledger if ledger is not None else Ledger(resolve_ledger_path(plan.privacy.ledger))
        self.reservation = None
        self.receipt = None

    def budget_request(self):
        from dp_training.ledger import BudgetRequest

        p = self.plan.privacy
        if p.budget_epsilon is None:
            return None
        return BudgetRequest(p.budget_epsilon, p.budget_delta if p.budget_delta is not None else self.plan.delta,
                             self.plan.accountant)

    def anchors(self):
        """Receipts the ledger must contain (``ledger_anchor``); refuses a missing ledger that must exist."""
        p = self.plan.privacy
        path = getattr(self.ledger, "path", None)
        if p.ledger_must_exist and path is not None and not os.path.exists(path):
            raise PlanError(f"the budget ledger {path} does not exist here: mount the shared ledger volume at that "
                            "path (an exported pipeline never creates a ledger, so that no run starts a fresh budget)")
        anchors = [tuple(a) for a in p.anchors]
        if p.ledger_anchor:
            seq, _, head = p.ledger_anchor.partition(":")
            anchors.append((int(seq), head, "the exported pipeline's ledger_anchor"))
        return anchors

    def _content_args(self) -> Dict[str, Any]:
        return {"content_digest": self.content_digest, "new_source": self.plan.privacy.new_source}

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
              budget=self.budget_request(), allow_non_private=self.plan.privacy.allow_non_private)

    def reserve(self):
        anchors = self.anchors()
        self.ledger.verify(anchors)
        self.reservation = self.ledger.reserve(
            self.plan.source.source_id, self.plan.event, trainer=self.plan.kind, private=self.plan.private,
            anchors=anchors, **self._content_args(),
            accountant=self.plan.accountant, relation=self.plan.source.relation, delta=self.plan.delta,
            budget=self.budget_request(), allow_non_private=self.plan.privacy.allow_non_private,
            label=self.plan.privacy.label)
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


def _num(x):
    return "inf" if isinstance(x, float) and math.isinf(x) else x


@dataclasses.dataclass
class PrivateRunResult:
    outcome: TrainingOutcome
    guarantee: Guarantee
    normalization: Any          # dp_training.preprocessing.NormalizationStats (covered by the guarantee)
    plan: RunPlan


def run_private_training(spec: DatasetSpec, kind_name: str, trainer_args: Mapping[str, Any],
                         privacy_args: "Union[Mapping[str, Any], PrivacyOptions, None]",
                         train_x, train_y, eval_x, eval_y,
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
    what they state is what this reserves. The preprocessing the plan covers must be the one released here.
    ``privacy_args``: a ``PrivacyOptions`` or a plain mapping (converted once)."""
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
    plan = plan_for(spec, kind, trainer_args, PrivacyOptions.from_mapping(privacy_args), options)
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
    if plan.privacy.audit_canaries > 0 and preprocessing is not None:
        raise PlanError("the one-run audit's canaries are tabular rows; --audit-canaries is not supported for "
                        "image data sets yet: drop the flag")
    from dp_training.fingerprint import content_digest

    protocol = RunProtocol(plan, ledger, content_digest=content_digest(spec))
    protocol.reserve()
    audit_setup = None
    canaries_m = plan.privacy.audit_canaries
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


__all__ = ["RunProtocol", "run_private_training", "PrivateRunResult"]
