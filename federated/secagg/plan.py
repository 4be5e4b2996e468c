"""Planning a federated run with secure aggregation (public inputs only): the event, the mechanism, the threat
model. Called by ``federated.trainer.plan_training`` when ``secure_aggregation`` is set."""
from __future__ import annotations

import types
from typing import Any, Dict

import dp_accounting

from dp_training import accountants, calibration
from dp_training.contract import PlanInputs, TrainingPlan
from federated.secagg import accounting
from federated.secagg.rounds import check_config, min_clients

THREAT_MODEL = (
    "held against the server (and anyone who sees the model or the sums): it receives only SecAgg+ protocol "
    "messages, masked vectors that are uniform in the ring, and each round's decoded sum, which carries the "
    "discrete Gaussian noise of at least {floor} clients. Assumptions: the clients whose noise the sum holds are "
    "honest (a client colluding with the server can remove its own noise share, so c colluding clients leave "
    "the noise of the others); fewer than {half} of any client's {k} neighbours collude with the server; the "
    "clients' signing keys come from a PKI the server does not control, and the round parameters (cohort, "
    "threshold, degree, noise floor) from the run configuration, not from the server; clients that drop before "
    "sending their masked input add no noise, and the clients refuse to unmask a sum of fewer than {floor} inputs "
    "(signed by as many of its members)")


def plan_secure(inputs: PlanInputs, a: Dict[str, Any], part, public: Dict[str, Any], internal: Dict[str, Any],
                z) -> TrainingPlan:
    from federated import trainer as kind
    from federated.secagg.rounds import DEGREE, SMALL_COHORT

    check_config(types.SimpleNamespace(**a))
    per_round, rounds = internal["clients_per_round"], internal["rounds"]
    floor = min_clients(per_round, float(a["dropout_rate"]), a["sampling"])
    k = per_round - 1 if per_round <= SMALL_COHORT else DEGREE
    public.update({"secure_aggregation": "SecAgg+ (X25519, Ed25519, ChaCha20, Shamir shares of mask seeds)",
                   "noise_floor_clients": floor, "secagg_neighbours": k, "secagg_threshold": k // 2 + 1,
                   "dp_clip": float(a["dp_clip"])})
    if z is None or z == 0.0:
        public["strategy"] = "federated averaging with secure aggregation, without noise (the server sees sums)"
        internal.update({"noise_multiplier": None, "mode": None})
        return TrainingPlan(event=dp_accounting.NonPrivateDpEvent(), private=False,
                            mechanism="none (secure aggregation without DP noise: no differential privacy)",
                            public=public, internal=internal)
    mode = kind.accounting_mode(inputs.source, part)
    if inputs.source.unit_column is not None and not isinstance(inputs.base_event, dp_accounting.NoOpDpEvent):
        raise ValueError("the run's DP preprocessing is accounted per row, but this source's unit is "
                         f"{inputs.source.unit}: use privtrain simulate federated (public scaling for column units)")
    if inputs.accountant != "rdp":
        raise ValueError("secure aggregation's distributed discrete Gaussian is accounted by its Renyi-DP (zCDP) "
                         "bound, which the PLD accountant cannot compose: pass --accountant rdp")
    replace = mode == "replace"
    target = inputs.target_epsilon
    calibrated = z == kind.AUTO
    if calibrated:
        target = kind.DEFAULT_TARGET_EPSILON if target is None else float(target)
        z = calibration.calibrate(
            target, lambda s: accounting.planned_event(s, floor, rounds, replace), inputs.delta, inputs.accountant,
            inputs.relation, inputs.base_event,
            what=f"{rounds} rounds with secure aggregation (noise floor {floor} clients, no sampling amplification)",
            fix="Raise the target epsilon or run fewer rounds.")
    elif target is not None:
        raise ValueError(f"give either --dp-noise-multiplier or --target-epsilon, not both (got {z!r} and "
                         f"{target!r})")
    z = float(z)
    event = accounting.planned_event(z, floor, rounds, replace)
    accountants.check_supported(inputs.accountant, event, inputs.relation)
    public.update({"strategy": "dp-fedavg with secure aggregation and distributed DP", "noise_multiplier": z,
                   "noise_calibrated": calibrated, "adaptive_clipping": False,
                   "client_sampling_rate": per_round / internal["clients"],
                   "accounting": ("one unit's change replaces one client's update (sensitivity twice the norm "
                                  "bound)" if replace else "one unit adds or removes one client's update"),
                   "aggregation": "unweighted mean: the SecAgg+ sum of the clients' quantised clipped updates and "
                                  "their discrete Gaussian noise shares, divided by the public clients_per_round"})
    internal.update({"noise_multiplier": z, "mode": mode, "secagg": {"min_clients": floor, "replace": replace}})
    mechanism = (f"DP-FedAvg with secure aggregation: SecAgg+ (Bell et al. 2020) and the distributed discrete "
                 f"Gaussian (Kairouz et al. 2021; zCDP per round, {rounds} rounds composed, no amplification by "
                 f"client sampling), " + THREAT_MODEL.format(floor=floor, half=k // 2 + 1, k=k))
    notes = (f"the noise of each round's sum is that of at least {floor} clients (the clients' own check); a "
             "round with fewer surviving clients is aborted and releases nothing",
             "the epsilon is stated without amplification by client sampling: the server knows which clients "
             "took part")
    return TrainingPlan(event=event, private=True, mechanism=mechanism, public=public, internal=internal,
                        notes=notes)


def released_event(internal: Dict[str, Any], rounds: int) -> dp_accounting.DpEvent:
    s = internal["secagg"]
    return accounting.planned_event(internal["noise_multiplier"], s["min_clients"], rounds, s["replace"])
