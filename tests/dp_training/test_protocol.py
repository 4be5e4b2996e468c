"""The privacy protocol without TFX (dp_training.protocol.run_private_training), on a sample of Adult read with
the one reader and the public transform: what is charged, what is reported, and an audit that catches a run
whose noise was switched off."""
from __future__ import annotations

import dataclasses
import os

import dp_accounting
import numpy as np
import pytest

from dp_training import accountants, events
from dp_training.contract import TrainingInterrupted
from core.dataset import load_dataset, read_rows
from core.features import transform_columns
from dp_training.ledger import Ledger
from dp_training.protocol import PlanError, run_private_training
from dp_training.trainer import DPSGDTrainer
from tests.conftest import make_adult_sample

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def adult(tmp_path_factory):
    directory = make_adult_sample(str(tmp_path_factory.mktemp("protocol_sample")), 1500, 600)
    spec = load_dataset(directory)
    data = []
    for split in ("train", "eval"):
        rows = read_rows(spec, split)
        data.append((transform_columns(spec, rows.columns), rows.labels))
    return spec, data[0], data[1]


def _run(adult, tmp_path, trainer_args, privacy_args, kind=None, ledger=None, rows=None):
    spec, (xtr, ytr), (xev, yev) = adult
    if rows is not None:
        xtr, ytr = {k: v[:rows] for k, v in xtr.items()}, ytr[:rows]
    ledger = ledger or Ledger(str(tmp_path / "ledger.sqlite"))
    return run_private_training(spec, "dp_sgd", trainer_args, privacy_args, xtr, ytr, xev, yev,
                                scratch_dir=str(tmp_path / "scratch"), kind=kind or DPSGDTrainer(),
                                log=lambda m: None, ledger=ledger), ledger


def test_the_ledger_is_charged_exactly_the_guarantees_composed_event(adult, tmp_path):
    result, ledger = _run(adult, tmp_path, {"epochs": 2, "mia": False, "seed": 0},
                          {"target_epsilon": 2.0, "delta": 1e-5})
    g = result.guarantee
    spec = adult[0]
    composed = dp_accounting.ComposedDpEvent([result.plan.preprocessing_event, result.outcome.released_event])
    assert events.from_json(g.event) == composed
    acc = dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(composed)
    assert g.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9) and g.epsilon <= 2.0
    spend = ledger.spend(spec.privacy.source_id)
    assert spend.epsilon == pytest.approx(g.epsilon, rel=1e-6)
    assert g.ledger["seq"] == ledger.verify().head_seq
    assert len(g.mechanisms) == 2 and g.mechanisms[0].epsilon_alone == pytest.approx(0.2, rel=0.02)
    assert g.parameters["planning_rows"] == 1500 and "train_rows" not in g.parameters
    assert any("seed" in note for note in g.notes) and "seed" not in g.parameters   # said, never published


def test_a_run_that_stops_is_charged_what_it_released(adult, tmp_path, monkeypatch):
    import itertools

    from dp_training import trainer as trainer_mod

    # every step logs its line (the step lines are rate-limited by this clock: 10 s pass per call)
    monkeypatch.setattr(trainer_mod, "_clock", itertools.count(0.0, 10.0).__next__)

    class StopsAt(DPSGDTrainer):
        def train(self, context):
            def log(message):
                if "step 10/" in message:
                    raise KeyboardInterrupt
            return super().train(dataclasses.replace(context, log=log))

    with pytest.raises(KeyboardInterrupt):
        _run(adult, tmp_path, {"epochs": 3, "mia": False, "noise_multiplier": 1.0, "batch_size": 150}, {},
             kind=StopsAt())
    ledger = Ledger(str(tmp_path / "ledger.sqlite"))
    (source,) = ledger.history()
    (run,) = source["runs"]
    assert run["status"] == "cancelled"
    released = events.from_json(run["released_event"])
    pre, train = released.events
    assert isinstance(pre, dp_accounting.GaussianDpEvent)   # the normalisation was released before training
    assert train == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(150 / 1500, dp_accounting.GaussianDpEvent(1.0)), 10)
    spend = ledger.spend(adult[0].privacy.source_id)
    assert spend.epsilon == pytest.approx(accountants.epsilon(released, spend.delta, "pld"), rel=1e-6)
    assert spend.epsilon < accountants.epsilon(events.from_json(run["planned_event"]), spend.delta, "pld")


def test_the_audit_catches_a_run_whose_noise_was_switched_off(adult, tmp_path):
    class NoiseSwitchedOff(DPSGDTrainer):  # a bug: plans and reports sigma, trains with none
        def train(self, context):
            plan = dataclasses.replace(context.plan, internal=dict(context.plan.internal, noise_multiplier=0.0))
            outcome = super().train(dataclasses.replace(context, plan=plan))
            outcome.released_event = context.plan.event   # ... and reports the planned noise
            return outcome

    # 300 real rows and 1000 canaries (about 500 inserted): small enough that a non-private model memorises them.
    # (With 400 canaries the broken run's lower bound ranged 0.65-2.1 over repeats: too few guesses for power;
    # with 1000 it ranged 2.6-3.6.)
    args = {"epochs": 60, "batch_size": 64, "learning_rate": 0.1, "l2_norm_clip": 5.0, "mia": False, "seed": 0}
    privacy = {"target_epsilon": 1.0, "delta": 1e-5, "audit_canaries": 1000}
    broken, _ = _run(adult, tmp_path / "broken", args, privacy, kind=NoiseSwitchedOff(), rows=300)
    honest, _ = _run(adult, tmp_path / "honest", args, privacy, rows=300)
    for result in (broken, honest):
        assert result.guarantee.epsilon <= 1.0 and result.guarantee.audit["num_canaries"] == 1000
    assert broken.guarantee.audit["epsilon_lower_bound"] > 1.0      # the stated guarantee is proven false
    assert broken.guarantee.audit["contradicts_stated"] is True
    assert honest.guarantee.audit["epsilon_lower_bound"] <= 1.0


def test_no_public_planning_figure_under_add_remove_is_refused(adult, tmp_path):
    spec = adult[0]
    spec = dataclasses.replace(spec, privacy=dataclasses.replace(spec.privacy, public_row_estimate=None))
    with pytest.raises(PlanError, match="public_row_estimate"):
        run_private_training(spec, "dp_sgd", {}, {}, adult[1][0], adult[1][1], adult[2][0], adult[2][1],
                             scratch_dir=str(tmp_path), kind=DPSGDTrainer(),
                             ledger=Ledger(str(tmp_path / "l.sqlite")))
    assert not os.path.exists(tmp_path / "l.sqlite")
