"""The ``federated`` trainer kind: FedAvg / DP-FedAvg with TFF on the privacy layer's plan/train contract.

``plan`` (public inputs only) returns the event the run will release; the executor (the pipeline's, or
``federated.simulate``) reserves it in the source's ledger, then ``train`` runs the rounds and reports what was
released. The kind never opens the ledger and writes only to ``context.scratch_dir`` (private).

When is a run private? ``dp_noise_multiplier`` > 0, or ``"auto"`` (calibrated to the run's target epsilon,
composed with the run's DP preprocessing); ``privtrain run/simulate --target-epsilon E`` without
``--dp-noise-multiplier`` means ``auto``. Absent or 0 → non-private (``NonPrivateDpEvent``; 0 still runs the
DP aggregator's clipping and unweighted mean, without noise); a negative value is refused.

What the guarantee protects (``docs/federated.md``):

* Unit ``column:X`` and ``--partition column:X``: one client per person (a value of X in its public domain;
  rows whose X is missing or outside the domain belong to nobody and are left out). The client population K
  (domain size + 1) is public. Poisson sampling: ``SelfComposed(PoissonSampled(m/K, Gaussian(z)), rounds)``
  under add/remove-one, exact (an absent person's client is empty and contributes nothing).
* Unit ``row`` (or several persons per client: ``hash:X`` for unit ``column:X``): the partition must be
  row-stable (a row's client depends only on that row and the public seed), so adding or removing one row
  changes exactly one client's data: a *replacement* of one client (its clipped update moves by up to 2C).
  The event is ``ReplaceAdjacencyDpEvent(client event)``, which the accountants analyse under replace-one and
  compose with the rest of the run under the source's relation. Only under ``add_or_remove_one``; under
  ``replace_one`` a row replacement can change two clients and is refused.
* Fixed-size sampling (exactly m of K, without replacement): ``SampledWithoutReplacement(K, m, Gaussian(z))``
  per round, always wrapped in ``ReplaceAdjacencyDpEvent`` (dp_accounting has it only under replace-one, where
  the RDP accountant supports it: ``--accountant rdp``).

Public details are the hyper-parameters and the code path; every per-round or per-client figure (sampled and
participant counts, examples, client losses, shard sizes, label rates, timings) stays in the private details
and the scratch directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from typing import Any, ClassVar, Dict, Mapping, Optional, Union

import dp_accounting
import numpy as np

from dp_training import accountants, calibration, events
from dp_training.contract import (ArgumentError, KindConfig, PlanInputs, SimulationSetting, TrainerContext,
                                  TrainerKind, TrainingInterrupted, TrainingOutcome, TrainingPlan, parse_bool,
                                  parse_choice, parse_number, parse_text, parse_whole)
from federated.engine import FederatedConfig
from federated.partition import PartitionSpec

DEFAULT_TARGET_EPSILON = 3.0
AUTO = "auto"
SAMPLINGS = ("poisson", "fixed")
_CONFIG_FIELDS = ("clients", "clients_per_round", "rounds", "local_epochs", "client_batch_size", "partition",
                  "client_optimizer", "server_optimizer", "client_lr", "server_lr", "dp_noise_multiplier",
                  "dp_clip", "adaptive_clipping", "sampling", "dropout_rate", "eval_every", "checkpoint_every",
                  "resume", "seed", "max_concurrent_computation_calls", "plot", "client_loop", "workers",
                  "worker_processes", "noise_cohort_size", "noise_population", "secure_aggregation")
DEFAULTS: Dict[str, Any] = {k: getattr(FederatedConfig(), k) for k in _CONFIG_FIELDS}


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--clients``, ``--rounds``, ``--partition``, ``--dp-noise-multiplier``, ... to ``parser``."""
    from federated.cli import add_federated_arguments

    add_federated_arguments(parser)


def trainer_args(namespace: argparse.Namespace) -> Dict[str, Any]:
    """The federated flags of a parsed namespace as the kind's args. ``--target-epsilon`` without
    ``--dp-noise-multiplier`` asks for DP-FedAvg calibrated to it (``auto``); a ``column:X`` partition gets its
    client population from X's public domain in ``--data``'s reference schema."""
    from federated.cli import config_kwargs

    args = config_kwargs(namespace)
    if args.get("dp_noise_multiplier") is None and getattr(namespace, "target_epsilon", None) is not None:
        args["dp_noise_multiplier"] = AUTO
    data = getattr(namespace, "data", None)
    if data and str(args.get("partition", "")).startswith("column:"):
        from core.dataset import load_dataset

        args = resolve_partition_clients(load_dataset(data), args)
    return args


def resolve_partition_clients(spec, args: Mapping[str, Any]) -> Dict[str, Any]:
    """For ``column:X``: ``clients`` = size of X's public domain + 1 (missing/out-of-domain), from the
    reference schema (public); other partitions keep ``clients``."""
    out = dict(args)
    part = PartitionSpec.parse(str(out.get("partition") or DEFAULTS["partition"]))
    if part.kind == "column":
        if part.column not in spec.categorical_features:
            raise ValueError(f"--partition column:{part.column}: {part.column!r} is not a categorical column of "
                             f"{spec.name} ({', '.join(spec.categorical_features)}); for a numeric column use "
                             f"hash:{part.column}")
        out["clients"] = len(spec.public_domains()[part.column].values) + 1
    return out


# ------------------------------------------------------------------------------------------------
# The kind's typed config (parsed and validated once: command line, study TOML and Python alike)
# ------------------------------------------------------------------------------------------------
_INTS = {"clients": 1, "clients_per_round": 1, "rounds": 1, "local_epochs": 1, "client_batch_size": 1,
         "eval_every": 0, "checkpoint_every": 0, "seed": None, "max_concurrent_computation_calls": -1,
         "worker_processes": 0}
_OPTIONAL_INTS = {"noise_cohort_size": 1, "noise_population": 1}
_BOOLS = ("adaptive_clipping", "resume", "plot", "secure_aggregation")


def parse_noise(value) -> Union[None, str, float]:
    """``dp_noise_multiplier``: None (FedAvg), ``"auto"`` (calibrated), or a finite number >= 0 (also given as a
    numeric string, e.g. from a TOML file): one ArgumentError otherwise."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, bool):
        raise ArgumentError(f"--dp-noise-multiplier takes a number or 'auto', got {value!r}")
    try:
        z = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ArgumentError(f"--dp-noise-multiplier takes a number or 'auto', got {value!r}") from None
    if math.isnan(z) or math.isinf(z) or z < 0:
        raise ArgumentError(f"--dp-noise-multiplier must be a finite number >= 0 or 'auto', got {value!r} (0 runs "
                            "the DP aggregator without noise: not private)")
    return z


@dataclasses.dataclass(frozen=True)
class FederatedKindConfig(KindConfig):
    """The federated arguments, typed (``federated.engine.FederatedConfig`` documents them). Private exactly
    when ``dp_noise_multiplier`` is ``"auto"`` or a number > 0 (see the module docstring)."""

    kind: ClassVar[str] = "federated"
    clients: int = DEFAULTS["clients"]
    clients_per_round: int = DEFAULTS["clients_per_round"]
    rounds: int = DEFAULTS["rounds"]
    local_epochs: int = DEFAULTS["local_epochs"]
    client_batch_size: int = DEFAULTS["client_batch_size"]
    partition: str = DEFAULTS["partition"]
    client_optimizer: str = DEFAULTS["client_optimizer"]
    server_optimizer: str = DEFAULTS["server_optimizer"]
    client_lr: float = DEFAULTS["client_lr"]
    server_lr: float = DEFAULTS["server_lr"]
    dp_noise_multiplier: Union[None, str, float] = DEFAULTS["dp_noise_multiplier"]
    dp_clip: float = DEFAULTS["dp_clip"]
    adaptive_clipping: bool = DEFAULTS["adaptive_clipping"]
    sampling: str = DEFAULTS["sampling"]
    dropout_rate: float = DEFAULTS["dropout_rate"]
    eval_every: int = DEFAULTS["eval_every"]
    checkpoint_every: int = DEFAULTS["checkpoint_every"]
    resume: bool = DEFAULTS["resume"]
    seed: int = DEFAULTS["seed"]
    max_concurrent_computation_calls: int = DEFAULTS["max_concurrent_computation_calls"]
    plot: bool = DEFAULTS["plot"]
    client_loop: str = DEFAULTS["client_loop"]
    workers: Optional[str] = DEFAULTS["workers"]
    worker_processes: int = DEFAULTS["worker_processes"]
    noise_cohort_size: Optional[int] = DEFAULTS["noise_cohort_size"]
    noise_population: Optional[int] = DEFAULTS["noise_population"]
    secure_aggregation: bool = DEFAULTS["secure_aggregation"]

    def __post_init__(self):
        k = self.kind
        for key, minimum in _INTS.items():
            self._set(key, parse_whole(k, key, getattr(self, key), minimum=minimum))
        for key, minimum in _OPTIONAL_INTS.items():
            if getattr(self, key) is not None:
                self._set(key, parse_whole(k, key, getattr(self, key), minimum=minimum))
        for key in _BOOLS:
            self._set(key, parse_bool(k, key, getattr(self, key)))
        for key in ("client_lr", "server_lr"):
            self._set(key, parse_number(k, key, getattr(self, key), above=0.0))
        self._set("dp_clip", parse_number(k, "dp_clip", self.dp_clip, above=0.0))
        self._set("dropout_rate", parse_number(k, "dropout_rate", self.dropout_rate, minimum=0.0))
        if not self.dropout_rate < 1.0:
            raise ArgumentError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        self._set("sampling", parse_choice(k, "sampling", self.sampling, SAMPLINGS))
        self._set("client_loop", parse_choice(k, "client_loop", self.client_loop, ("iterator", "reduce")))
        for key in ("partition", "client_optimizer", "server_optimizer"):
            self._set(key, parse_text(k, key, getattr(self, key)))
        self._set("partition", str(PartitionSpec.parse(self.partition)))
        if self.workers is not None:
            self._set("workers", parse_text(k, "workers", self.workers))
        self._set("dp_noise_multiplier", parse_noise(self.dp_noise_multiplier))

    @property
    def private(self) -> bool:
        z = self.dp_noise_multiplier
        return z == AUTO or (z is not None and z > 0)

    @property
    def noise_given(self) -> bool:
        return self.dp_noise_multiplier not in (None, AUTO)


def _positive_int(a, key, flag, minimum=1):
    v = a[key]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{key} must be a whole number >= {minimum}, got {v!r}; pass {flag} N")
    return int(v)


def accounting_mode(source, part: PartitionSpec) -> str:
    """``"client"``: one client per privacy unit, the client event under the source's relation is exact;
    ``"replace"``: one unit's change replaces one client's data (row-stable partitions). Raises ValueError
    (naming the fix) where no client-level bound covers one unit."""
    relation = source.relation
    unit_col = source.unit_column
    if unit_col is None:   # unit row
        if not part.row_stable:
            raise ValueError(
                f"partition {part} assigns rows by a permutation of all training rows, so adding or removing one "
                "row moves rows between clients and no client-level bound covers one row; a private run on this "
                "row-unit source needs a row-stable partition: --partition hash (IID-like), "
                "hash-dirichlet:ALPHA (label skew), column:NAME or hash:NAME (silos by a column)")
        mode = "replace"
    else:
        if part.groups_by != unit_col:
            raise ValueError(
                f"the privacy unit is column:{unit_col}: every person's rows must stay in one client, which "
                f"partition {part} does not ensure; use --partition column:{unit_col} (one client per person) "
                f"or hash:{unit_col}")
        mode = "client" if part.kind == "column" else "replace"
    if relation != events.ADD_OR_REMOVE_ONE:
        raise ValueError(
            f"source declares relation {relation}, under which replacing one {source.unit_name} by another can "
            f"change two clients' data (the old one's and the new one's client) with partition {part}; private "
            "federated runs are accounted only under add_or_remove_one (declare it in dataset.json, with a "
            "public_row_estimate)")
    return mode


def client_event(noise: float, rounds: int, clients: int, per_round: int, sampling: str) -> dp_accounting.DpEvent:
    """The client-level event of ``rounds`` rounds (noise relative to the clip norm)."""
    if rounds <= 0:
        return dp_accounting.NoOpDpEvent()
    g = dp_accounting.GaussianDpEvent(float(noise))
    if sampling == "poisson":
        per = dp_accounting.PoissonSampledDpEvent(per_round / clients, g)
    else:
        per = dp_accounting.SampledWithoutReplacementDpEvent(clients, per_round, g)
    return dp_accounting.SelfComposedDpEvent(per, int(rounds))


def training_event(noise: float, rounds: int, clients: int, per_round: int, sampling: str,
                   mode: str) -> dp_accounting.DpEvent:
    """What ``rounds`` rounds release, at the privacy unit (see the module docstring)."""
    e = client_event(noise, rounds, clients, per_round, sampling)
    if isinstance(e, dp_accounting.NoOpDpEvent):
        return e
    if mode == "replace" or sampling == "fixed":
        return events.ReplaceAdjacencyDpEvent(e)
    return e


def plan_training(inputs: PlanInputs) -> TrainingPlan:
    config = FederatedKindConfig.parse(inputs.config if inputs.config is not None else inputs.args)
    a = config.to_args()
    part = PartitionSpec.parse(str(a["partition"]))
    a["partition"] = str(part)
    clients = _positive_int(a, "clients", "--clients")
    per_round = _positive_int(a, "clients_per_round", "--clients-per-round")
    rounds = _positive_int(a, "rounds", "--rounds")
    _positive_int(a, "local_epochs", "--local-epochs")
    _positive_int(a, "client_batch_size", "--client-batch-size")
    if per_round > clients:
        raise ValueError(f"clients_per_round {per_round} exceeds the {clients} clients; pass "
                         f"--clients-per-round <= {clients}")
    if a["sampling"] not in SAMPLINGS:
        raise ValueError(f"federated sampling must be poisson or fixed, got {a['sampling']!r}")
    if not 0.0 <= float(a["dropout_rate"]) < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {a['dropout_rate']!r}")
    clip = float(a["dp_clip"])
    if not clip > 0 or math.isinf(clip):
        raise ValueError(f"dp_clip must be a finite number > 0, got {a['dp_clip']!r}; pass e.g. --dp-clip 0.5")
    z = a["dp_noise_multiplier"]
    cohort = _noise_cohort(a, clients, per_round, z)
    public: Dict[str, Any] = {
        "partition": str(part), "clients": clients, "clients_per_round": per_round, "rounds": rounds,
        "sampling": a["sampling"], "local_epochs": int(a["local_epochs"]),
        "client_batch_size": int(a["client_batch_size"]), "client_optimizer": a["client_optimizer"],
        "server_optimizer": a["server_optimizer"], "client_lr": float(a["client_lr"]),
        "server_lr": float(a["server_lr"]), "dropout_rate": float(a["dropout_rate"]), "seed": int(a["seed"])}
    internal: Dict[str, Any] = {"args": a, "clients": clients, "clients_per_round": per_round, "rounds": rounds}
    if config.secure_aggregation:   # SecAgg+ with distributed DP: its own event and threat model
        from federated.secagg.plan import plan_secure

        return plan_secure(inputs, a, part, public, internal, z)
    if not config.private:
        if z == 0.0:
            public.update({"strategy": "dp-fedavg aggregator without noise", "dp_clip": clip,
                           "adaptive_clipping": bool(a["adaptive_clipping"])})
        else:
            public["strategy"] = "fedavg (weighted)"
        internal.update({"noise_multiplier": z, "mode": None})
        return TrainingPlan(event=dp_accounting.NonPrivateDpEvent(), private=False,
                            mechanism="none (non-private federated averaging)", public=public, internal=internal)

    mode = accounting_mode(inputs.source, part)
    if inputs.source.unit_column is not None and not isinstance(inputs.base_event, dp_accounting.NoOpDpEvent):
        raise ValueError(
            f"the run's DP preprocessing (normalisation statistics) is accounted per row, but this source's unit is "
            f"{inputs.source.unit} (one person may have many rows), so its epsilon would not hold per person; "
            "federated runs on a column unit need preprocessing without row-level releases: use "
            "privtrain simulate federated (which uses the public scaling only for column units)")
    target = inputs.target_epsilon
    calibrated = z == AUTO
    # Simulation setting (pfl-research's noise_cohort_size): the noise multiplier z is chosen for the stated
    # deployment (cohort C of population P); the simulation adds the same noise to the MEAN of its K < C clipped
    # updates, i.e. multiplier z*K/C on its sum, and is accounted with that (weaker) multiplier.
    dep_clients, dep_per_round = (cohort[1], cohort[0]) if cohort else (clients, per_round)
    if calibrated:
        target = DEFAULT_TARGET_EPSILON if target is None else float(target)

        def make(sigma: float) -> dp_accounting.DpEvent:
            return training_event(sigma, rounds, dep_clients, dep_per_round, a["sampling"], mode)

        z = calibration.calibrate(
            target, make, inputs.delta, inputs.accountant, inputs.relation, inputs.base_event,
            what=f"{rounds} rounds, {per_round} of {clients} clients per round ({a['sampling']}), "
                 f"{inputs.accountant} accountant, {inputs.relation} of one {inputs.source.unit_name}",
            fix="Raise the target epsilon, run fewer rounds, sample fewer clients per round or configure more "
                "clients (--clients), or lower --preprocessing-epsilon.")
    elif target is not None:
        raise ValueError(f"give either --dp-noise-multiplier or --target-epsilon, not both (got {z!r} and "
                         f"{target!r})")
    z = float(z)
    z_run = z * per_round / cohort[0] if cohort else z
    event = training_event(z_run, rounds, clients, per_round, a["sampling"], mode)
    accountants.check_supported(inputs.accountant, events.compose(inputs.base_event, event), inputs.relation)
    level = ("client-level (one client per person), exact" if mode == "client" and a["sampling"] == "poisson"
             else "one unit's change replaces one client's data (row-stable partition)" if mode == "replace"
             else "one client per person, accounted as a replacement of one client (fixed-size sampling)")
    sampling_text = ("Poisson client sampling" if a["sampling"] == "poisson"
                     else "fixed-size client sampling without replacement")
    public.update({"strategy": "dp-fedavg", "noise_multiplier": z, "noise_calibrated": calibrated, "dp_clip": clip,
                   "adaptive_clipping": bool(a["adaptive_clipping"]),
                   "client_sampling_rate": per_round / clients, "accounting": level,
                   "aggregation": "unweighted mean: noisy sum of clipped client updates divided by the public "
                                  "clients_per_round"})
    internal.update({"noise_multiplier": z_run, "mode": mode})
    simulation = None
    if cohort:
        label = f"simulation setting: noise calibrated for a cohort of {cohort[0]}, {per_round} simulated"
        public.update({"simulation_setting": label, "noise_cohort_size": cohort[0], "noise_population": cohort[1],
                       "simulated_noise_multiplier": z_run, "client_sampling_rate": per_round / clients,
                       "deployment_sampling_rate": cohort[0] / cohort[1],
                       "aggregation": "unweighted mean: sum of clipped client updates plus Gaussian noise of stddev "
                                      f"noise_multiplier*clip*{per_round}/{cohort[0]}, divided by the public "
                                      f"clients_per_round ({per_round}): the noise on the mean is that of the stated "
                                      f"cohort of {cohort[0]}"})
        simulation = SimulationSetting(
            label, training_event(z, rounds, cohort[1], cohort[0], a["sampling"], mode),
            {"noise_cohort_size": cohort[0], "noise_population": cohort[1], "rounds": rounds,
             "noise_multiplier": z, "sampling": a["sampling"], "dp_clip": clip,
             "simulated_clients_per_round": per_round, "simulated_clients": clients})
    notes = ()
    if mode == "client" and inputs.source.unit_column:
        notes = (f"rows whose {inputs.source.unit_column} is missing or outside its public domain belong to no "
                 "person and are not trained on",)
    return TrainingPlan(event=event, private=config.private,
                        mechanism=f"DP-FedAvg, Gaussian aggregate per round, {sampling_text}",
                        public=public, internal=internal, notes=notes, simulation=simulation)


def _noise_cohort(a, clients: int, per_round: int, z) -> Optional[tuple]:
    """(C, P) for a simulation setting (``noise_cohort_size`` C of ``noise_population`` P), or None."""
    if a.get("noise_cohort_size") is None:
        if a.get("noise_population") is not None:
            raise ValueError("--noise-population is part of a simulation setting: pass --noise-cohort-size too")
        return None
    c = _positive_int(a, "noise_cohort_size", "--noise-cohort-size")
    if z is None or z == 0.0:
        raise ValueError("--noise-cohort-size calibrates DP-FedAvg's noise for a larger cohort: it needs a private "
                         "run (--dp-noise-multiplier Z or auto, or --target-epsilon E)")
    if c < per_round:
        raise ValueError(f"--noise-cohort-size {c} is below the {per_round} simulated clients per round; the noise "
                         f"cohort is the larger deployment cohort (>= --clients-per-round)")
    p = a.get("noise_population")
    p = clients if p is None else _positive_int(a, "noise_population", "--noise-population")
    if c > p:
        raise ValueError(f"--noise-cohort-size {c} exceeds the population of {p} clients it is drawn from; pass "
                         f"--noise-population >= {c}")
    return c, p


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _model_key(model, element_keys) -> str:
    """Identifies a built model's graph, constants included (the DP normalisation is baked into it)."""
    text = json.dumps(model.get_config(), sort_keys=True, default=str) + "|" + ",".join(element_keys)
    return hashlib.sha256(text.encode()).hexdigest()


def _one_hot_tokens(model, column: str) -> Optional[int]:
    from core.features import categorical_key

    try:
        return int(model.get_layer(f"{categorical_key(column)}_one_hot").get_config()["num_tokens"])
    except (ValueError, KeyError, AttributeError):
        return None


class FederatedTrainer(TrainerKind):
    """Federated training of ``context.build_model()`` over client shards of the training rows."""

    name = "federated"
    Config = FederatedKindConfig
    epsilon_axis = "optional"
    partitioned = True
    study_hidden = ("seed", "resume", "plot", "checkpoint_every")

    def study_args(self, settings, target_epsilon=None, partition=None, spec=None):
        """Without a noise multiplier (or with 0), a target epsilon asks for DP-FedAvg calibrated to it."""
        args = {**DEFAULTS, "plot": False, **dict(settings)}
        if partition:
            args["partition"] = partition
        if target_epsilon is not None and args.get("dp_noise_multiplier") in (None, 0, 0.0):
            args["dp_noise_multiplier"] = AUTO
        return resolve_partition_clients(spec, args) if spec is not None else args

    def add_arguments(self, parser) -> None:
        add_arguments(parser)

    def from_arguments(self, namespace) -> FederatedKindConfig:
        return FederatedKindConfig.parse(trainer_args(namespace))

    def summary_lines(self, parameters: Mapping[str, Any]):
        p = parameters
        if "rounds" not in p or "noise_multiplier" not in p:
            return []
        lines = [f"noise multiplier {p['noise_multiplier']:.4g}, client clip {p.get('dp_clip', '-')}, "
                 f"{p.get('clients_per_round', '-')} of {p.get('clients', '-')} clients per round "
                 f"({p.get('sampling', '-')}), {p.get('rounds', '-')} rounds, partition {p.get('partition', '-')}"]
        if "simulated_noise_multiplier" in p:
            lines.append(f"simulated with noise multiplier {p['simulated_noise_multiplier']:.4g} on the sum of "
                         f"the cohort (the noise on the mean of a cohort of {p.get('noise_cohort_size')})")
        return lines

    def plan(self, inputs: PlanInputs) -> TrainingPlan:
        return plan_training(inputs)

    def train(self, context: TrainerContext) -> TrainingOutcome:
        from federated.engine import _as_model_dtypes, run_federated
        from federated.partition import make_shards

        internal = dict(context.plan.internal)
        a = internal["args"]
        z = internal["noise_multiplier"]
        mode = internal["mode"]
        clients, per_round, rounds = internal["clients"], internal["clients_per_round"], internal["rounds"]
        private = context.plan.private
        cfg = FederatedConfig(**{k: a[k] for k in _CONFIG_FIELDS if k != "dp_noise_multiplier"},
                              dp_noise_multiplier=z)
        part = PartitionSpec.parse(cfg.partition)
        labels = np.asarray(context.train_labels, np.float32).reshape(-1)
        private_details: Dict[str, Any] = {}
        try:   # nothing is released before the first round
            features = _as_model_dtypes(context.train_features)
            probe = context.build_model()
            if part.kind == "column":
                tokens = _one_hot_tokens(probe, part.column)
                if tokens is not None and tokens != clients:
                    raise ValueError(f"partition column:{part.column} has {tokens} public values (with the "
                                     f"out-of-domain one) but the plan has {clients} clients; plan with clients = "
                                     f"{tokens} (federated.trainer.resolve_partition_clients)")
            shards = make_shards(part, features, labels, clients, cfg.seed)
            if private and mode == "client" and part.kind == "column":
                private_details["rows_without_person"] = int(shards[-1].shape[0])   # out-of-domain / missing
                shards[-1] = np.zeros(0, np.int64)
            key = _model_key(probe, sorted(features))
        except Exception as exc:   # noqa: BLE001 - reported as released nothing
            raise TrainingInterrupted(dp_accounting.NoOpDpEvent(), exc) from exc

        def released(r: int) -> dp_accounting.DpEvent:
            if not private:
                return dp_accounting.NonPrivateDpEvent()
            if internal.get("secagg"):
                from federated.secagg.plan import released_event

                return released_event(internal, r)
            return training_event(z, r, clients, per_round, cfg.sampling, mode)

        progress: Dict[str, int] = {}
        try:
            res = run_federated(features, labels, context.eval_features, context.eval_labels, context.build_model,
                                cfg, output_dir=context.scratch_dir, log=context.log, shards=shards,
                                model_key=("federated", key), progress=progress)
        except BaseException as exc:   # report the rounds this call released, then stop
            raise TrainingInterrupted(released(progress.get("rounds_started", 0)), exc) from exc
        # The model embodies every round, also those of an interrupted run it resumed from (charged then too:
        # resuming charges them twice, which only over-states the spend).
        public = {"strategy": "dp-fedavg" if private else ("dp-fedavg aggregator without noise" if z == 0.0
                                                           else "fedavg (weighted)"),
                  **({"strategy": context.plan.public["strategy"]} if internal.get("secagg") else {}),
                  "client_loop": cfg.client_loop}
        private_details.update({"history": res.history, "shards": res.shards, "final": res.final,
                                "resumed_from_round": res.resumed_from_round, "files": res.files,
                                "scratch_dir": context.scratch_dir})
        return TrainingOutcome(model=res.model, released_event=released(rounds), public_details=public,
                               private_details=private_details)


__all__ = ["FederatedTrainer", "FederatedKindConfig", "parse_noise", "add_arguments", "trainer_args", "plan_training", "training_event",
           "client_event", "accounting_mode", "resolve_partition_clients", "DEFAULTS"]
