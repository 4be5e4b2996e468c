"""The federated kind's plan (public inputs only): private or not, unit and relation, the event it reserves,
what is public. No TFF here."""
import argparse
import dataclasses

import dp_accounting
import pytest

from dp_training import accountants, events as ev
from dp_training.contract import PlanInputs
from core.dataset import PrivacyDeclaration, load_dataset
from core.features import numeric_key
from dp_training.protocol import plan_run
from federated import cli, trainer
from federated.simulate import DEFAULT_DATA

ROW = PrivacyDeclaration("src", "row", "add_or_remove_one", 30000)
PERSON = PrivacyDeclaration("src", "column:native-country", "add_or_remove_one", 30000)
# Per-round / per-client facts that must never be public.
PRIVATE_KEYS = {"sampled", "participants", "examples", "history", "shards", "sizes", "positive_rates",
                "label_skew", "train_loss", "train_accuracy", "eval_accuracy", "nonempty_clients",
                "rows_without_person", "train_rows"}


def inputs(args, source=ROW, accountant="pld", base=None, target=None, delta=1e-5):
    return PlanInputs(kind="federated", dataset_name="adult", source=source, planning_rows=30000, args=args,
                      accountant=accountant, delta=delta, base_event=base or dp_accounting.NoOpDpEvent(),
                      target_epsilon=target)


def plan(args, **kw):
    return trainer.FederatedTrainer().plan(inputs(args, **kw))


def test_noise_absent_or_zero_is_not_private():
    for args in ({}, {"dp_noise_multiplier": None}, {"dp_noise_multiplier": 0.0}, {"dp_noise_multiplier": 0}):
        assert not trainer.FederatedTrainer().is_private(args)
        p = plan(args)
        assert not p.private and isinstance(p.event, dp_accounting.NonPrivateDpEvent)
    assert plan({"dp_noise_multiplier": 0.0}).public["strategy"] == "dp-fedavg aggregator without noise"
    assert trainer.FederatedTrainer().is_private({"dp_noise_multiplier": 0.5}) and trainer.FederatedTrainer().is_private(
        {"dp_noise_multiplier": "auto"})
    with pytest.raises(ValueError, match=">= 0"):
        plan({"dp_noise_multiplier": -1.0})
    # a non-private plan on a permutation partition is fine
    assert not plan({"partition": "iid"}).private


def test_row_unit_event_is_a_replacement_of_one_client():
    p = plan({"dp_noise_multiplier": 1.1, "clients": 200, "clients_per_round": 20, "rounds": 7})
    assert p.private
    assert p.event == ev.ReplaceAdjacencyDpEvent(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 7))
    assert p.public["noise_multiplier"] == 1.1 and p.public["client_sampling_rate"] == 0.1


def test_fixed_sampling_event_and_accountant_support():
    args = {"dp_noise_multiplier": 1.0, "clients": 50, "clients_per_round": 5, "rounds": 4, "sampling": "fixed"}
    p = plan(args, accountant="rdp")
    assert p.event == ev.ReplaceAdjacencyDpEvent(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(50, 5, dp_accounting.GaussianDpEvent(1.0)), 4))
    with pytest.raises(accountants.UnsupportedRelationError, match="--accountant rdp"):
        plan(args, accountant="pld")


def test_permutation_partition_refused_for_private_row_unit():
    for part in ("iid", "dirichlet:0.5"):
        with pytest.raises(ValueError, match="row-stable partition: --partition hash"):
            plan({"dp_noise_multiplier": 1.0, "partition": part})
    for part in ("hash", "hash-dirichlet:0.5", "hash:education"):
        assert plan({"dp_noise_multiplier": 1.0, "partition": part}).private


def test_replace_one_sources_refused():
    for source, part in ((ROW, "hash"), (PERSON, "column:native-country")):
        src = dataclasses.replace(source, relation="replace_one")
        with pytest.raises(ValueError, match="replace_one.*two clients"):
            plan({"dp_noise_multiplier": 1.0, "partition": part, "clients": 42}, source=src)


def test_one_client_per_person_is_the_client_level_event_exactly():
    args = {"dp_noise_multiplier": 0.9, "partition": "column:native-country", "clients": 43,
            "clients_per_round": 5, "rounds": 3}
    p = plan(args, source=PERSON)
    assert p.event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(5 / 43, dp_accounting.GaussianDpEvent(0.9)), 3)
    # several persons per client (hash of the person column): a replacement of one client
    p = plan(dict(args, partition="hash:native-country", clients=10), source=PERSON)
    assert isinstance(p.event, ev.ReplaceAdjacencyDpEvent)
    # a partition that splits a person's rows over clients is refused
    with pytest.raises(ValueError, match="column:native-country.*hash:native-country"):
        plan(dict(args, partition="hash"), source=PERSON)
    # row-level DP preprocessing does not hold per person
    with pytest.raises(ValueError, match="per row"):
        plan(args, source=PERSON, base=dp_accounting.GaussianDpEvent(10.0))


def test_auto_noise_is_calibrated_to_the_target_with_the_base_event():
    base = dp_accounting.GaussianDpEvent(20.0)
    p = plan({"dp_noise_multiplier": "auto", "rounds": 5}, base=base, target=2.0)
    assert p.public["noise_calibrated"]
    eps = accountants.epsilon(ev.compose(base, p.event), 1e-5)
    assert 1.9 < eps <= 2.0
    with pytest.raises(ValueError, match="not both"):
        plan({"dp_noise_multiplier": 1.0}, target=2.0)


def test_public_parameters_hold_no_private_facts():
    for args, source in (({"dp_noise_multiplier": 1.0}, ROW), ({}, ROW),
                         ({"dp_noise_multiplier": 1.0, "partition": "column:native-country", "clients": 43},
                          PERSON)):
        p = plan(args, source=source)
        assert not PRIVATE_KEYS & set(p.public), set(p.public) & PRIVATE_KEYS
        assert all(isinstance(v, (str, int, float, bool)) for v in p.public.values())


def test_plan_run_with_the_preprocessing_of_the_pipeline():
    spec = load_dataset(DEFAULT_DATA)
    keys = [numeric_key(c) for c in spec.numeric_features]
    run = plan_run(spec, "federated", trainer.FederatedTrainer(), {"dp_noise_multiplier": 1.0, "rounds": 5},
                   {}, keys)
    assert run.private and isinstance(run.preprocessing_event, dp_accounting.GaussianDpEvent)
    assert run.event == ev.compose(run.preprocessing_event, run.training.event)
    assert 0 < run.planned_epsilon() < 100
    off = plan_run(spec, "federated", trainer.FederatedTrainer(), {"dp_noise_multiplier": 0.0}, {}, keys)
    assert not off.private and isinstance(off.event, dp_accounting.NonPrivateDpEvent)


def test_flags_roundtrip():
    p = argparse.ArgumentParser()
    trainer.add_arguments(p)
    p.add_argument("--target-epsilon", type=float)
    p.add_argument("--data", default=DEFAULT_DATA)
    ns = p.parse_args(["--clients", "7", "--partition", "hash-dirichlet:0.5", "--dp-noise-multiplier", "1.2",
                       "--adaptive-clipping", "--dropout-rate", "0.2", "--client-optimizer", "adam"])
    args = trainer.trainer_args(ns)
    assert args["clients"] == 7 and args["partition"] == "hash-dirichlet:0.5" and args["dp_noise_multiplier"] == 1.2
    assert args["adaptive_clipping"] and args["dropout_rate"] == 0.2 and args["client_optimizer"] == "adam"
    assert trainer.trainer_args(p.parse_args(["--target-epsilon", "2"]))["dp_noise_multiplier"] == "auto"
    assert trainer.trainer_args(p.parse_args(["--dp-noise-multiplier", "auto"]))["dp_noise_multiplier"] == "auto"
    col = trainer.trainer_args(p.parse_args(["--partition", "column:native-country", "--clients", "5"]))
    countries = load_dataset(DEFAULT_DATA).public_domains()["native-country"].values
    assert col["clients"] == len(countries) + 1 == 42   # the public domain's 41 countries + out-of-domain
    with pytest.raises(SystemExit):
        p.parse_args(["--partition", "bogus"])
    with pytest.raises(SystemExit):
        p.parse_args(["--dp-noise-multiplier", "lots"])
    sp = argparse.ArgumentParser()
    cli.add_simulate_arguments(sp)
    ns = sp.parse_args(["--output", "/tmp/x", "--rounds", "2", "--accountant", "rdp", "--target-epsilon", "1"])
    assert ns.rounds == 2 and ns.data == DEFAULT_DATA
    assert cli.privacy_kwargs(ns) == {"accountant": "rdp", "target_epsilon": 1.0}
