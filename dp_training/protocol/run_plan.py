"""Step 1 of the run protocol: the run's plan from public inputs only (``dp_training.protocol``).

``plan_run``: from the data set's privacy declaration, the run's privacy options
(:class:`~dp_training.protocol.options.PrivacyOptions`) and the trainer kind's arguments, the preprocessing
release and the trainer kind's plan; their composition is the run's planned event (a :class:`RunPlan`). Called
through ``dp_training.planner.plan_for`` by the pre-flight, export, studies and the Trainer, so that what they
state is what the run reserves. Also: the public planning size (``planning_rows``), what a run publishes outside
its guarantee (``not_covered``) and a simulation setting's stated deployment (``deployment_epsilon``,
``simulation_statement``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import dp_accounting

from dp_training import accountants, events as ev
from dp_training.contract import PlanInputs, TrainingPlan
from core.dataset import DatasetSpec, PrivacyDeclaration
from dp_training.preprocessing import NormalizationPlan, plan_normalization
from dp_training.protocol import options as _options
from dp_training.protocol.options import DEFAULT_TARGET_EPSILON, PlanError, PrivacyOptions


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
    privacy: PrivacyOptions     # the run's privacy options, validated once
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

    @property
    def privacy_args(self) -> Dict[str, Any]:
        """The privacy options as a plain mapping (``PrivacyOptions.to_mapping``)."""
        return self.privacy.to_mapping()


def resolve_privacy_args(args: "Union[Mapping[str, Any], PrivacyOptions, None]") -> Dict[str, Any]:
    """Every privacy argument, defaults filled in, validated (``PrivacyOptions.from_mapping(args).to_mapping()``)."""
    return PrivacyOptions.from_mapping(args).to_mapping()


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
             privacy_args: "Union[Mapping[str, Any], PrivacyOptions, None]", numeric_keys,
             exact_rows: Optional[int] = None) -> RunPlan:
    """Step 1 of the protocol (public inputs only). ``privacy_args``: a ``PrivacyOptions`` or a plain mapping
    (converted once)."""
    source = spec.require_privacy()
    p = PrivacyOptions.from_mapping(privacy_args)
    accountant = p.accountant
    n_plan = planning_rows(source, exact_rows)
    delta = p.delta if p.delta is not None else 1.0 / (10 * n_plan)
    if not 0 < float(delta) < 1:
        raise PlanError(f"delta must be in (0, 1), got {delta!r}; pass e.g. --delta 1e-5")
    delta = float(delta)
    config = kind_config(kind, trainer_args)   # typed and validated once (ArgumentError names a bad argument)
    private_kind = config.private
    target = p.target_epsilon
    if private_kind and target is None and not config.noise_given:
        target = DEFAULT_TARGET_EPSILON   # calibrated: a tenth of it goes to preprocessing
    if private_kind and numeric_keys:
        pre_eps = p.preprocessing_epsilon
        if pre_eps is None:
            pre_eps = (_options.PREPROCESSING_SHARE * float(target) if target is not None
                       else _options.DEFAULT_PREPROCESSING_EPSILON)
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
                   preprocessing_event=pre_event, training=training, privacy=p, config=config)


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


__all__ = ["RunPlan", "plan_run", "kind_config", "not_covered", "planning_rows", "resolve_privacy_args",
           "deployment_epsilon", "simulation_statement"]
