"""Issue 17.1: every trainer argument is parsed and validated once into the kind's typed config, and whether a run
is private is what the kind's plan states. A noise multiplier given as a string ("1.0", from the Python API or a
study's TOML) is the number 1.0: a private run whose plan includes the DP normalisation release; a value that is not
a number is one clear error. No TFX, no TFF, no training."""
from __future__ import annotations

import dataclasses

import dp_accounting
import pytest

from dp_training import events as ev
from dp_training.contract import ArgumentError
from core.dataset import load_dataset
from core.features import numeric_key
from dp_training.protocol import plan_run
from dp_training.trainer import DPSGDConfig, DPSGDTrainer
from federated.simulate import DEFAULT_DATA, SimulationConfig
from federated.trainer import FederatedKindConfig, FederatedTrainer, resolve_partition_clients


@pytest.fixture(scope="module")
def adult():
    spec = load_dataset(DEFAULT_DATA)
    return spec, [numeric_key(c) for c in spec.numeric_features]


def _assert_private_with_normalisation(plan, noise):
    assert plan.private
    # the normalisation statistics are released with noise, and that release is part of the planned event
    assert isinstance(plan.preprocessing_event, dp_accounting.GaussianDpEvent)
    assert plan.preprocessing.noise_multiplier > 0
    assert plan.event == ev.compose(plan.preprocessing_event, plan.training.event)
    assert plan.training.public["noise_multiplier"] == noise


class _Reserved(Exception):
    pass


class CaptureLedger:
    """Records the event a run reserves and refuses it: the run stops before any release."""

    path = None
    event = None

    def verify(self, anchors=()):
        return None

    def reserve(self, source_id, event, **kwargs):
        self.event = event
        raise _Reserved


def test_string_noise_through_the_simulation_config_is_private_with_its_normalisation(adult):
    """``federated.simulate(SimulationConfig(dp_noise_multiplier="1.0"))``: the event it reserves includes the DP
    normalisation release (before: the run was private, its normalisation exact and uncharged)."""
    from federated.simulate import simulate

    spec, keys = adult
    ledger = CaptureLedger()
    with pytest.raises(_Reserved):
        simulate(SimulationConfig(dp_noise_multiplier="1.0", rounds=5, train_sample=300, eval_sample=100),
                 log=lambda m: None, ledger=ledger)
    pre, training = ledger.event.events
    assert isinstance(pre, dp_accounting.GaussianDpEvent) and pre.noise_multiplier > 0
    args = resolve_partition_clients(spec, SimulationConfig(rounds=5).trainer_args())
    number = plan_run(spec, "federated", FederatedTrainer(), {**args, "dp_noise_multiplier": 1.0}, {}, keys)
    _assert_private_with_normalisation(number, 1.0)
    assert ledger.event == number.event


def test_string_noise_for_dp_sgd_is_the_number(adult):
    spec, keys = adult
    plan = plan_run(spec, "dp_sgd", DPSGDTrainer(), {"noise_multiplier": "1.0", "epochs": 2}, {}, keys)
    _assert_private_with_normalisation(plan, 1.0)
    number = plan_run(spec, "dp_sgd", DPSGDTrainer(), {"noise_multiplier": 1.0, "epochs": 2}, {}, keys)
    assert plan.event == number.event


def test_string_noise_in_a_study_toml_is_private_with_its_normalisation(tmp_path):
    from dp_training.ledger import Ledger
    from simulations.study.plan import plan_study
    from simulations.study.spec import from_toml

    path = tmp_path / "study.toml"
    path.write_text(f'data = "{DEFAULT_DATA}"\nseeds = 1\n[[arm]]\nname = "fed"\ntrainer = "federated"\n'
                    'dp_noise_multiplier = "1.0"\nrounds = 5\n[[arm]]\nname = "sgd"\ntrainer = "dp_sgd"\n'
                    'noise_multiplier = "1.0"\nepochs = 2\n')
    spec = from_toml(str(path), output=str(tmp_path / "out"))
    assert all(arm.private and arm.fixed_noise for arm in spec.arms)
    plan = plan_study(spec, spec.points(), ledger=Ledger(str(tmp_path / "ledger.sqlite")))
    assert len(plan.plans) == 2
    for run in plan.plans.values():
        _assert_private_with_normalisation(run, 1.0)


@pytest.mark.parametrize("kind,args,match", [
    (FederatedKindConfig, {"dp_noise_multiplier": "one"}, "number or 'auto'"),
    (FederatedKindConfig, {"dp_noise_multiplier": True}, "number or 'auto'"),
    (FederatedKindConfig, {"rounds": "many"}, "rounds must be a whole number"),
    (FederatedKindConfig, {"rounds": 2.5}, "rounds must be a whole number"),
    (FederatedKindConfig, {"adaptive_clipping": "no"}, "adaptive_clipping must be true or false"),
    (FederatedKindConfig, {"sampling": "shuffle"}, "sampling must be one of poisson, fixed"),
    (FederatedKindConfig, {"clients": 10, "typo": 1}, "unknown federated trainer argument"),
    (DPSGDConfig, {"noise_multiplier": "x"}, "noise_multiplier must be a number"),
    (DPSGDConfig, {"noise_multiplier": [1.0]}, "noise_multiplier must be a number"),
    (DPSGDConfig, {"mia": "no"}, "mia must be true or false"),
    (DPSGDConfig, {"batch_size": "64.5"}, "batch_size must be a whole number"),
])
def test_a_bad_type_is_one_clear_error(kind, args, match):
    with pytest.raises(ArgumentError, match=match) as info:
        kind.parse(args)
    assert "\n" not in str(info.value)


def test_configs_are_typed_and_frozen():
    c = FederatedKindConfig.parse({"dp_noise_multiplier": "0.5", "rounds": "3", "clients": 20.0})
    assert (c.dp_noise_multiplier, c.rounds, c.clients) == (0.5, 3, 20) and c.private and c.noise_given
    assert type(c.rounds) is int and type(c.dp_noise_multiplier) is float
    assert not FederatedKindConfig.parse({"dp_noise_multiplier": "0"}).private
    auto = FederatedKindConfig.parse({"dp_noise_multiplier": "AUTO"})
    assert auto.private and not auto.noise_given
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.rounds = 4
    d = DPSGDConfig.parse({"noise_multiplier": "auto", "sampling": "fixed"})
    assert d.noise_multiplier is None and d.sampling == "shuffle" and not d.noise_given
    assert DPSGDConfig.parse(d) is d


def _run_config(argv):
    from privtrain_cli.main import build_parser
    from privtrain_cli.run import run_config

    return run_config(build_parser(["run"]).parse_args(["run", *argv]))


def test_the_shared_sampling_flag_is_each_kinds_own(tmp_path):
    """``--sampling`` is declared once for every kind (not with the first kind's choices and help); each kind's
    config takes its own values, and a value another kind owns is one clear error naming the flag."""
    from privtrain_cli.main import build_parser

    common = ["--workdir", str(tmp_path)]
    assert _run_config(["--trainer", "dp_sgd", "--sampling", "fixed", *common]).trainer_args["sampling"] == "shuffle"
    assert _run_config(["--trainer", "federated", "--sampling", "fixed", *common]).trainer_args["sampling"] == "fixed"
    fed = _run_config(["--trainer", "federated", *common]).trainer_args
    assert FederatedKindConfig.parse(fed).sampling == "poisson"
    with pytest.raises(ArgumentError, match="sampling must be one of poisson, fixed"):
        _run_config(["--trainer", "federated", "--sampling", "shuffle", *common])
    run = next(a for a in build_parser(["run"])._subparsers._group_actions[0].choices["run"]._actions
               if "--sampling" in a.option_strings)
    assert "federated" in run.help and "dp_sgd" in run.help


@pytest.mark.parametrize("kind,parameters,expected", [
    ("dp_sgd", {"noise_multiplier": 1.1, "l2_norm_clip": 0.5, "sampling_rate": 0.05, "sampling": "poisson",
                "steps": 40, "planning_rows": 2000},
     ["  noise multiplier 1.1, clip 0.5, sampling rate 0.05 (poisson), 40 steps, planned on 2000 rows (public figure)"]),
    ("federated", {"noise_multiplier": 1.0, "dp_clip": 0.5, "clients_per_round": 5, "clients": 20,
                   "sampling": "poisson", "rounds": 2, "partition": "hash", "simulated_noise_multiplier": 0.1,
                   "noise_cohort_size": 50},
     ["  noise multiplier 1, client clip 0.5, 5 of 20 clients per round (poisson), 2 rounds, partition hash",
      "  simulated with noise multiplier 0.1 on the sum of the cohort (the noise on the mean of a cohort of 50)"]),
    ("standard", {"epochs": 5}, []),
])
def test_the_summary_states_each_kinds_parameters_through_the_kind(kind, parameters, expected):
    from dp_training.guarantee import Guarantee
    from pipeline.runner import format_guarantee

    g = Guarantee(private=True, epsilon=1.0, delta=1e-5, accountant="pld", relation="add_or_remove_one", unit="row",
                  source_id="s", dataset="d", trainer=kind, mechanisms=(), event={}, parameters=parameters)
    lines = format_guarantee(g).splitlines()
    assert lines[1:1 + len(expected)] == expected


def test_a_plan_that_contradicts_its_config_is_refused(adult):
    """The preprocessing is planned from the config's ``private``; a kind whose plan says otherwise (a bug that would
    ship exact statistics with a private model, or charge nothing for a private one) is refused at planning."""
    from dp_training.protocol import PlanError

    class SaysNonPrivate(DPSGDTrainer):
        def plan(self, inputs):
            return dataclasses.replace(super().plan(inputs), private=False)

    spec, keys = adult
    with pytest.raises(PlanError, match="plan says private=False but its config says private=True"):
        plan_run(spec, "dp_sgd", SaysNonPrivate(), {"noise_multiplier": 1.0, "epochs": 1}, {}, keys)


def test_register_a_kind():
    from pipeline import trainers

    class Echo(DPSGDTrainer):
        name = "echo_sgd"

    trainers.register("echo_sgd", Echo)
    try:
        assert isinstance(trainers.get_trainer("echo_sgd"), Echo)
        with pytest.raises(ValueError, match="already registered"):
            trainers.register("echo_sgd", Echo)
        with pytest.raises(ValueError, match="derives from"):
            trainers.register("other", object, replace=True)
    finally:
        trainers.TRAINER_KINDS.pop("echo_sgd", None)
